# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Forward attention on the GPU, one run: patterndsl kernels vs torch.compile'd FlexAttention (same
pattern's block mask) vs dense SDPA; then block-table build time and memory vs create_block_mask.

B=1, H=16, N=16384, D=128, bf16. Prints a table and writes JSON (argv[1], default docs/benchmarks/).
FLOPs = 4 * allowed pairs * D * H * B (allowed pairs counted exactly from the pattern's predicate).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch
import triton
from runinfo import run_info
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import patterndsl as P
from patterndsl.blocks import block_tables, clear_cache
from patterndsl.cli.bench import interleaved
from patterndsl.runtime import tables as runtime_tables
from patterndsl.runtime import tuning
from patterndsl.runtime.evaluate import evaluate
from patterndsl.runtime.options import Options

B, H, N, D = 1, 16, 16384, 128
DT = torch.bfloat16
DEV = os.environ.get("BENCH_DEVICE", "cuda")
if DEV != "cuda":  # dry run: tiny sizes, float32 (the interpreter mis-multiplies bf16)
    H, N, D, DT = 2, 256, 32, torch.float32


def mm_causal(b, h, q, k):
    return k <= q


def mm_swa(b, h, q, k):
    return (k <= q) & (q - k <= 1023)


def mm_longformer(b, h, q, k):
    return ((q - k).abs() <= 256) | (q < 16) | (k < 16)


def mm_power(b, h, q, k):
    d = (q // 64 - k // 64).abs()
    return (k <= q) & ((d <= 1) | ((d & (d - 1)) == 0))


def mm_dilated(b, h, q, k):
    return (k <= q) & (q - k <= 1023 * 4) & ((q - k) % 4 == 0)


PATTERNS = [
    ("causal", "causal", mm_causal, True),
    ("sliding_window_1024", "causal & window(1023)", mm_swa, True),
    ("longformer_512_g16", "window(256) | global(0:16)", mm_longformer, False),
    ("power_b64", "causal & blockwise(64, hops(2) | window(1))", mm_power, True),
    ("dilated_4x1024", "causal & window(1023, dilation=4)", mm_dilated, True),
]
# (BLOCK_M, BLOCK_N, warps, stages) x kernel options (tma_mode, fold, contig, split_tiles: `attn.options(...)`);
# the first is the v2 kernel (pointer loads, scale not folded, index load per tile, no split) for reference.
CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 4)]
BASE = {"tma_mode": 0, "fold": False, "contig": False, "split_tiles": 0}


def med(fn, quick: bool = False) -> float:
    if DEV != "cuda":  # a dry run of the script on CPU (TRITON_INTERPRET=1)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25 if quick else 50, rep=100 if quick else 300, return_mode="median"))


def side_by_side(fns: dict, rounds: int = 5) -> dict[str, list[float]]:
    """Ours and the peers in interleaved rounds (`patc bench`'s timing), each a quick do_bench median."""
    return interleaved(fns, lambda fn: med(fn, quick=True), rounds)


def allowed_pairs(attn) -> int:
    """Allowed (i, j) pairs of the compiled pattern's predicate at N, evaluated exactly (its index expression)."""
    total = 0
    expr = attn.spec.predicates[0].expr
    j = torch.arange(N, device=DEV)[None, :]
    for r0 in range(0, N, 2048):
        i = torch.arange(r0, min(N, r0 + 2048), device=DEV)[:, None]
        total += int(torch.broadcast_to(torch.as_tensor(evaluate(expr, i, j, N)), (i.shape[0], N)).sum())
    return total


def last_tuning(attn=None):
    """The process's last tuning run (`patterndsl.runtime.tuning.records()`), None before the first: a call
    that tuned leaves a new one (a choice read from the disk cache leaves none). With `attn`, the last run of
    the tiles its calls launch (`tile_kind`): a token layout's first call also times its two ways and tunes
    the tiles of the way it does not take."""
    done = [r for r in tuning.records() if attn is None or _record_kind(r) == tile_kind(attn)]
    return done[-1] if done else None


def _record_kind(record) -> str:
    """A tuning record's kind: its key's fourth field, absent ("fwd") where a number follows the runtime id."""
    field = record.key.split("|")[3]
    return "fwd" if field.isdigit() else field


def tile_kind(attn) -> str:
    """The tuning kind whose tiles attn's calls launch: "fwd-pointer" where its tuned way for a token layout
    (kind "layout-way") reads it in place, else "fwd" (the fast kernel, a layout gathered for it)."""
    way = [c for x, c in tuning._TUNED.items() if x[0] == attn.spec.key and x[1][0] == "layout-way"]
    return "fwd-pointer" if way == [(0,)] else "fwd"


SWEEP = bool(os.environ.get("BENCH_SWEEP"))  # time every variant below, not only the autotuned module


def variants(name: str) -> list[tuple[tuple[int, int, int, int], dict]]:
    if not SWEEP:  # what the autotuner will try: compiled ahead in the worker processes
        from patterndsl.compile import TUNE_CONFIGS

        cands = next(c for d, c in TUNE_CONFIGS if D <= d)
        return [(c[:4], switches_of(c)) for c in cands]
    out = [((128, 128, 8, 3), BASE), ((128, 64, 8, 3), BASE)]
    for tma in (0, 1, 2):
        for cfg in CONFIGS:
            out.append((cfg, {"tma_mode": tma, "fold": True, "contig": True, "split_tiles": None}))
    for cfg in ((128, 64, 8, 3), (128, 128, 8, 3)):
        splits = ({"split_tiles": 0}, {"split_tiles": 8}, {"split_tiles": 32}) if "longformer" in name else ()
        for change in ({"fold": False}, {"contig": False}, *splits):
            out.append((cfg, {"tma_mode": 1, "fold": True, "contig": True, "split_tiles": None, **change}))
    # the grid kernel at 64 x 64 (PowerAttention: 1.5x 128 x 128 on 2026-11-25 20:47; a persistent kernel,
    # since removed, added nothing there)
    for tma in (0, 1):
        out.append(((64, 64, 4, 2), {"tma_mode": tma, "fold": True, "contig": True, "split_tiles": None}))
    # the grid kernel with FULL and PARTIAL blocks in one loop (one_loop; a tuning candidate at 128 x 128 and 64 x 64)
    for cfg, tma in (((128, 128, 8, 3), 1), ((128, 128, 8, 3), 0), ((128, 64, 8, 3), 1), ((64, 64, 4, 2), 0),
                     ((64, 64, 4, 2), 1)):
        out.append((cfg, {"tma_mode": tma, "fold": True, "contig": True, "split_tiles": None, "one_loop": True}))
    # registers capped at 128 a thread: two 8-warp blocks of 128 x 64 (96 KiB of shared memory each) per SM
    for cfg, tma in (((128, 64, 8, 2), 1), ((128, 64, 8, 2), 0), ((128, 128, 8, 2), 1)):
        out.append((cfg, {"tma_mode": tma, "fold": True, "contig": True, "split_tiles": None, "maxnreg": 128}))
    # (128 x 32 tiles, two 8-warp blocks per SM without the cap, lost by 11-20% on every pattern: 2026-11-26 01:03)
    keep = [x for x in os.environ.get("BENCH_SWEEP_KEEP", "").split(",") if x]  # label prefixes: a shorter sweep
    return [(c, sw) for c, sw in out if not keep or any(label(c, sw).startswith(x) for x in keep)]


def switches_of(cfg) -> dict:
    """The kernel options that launch a tuner config (BM, BN, warps, stages, tma[, one_loop[, maxnreg]])."""
    return {"tma_mode": cfg[4], "one_loop": len(cfg) > 5 and bool(cfg[5]), "maxnreg": cfg[6] if len(cfg) > 6 else 0}


def label(cfg, sw) -> str:
    flags = "".join(f"_{k.lower()}{v}" for k, v in sw.items())
    return f"{cfg[0]}x{cfg[1]}w{cfg[2]}s{cfg[3]}{flags}"


SWITCHES = ("tma_mode", "fold", "contig", "split_tiles", "one_loop", "maxnreg")


@dataclass(frozen=True)
class Variant:
    """A compiled pattern and the kernel options it is launched with: `with variant.active(): attn(q, k, v)`.
    P.compile returns one cached pattern per source and tiles; options live in the `with` block, never on
    the pattern, so one variant's options cannot leak into the next one built on the same pattern."""

    attn: Any
    options: dict

    def active(self) -> Any:
        return self.attn.options(**self.options)


def variant(attn, names: tuple[str, ...], sw: dict) -> Variant:
    """`attn` launched with options `sw` and the rest of `names` at the runtime's defaults."""
    defaults = Options()
    return Variant(attn, {**{k: getattr(defaults, k) for k in names}, **sw})


def build(src: str, cfg, sw) -> Variant:
    """The pattern compiled with tiles `cfg` (no tuning), launched with options `sw`, the others at their defaults."""
    attn = P.compile(f"pattern p = {src}\n", block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
    return variant(attn, SWITCHES, sw)


def _warm(task):
    """Compile one variant (or Flex for one pattern) in a worker: fills the on-disk caches."""
    kind, pi, vi = task
    name, src, mm, causal = PATTERNS[pi]
    try:
        q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=DT) for _ in range(3))
        if kind == "ours":
            cfg, sw = variants(name)[vi]
            var = build(src, cfg, sw)
            with var.active():
                var.attn(q, k, v)
        else:
            bm = create_block_mask(mm, None, None, N, N, device=DEV)
            torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm)
        if DEV == "cuda":
            torch.cuda.synchronize()
        return task, None
    except Exception as e:  # noqa: BLE001 (a variant that cannot run is reported, not fatal)
        return task, f"{type(e).__name__}: {str(e)[:300]}"


def warm_all(names: list[str], workers: int) -> dict:
    import concurrent.futures as cf
    import multiprocessing as mp

    tasks = [("flex", pi, 0) for pi, p in enumerate(PATTERNS) if p[0] in names]
    tasks += [("ours", pi, vi) for pi, p in enumerate(PATTERNS) if p[0] in names for vi in range(len(variants(p[0])))]
    failed = {}
    if workers <= 0:
        return failed
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for task, err in pool.map(_warm, tasks):
            if err:
                failed[task] = err
    return failed


def save(outdir: str, rows: list) -> dict:
    """Write the JSON so far (a run cut short keeps what it measured)."""
    result = {
        **run_info(),
        "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": str(DT).replace("torch.", "")},
        "forward": rows,
    }
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "forward_h100.json")
    if os.environ.get("BENCH_NO_TABLES") and os.path.exists(path):  # keep the last measured tables
        with open(path) as f:
            old = json.load(f)
        if "tables_sliding_window_1024" in old:
            result["tables_sliding_window_1024"] = old["tables_sliding_window_1024"]
            result["tables_date"] = old.get("tables_date", old.get("date"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, os.path.join(outdir, "forward_h100.md"))
    return result


def write_markdown(res: dict, path: str) -> None:
    """The committed table (docs/benchmarks/forward_h100.md) from the JSON."""
    sh = res["shape"]
    lines = [
        f"# Forward benchmark ({res['machine']}, {res['date']}, torch {res['torch']}, triton {res['triton']})",
        "",
        f"B={sh['B']}, H={sh['H']}, N={sh['N']}, D={sh['D']}, {sh['dtype']}. Ours, Flex and SDPA timed in one run, "
        "in five interleaved rounds (alternating order) of `triton.testing.do_bench` medians; the median round. TFLOP/s = 4 * allowed pairs * D * H * B / time. Ours: the compiled module "
        "as users get it (autotuned on its first call; `tile` = BLOCK_M x BLOCK_N, warps, stages, TMA, one loop).",
    ]
    if res.get("note"):
        lines += ["", res["note"] + "."]
    lines += [
        "",
        "| pattern | density | ours ms | ours TFLOP/s | Flex ms | Flex TFLOP/s | SDPA ms (causal if the pattern is) "
        "| ours / Flex speed | tile | measured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["forward"]:
        c, sw = r["best_config"], r["best_switches"]
        tile = (f"{c[0]}x{c[1]} w{c[2]} s{c[3]} tma{sw.get('tma_mode', '-')}{' one loop' if sw.get('one_loop') else ''}"
                + (f" r{sw['maxnreg']}" if sw.get("maxnreg") else ""))  # fmt: skip
        lines.append(
            f"| {r['pattern']} | {r['density']:.4f} | {r['ours_ms']:.3f} | {r['ours_tflops']:.1f} | {r['flex_ms']:.3f} "
            f"| {r['flex_tflops']:.1f} | {r['sdpa_dense_ms']:.3f} | {r['speedup_vs_flex']:.2f}x | {tile} "
            f"| {r.get('date', res['date'])} |"
        )
    if res["forward"] and "sdpa_full_tflops" in res["forward"][0]:
        r0 = res["forward"][0]
        lines += ["", f"Dense SDPA without a mask: {r0['sdpa_full_ms']:.3f} ms, {r0['sdpa_full_tflops']:.1f} TFLOP/s."]
    tables = res.get("tables_sliding_window_1024")
    if tables:
        lines += [
            "",
            f"Block tables, causal sliding window 1024, block 128 x 64 (ours) vs `create_block_mask` (Flex), "
            f"measured {res.get('tables_date', res['date'])}:",
            "",
            "| N | blocks.py ms | blocks.py peak MiB | module ms | module peak MiB | Flex ms | Flex `_compile=True` ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for t in tables:
            fx = t.get("flex_ms")
            fxs = "not run" if fx is None else (fx if isinstance(fx, str) else f"{fx:.1f}")
            lines.append(
                f"| {t['n']} | {t['blocks_py_ms']:.1f} | {t['blocks_py_peak_mib']:.1f} | {t['module_ms']:.1f} "
                f"| {t['module_peak_mib']:.1f} | {fxs} | {t['flex_compile_ms']:.1f} |"
            )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    names = [p[0] for p in PATTERNS if not only or p[0] in only]
    t0 = time.perf_counter()
    failed = warm_all(names, int(os.environ.get("BENCH_WARM_WORKERS", "12")))
    print(f"warm-up compile {time.perf_counter() - t0:.1f} s, {len(failed)} variants failed", flush=True)
    for task, err in failed.items():
        print("  failed", task, err, flush=True)
    waits = [x for x in os.environ.get("BENCH_WAIT_FILE", "").split(",") if x]  # e.g. GPU tests beside the compiles
    while any(not os.path.exists(w) for w in waits) and time.perf_counter() - t0 < 600:
        time.sleep(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=DT) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False) if DEV == "cuda" else flex_attention
    rows = []
    sdpa_full = med(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    dense = {"sdpa_full_ms": sdpa_full, "sdpa_full_tflops": 4 * N * N * D * H * B / sdpa_full / 1e9}
    print(f"dense SDPA (no mask) {sdpa_full:.3f} ms, {dense['sdpa_full_tflops']:.1f} TFLOP/s", flush=True)
    for pi, (name, src, mm, causal) in enumerate(PATTERNS):
        if name not in names:
            continue
        row = {"pattern": name, "source": src, **dense, "variants_ms": {}, "variants_err": {}}
        bm = create_block_mask(mm, None, None, N, N, device=DEV)
        fo = flex(q, k, v, block_mask=bm)
        best = None
        attn = P.compile(f"pattern p = {src}\n")
        if not SWEEP:  # autotuned on its first call, as users get it (no options)
            before = tuning.records()
            t1 = time.perf_counter()
            out = attn(q, k, v)
            if DEV == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t1
            tuned = last_tuning(attn)
            if tuned is not None and all(tuned is not r for r in before):  # the tuner's own timings (ms per round), beside do_bench's
                row["tuner_ms"] = {",".join(map(str, c)): list(t) for c, t in tuned.rounds.items()}
            err = ((out.float() - fo.float()).norm() / fo.float().norm()).item()
            cfg = attn.config(q, k, v)  # what that call launched (the tuned choice, from memory)
            best = (0.0, cfg[:4], switches_of(cfg), out, err)
            best_var = Variant(attn, {})
        for vi, (cfg, sw) in enumerate(variants(name) if SWEEP else ()):
            if ("ours", pi, vi) in failed:
                row["variants_ms"][label(cfg, sw)] = None
                continue
            try:
                var = build(src, cfg, sw)
                with var.active():
                    out = var.attn(q, k, v)
                    t = med(lambda: var.attn(q, k, v), quick=True)
            except Exception as e:  # noqa: BLE001
                row["variants_ms"][label(cfg, sw)] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            err = ((out.float() - fo.float()).norm() / fo.float().norm()).item()
            row["variants_ms"][label(cfg, sw)] = t
            row["variants_err"][label(cfg, sw)] = err
            if err < 1e-2 and (best is None or t < best[0]):
                best = (t, cfg, sw, out, err)
        if best is None:
            print(name, "no variant ran:", row["variants_ms"], flush=True)
            continue
        if SWEEP:
            best_var = build(src, best[1], best[2])
        with best_var.active():  # (the peers take no patterndsl options)
            rounds = side_by_side({
                "ours": lambda: best_var.attn(q, k, v),
                "flex": lambda: flex(q, k, v, block_mask=bm),
                "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
            })  # fmt: skip
        row["rounds_ms"] = rounds
        best = (median(rounds["ours"]), *best[1:])
        pairs = allowed_pairs(attn)
        tf, ts = median(rounds["flex"]), median(rounds["sdpa"])
        base = row["variants_ms"].get(label((128, 128, 8, 3), BASE))
        flops = 4 * pairs * D * H * B
        row.update(
            ours_ms=best[0],
            best_config=best[1],
            best_switches=best[2],
            v2_kernel_ms=base,
            flex_ms=tf,
            sdpa_dense_ms=ts,
            allowed_pairs=pairs,
            density=pairs / N / N,
            ours_tflops=flops / best[0] / 1e9,
            flex_tflops=flops / tf / 1e9,
            sdpa_tflops=(4 * N * N * D * H * B * (0.5 if causal else 1.0)) / ts / 1e9,
            speedup_vs_flex=tf / best[0],
            rel_err_vs_flex=best[4],
        )
        rows.append(row)
        print(
            f"{name:22s} ours {best[0]:7.3f} ms {row['ours_tflops']:6.1f} TF/s {label(best[1], best[2])} | flex {tf:7.3f} ms "
            f"{row['flex_tflops']:6.1f} TF/s | sdpa {ts:7.3f} | x{tf / best[0]:.2f} vs flex | v2 kernel {base} | err {best[4]:.1e}",
            flush=True,
        )
        for lab, t in sorted(row["variants_ms"].items(), key=lambda x: x[1] if isinstance(x[1], float) else 1e9):
            print(f"    {lab:60s} {t if isinstance(t, str) or t is None else round(t, 4)}", flush=True)
        save(outdir, rows)
    result = save(outdir, rows)
    path = os.path.join(outdir, "forward_h100.json")
    # block tables: build time and peak memory at large N
    tables = []
    if os.environ.get("BENCH_NO_TABLES"):
        print("block tables: skipped (BENCH_NO_TABLES)")
        return
    swa = P.pattern("causal & window(1023)")
    spec = P.compile("pattern p = causal & window(1023)\n").spec
    for n in (65536, 262144, 1048576):
        rec = {"n": n}
        for what, fn in (
            ("blocks_py", lambda: block_tables(swa, n, 128, 64, device=DEV)),
            ("module", lambda: runtime_tables.block_tables(spec, n, 128, 64, torch.device("cuda"))),  # the runtime's tables
        ):
            fn()  # warm
            clear_cache()
            runtime_tables._TABLES.clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            rec[f"{what}_ms"] = (time.perf_counter() - t0) * 1e3
            rec[f"{what}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        for what, kw in (("flex", {}), ("flex_compile", {"_compile": True})):
            if n > 262144 and what == "flex":
                rec[f"{what}_ms"] = None
                continue
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                create_block_mask(mm_swa, None, None, n, n, device=DEV, **kw)
                torch.cuda.synchronize()
                rec[f"{what}_ms"] = (time.perf_counter() - t0) * 1e3
                rec[f"{what}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            except torch.OutOfMemoryError:
                rec[f"{what}_ms"] = "OOM"
            torch.cuda.empty_cache()
        tables.append(rec)
        print("tables", rec, flush=True)
    result["tables_sliding_window_1024"] = tables
    result.pop("tables_date", None)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, os.path.join(outdir, "forward_h100.md"))

if __name__ == "__main__":
    main()
