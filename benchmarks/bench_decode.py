# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""A decode step on the GPU (issue 21, item 7): `attn.decode` over a contiguous and a paged cache against
FlexAttention's decode (same pattern's block mask; its build per step timed apart), SDPA over the whole
cache and FlashAttention-4's `flash_attn_varlen_func` (paged, windowed) where it imports.

`ours_graph` is the contiguous step replayed from a CUDA graph (the kernels without the host's time per
call). Nq = 1 and 4, batch 1, 8 and 32, 32 query and 8 KV heads, D = 128, bf16, contexts 8k, 32k, 128k and 512k
where the cache fits (at most CACHE_GB). Each row: median time over interleaved rounds and the achieved HBM
bandwidth, bytes of K and V the pattern lets the step read (its allowed keys, counted from the predicate)
over the time. Writes JSON to argv[1] (default benchmarks/results/decode.json) after every row, so a run cut
short keeps what it measured; `BENCH_DEADLINE` (seconds, default 330) skips what would run past it.
A sweep of the decode kernel's key block and splits at two cases starts the run, then the selector case
(`selectors`): top-16 blocks of 64 plus a window of 512 at 128k, Nq = 1, batch 1 and 8, against dense
decode (ours, causal, and SDPA over the whole cache), with the selection's share of the step; the same step
under each of `VARIANTS` (decode kernel options for short rows) in the same rounds, with their kernels.
`BENCH_SMOKE=1`: tiny sizes on the CPU in the interpreter (checks the script, times nothing real).
`BENCH_QUICK=1` (about 100 s): only what issue 21's open criteria read (`quick`): the selector case, a
window + sinks step eager and replayed from 8k to 512k with its host time per call and the kernels one
eager step runs (from torch.profiler), and dense causal decode at 128k over a contiguous and a paged cache
at batch 1, 8 and 32.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from statistics import median
from typing import Any

import torch
import triton
from runinfo import captured, host_ms, run_info

import patterndsl as P
from patterndsl.cache import KeySummaries
from patterndsl.cli.bench import interleaved
from patterndsl.runtime.evaluate import evaluate

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
H, HKV, D = (4, 2, 32) if SMOKE else (32, 8, 128)
CONTEXTS = (64,) if SMOKE else (8192, 32768, 131072, 524288)
BATCHES = (1, 2) if SMOKE else (1, 8, 32)
NQS = (1, 4)
PAGE = 16 if SMOKE else 64
CACHE_GB = 30.0  # K and V of the largest cache (held twice: contiguous and paged; the H100 holds 80 GB)
W = 16 if SMOKE else 1023
PATTERNS = {  # name: (source, Flex's mask_mod over absolute positions)
    "swa_sink": (f"causal & (window({W}) | sink(4))", lambda q, k: (k <= q) & ((q - k <= W) | (k < 4))),
    "causal": ("causal", lambda q, k: k <= q),
}
FLEX_AT = {(2, 1, 64)} if SMOKE else {(8, 1, 8192), (8, 1, 131072)}  # (batch, Nq, N): each compiles (~10 s)
START = time.perf_counter()
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "330"))


def left() -> float:
    return DEADLINE - (time.perf_counter() - START)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def med(fn: Any) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def keys_read(attn: Any, n: int, nq: int) -> int:
    """Keys the step's rows may attend to (their union per sequence), from the pattern's predicate."""
    i = torch.arange(n - nq, n)[:, None]
    j = torch.arange(n)[None, :]
    ok = torch.broadcast_to(torch.as_tensor(evaluate(attn.spec.predicates[0].expr, i, j, n)), (nq, n))
    return int(ok.any(0).sum())


def full_cache(B: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's inputs at a cache of n tokens per sequence, all of them in use: (k_cache, v_cache, q with one
    row, cache_seqlens)."""
    kc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
    vc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
    q = torch.randn(B, H, 1, D, device=DEV, dtype=DT)
    return kc, vc, q, torch.full((B,), n, dtype=torch.int32, device=DEV)


def paged(kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contiguous cache [B, Hkv, N, D] as shuffled pages [pages, PAGE, Hkv, D] and its page table."""
    B, hkv, n, d = kc.shape
    per = n // PAGE
    order = torch.randperm(B * per, device=kc.device).view(B, per)
    kp = torch.empty((B * per, PAGE, hkv, d), dtype=kc.dtype, device=kc.device)
    vp = torch.empty_like(kp)
    for b in range(B):  # one sequence at a time: the copy's scratch stays one sequence's size
        kp[order[b]] = kc[b].view(hkv, per, PAGE, d).permute(1, 2, 0, 3)
        vp[order[b]] = vc[b].view(hkv, per, PAGE, d).permute(1, 2, 0, 3)
    return kp, vp, order.to(torch.int32)


def flex_step(mask_mod: Any, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n: int) -> tuple[Any, Any]:
    """(build, run): Flex's block mask for the step's rows (bottom-right: query t at n - Nq + t) and its
    decode call (BACKEND="TRITON_DECODE" where this torch takes the option)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    nq = q.shape[2]
    flex = flex_attention if SMOKE else torch.compile(flex_attention, dynamic=False)

    def mm(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        return mask_mod(qi + (n - nq), ki)

    def build() -> Any:
        return create_block_mask(mm, None, None, nq, n, device=DEV, _compile=not SMOKE)

    bm = build()
    opts: dict[str, Any] = {"BACKEND": "TRITON_DECODE"}
    try:
        flex(q, kc, vc, block_mask=bm, enable_gqa=True, kernel_options=opts)
    except Exception:  # noqa: BLE001  (an older torch: the decode kernel is chosen by itself below 128 rows)
        opts = {}
    return build, lambda: flex(q, kc, vc, block_mask=bm, enable_gqa=True, kernel_options=opts)


def fa4_step(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor,
             window: int | None) -> Any:
    """FlashAttention-4's varlen call over the paged cache (q [B * Nq, H, D]), or raise ImportError."""
    from flash_attn.cute import flash_attn_varlen_func  # type: ignore[import-not-found]

    B, h, nq, d = q.shape
    qv = q.transpose(1, 2).reshape(B * nq, h, d).contiguous()
    cu_q = torch.arange(0, B * nq + 1, nq, dtype=torch.int32, device=q.device)
    win = (window, 0) if window is not None else (None, None)
    return lambda: flash_attn_varlen_func(qv, kp, vp, cu_seqlens_q=cu_q, seqused_k=seqlens, page_table=table,
                                          max_seqlen_q=nq, causal=True, window_size=win)


def measure(res: dict[str, Any], save: Any, name: str, attn: Any, mask_mod: Any, n: int, B: int) -> None:
    """The rows of one (pattern, context, batch): a cache of n tokens per sequence, each Nq timed."""
    kc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
    vc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
    kp, vp, table = paged(kc, vc)
    for nq in NQS:
        q = torch.randn(B, H, nq, D, device=DEV, dtype=DT)
        seqlens = torch.full((B,), n, dtype=torch.int32, device=DEV)
        fns: dict[str, Any] = {
            "ours": lambda: attn.decode(q, kc, vc, seqlens),
            "ours_paged": lambda: attn.decode(q, kp, vp, seqlens, page_table=table),
            "sdpa_whole_cache": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, kc, vc, enable_gqa=True),
        }
        if not SMOKE:  # the step replayed from a CUDA graph: the kernels' time without the host's
            fns["ours_graph"] = captured(lambda: attn.decode(q, kc, vc, seqlens)).replay
        row: dict[str, Any] = {"pattern": name, "N": n, "B": B, "Nq": nq, "ms": {}, "all_ms": {}}
        ref = attn.decode(q, kc, vc, seqlens).float()
        row["paged_max_diff"] = (attn.decode(q, kp, vp, seqlens, page_table=table).float()
                                 - ref).abs().max().item()
        if (B, nq, n) in FLEX_AT and left() > 90:
            try:
                t0 = time.perf_counter()
                build, run = flex_step(mask_mod, q, kc, vc, n)
                sync()
                row["flex_first_call_s"] = time.perf_counter() - t0
                row["flex_max_diff"] = (run().float() - ref).abs().max().item()
                row["flex_block_mask_ms"] = med(build)
                fns["flex_decode"] = run
            except Exception as e:  # noqa: BLE001
                res["notes"].append(f"Flex {name} N={n} B={B} Nq={nq}: {type(e).__name__}: {str(e)[:160]}")
        try:
            fa4 = fa4_step(q, kp, vp, table, seqlens, W if name == "swa_sink" else None)
            fa4()
            fns["fa4_paged" + ("_window_no_sink" if name == "swa_sink" else "")] = fa4
        except Exception as e:  # noqa: BLE001
            if not any(x.startswith("FA4") for x in res["notes"]):
                res["notes"].append(f"FA4: {type(e).__name__}: {str(e)[:160]}")
        times = interleaved(fns, med, rounds=5)
        reads = keys_read(attn, n, nq) * B * HKV * D * 2 * torch.empty((), dtype=DT).element_size()
        for k, ts in times.items():
            row["ms"][k] = median(ts)
            row["all_ms"][k] = ts
        row["bytes_kv"] = reads
        row["GBps"] = {k: reads / (row["ms"][k] * 1e-3) / 1e9 for k in row["ms"] if k.startswith("ours")}
        res["rows"].append(row)
        print(f"{name:9s} N={n:7d} B={B:2d} Nq={nq}  " +
              "  ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()) +
              f"  ours {row['GBps']['ours']:.0f} GB/s", flush=True)
        save()


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "decode.json")
    res: dict[str, Any] = {"run": run_info(), "shape": {"H": H, "Hkv": HKV, "D": D, "dtype": str(DT), "page": PAGE},
                           "notes": [], "rows": []}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    torch.manual_seed(0)
    if os.environ.get("BENCH_QUICK") == "1":
        quick(res, save)
        save()
        return
    sweep(res, save)  # first: short, and what settles the kernel's defaults
    selectors(res, save)  # the selector case's done-criterion, before the long grid
    for name, (src, mask_mod) in PATTERNS.items():
        attn = P.compile(f"pattern p = {src}\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
        for n in CONTEXTS:
            for B in BATCHES:
                if 2 * B * HKV * n * D * 2 > CACHE_GB * 2**30:
                    res["notes"].append(f"{name} N={n} B={B}: cache over {CACHE_GB} GB, skipped")
                    continue
                if left() < 20:
                    res["notes"].append(f"{name} N={n} B={B}: deadline, skipped")
                    continue
                measure(res, save, name, attn, mask_mod, n, B)
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    save()


SEL_SRC = "causal & (window(15) | topk(2, block=16))" if SMOKE else "causal & (window(511) | topk(16, block=64))"
SEL_N = 256 if SMOKE else 131072
VARIANTS: dict[str, dict[str, Any]] = {  # the selecting step's kernel options timed beside the defaults
    "merge_chunk4": {"decode_merge_chunk": 4},
    "pipelined_picks": {"decode_pipelined_picks": True},
    "chunk4_pipelined": {"decode_merge_chunk": 4, "decode_pipelined_picks": True},
    "chunk16_pipelined": {"decode_merge_chunk": 16, "decode_pipelined_picks": True},
    "fold_merge": {"decode_fold_merge": True},
    "fold_chunk4_pipelined": {"decode_fold_merge": True, "decode_merge_chunk": 4, "decode_pipelined_picks": True},
    "select_keys128": {"decode_select_keys": 128},
    "all": {"decode_fold_merge": True, "decode_merge_chunk": 4, "decode_pipelined_picks": True,
            "decode_select_keys": 128},
}


def with_options(attn: Any, opts: dict[str, Any], fn: Any) -> Any:
    """fn run under the kernel options `opts` (a CUDA graph captures the launches they choose)."""
    def step() -> Any:
        with attn.options(**opts):
            return fn()
    return step


def selectors(res: dict[str, Any], save: Any) -> None:
    """A decode step with a selector (append one token, update its block's key summaries, score every key
    block from the summaries, keep the top 16, attend to them and the window) against dense decode at the
    same context, each replayed from a CUDA graph. `selection_ms`: the step's time minus the same step given
    its selection (`selected=`), i.e. scoring and picking; `selection_share` of the step. `variants`: the
    same figures for the step under each of `VARIANTS`' kernel options, timed in the same interleaved rounds
    (per-kernel times in `kernels`), and its largest difference from the default step's output."""
    res["selectors"] = []
    attn = P.compile(f"pattern p = {SEL_SRC}\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
    dense = P.compile("pattern p = causal\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
    block = attn.spec.selectors[0].kblock
    n = SEL_N
    for B in BATCHES[:2]:
        if left() < 40:
            res["notes"].append(f"selectors B={B}: deadline, skipped")
            continue
        kc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
        vc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
        q = torch.randn(B, H, 1, D, device=DEV, dtype=DT)
        kn = torch.randn(B, HKV, 1, D, device=DEV, dtype=DT)
        vn = torch.randn(B, HKV, 1, D, device=DEV, dtype=DT)
        seqlens = torch.full((B,), n - 1, dtype=torch.int32, device=DEV)  # each replay writes position n - 1
        summ = KeySummaries.build(kc, seqlens, block)
        _, picked = attn.decode(q, kc, vc, seqlens, k_new=kn, v_new=vn, summaries=summ, return_selected=True)
        full_step = functools.partial(attn.decode, q, kc, vc, seqlens, k_new=kn, v_new=vn, summaries=summ)
        given_step = functools.partial(attn.decode, q, kc, vc, seqlens, k_new=kn, v_new=vn, selected=picked)
        steps: dict[str, Any] = {
            "topk_window": full_step,
            "topk_window_given_selection": given_step,
            "dense_causal": lambda: dense.decode(q, kc, vc, seqlens, k_new=kn, v_new=vn),
        }
        same = torch.equal(steps["topk_window"](), steps["topk_window_given_selection"]())
        launches = {k: kernels_of(f) for k, f in steps.items()}  # (the three steps above)

        summ32 = KeySummaries.build(kc, seqlens, block, dtype=torch.float32)  # (the default: the cache's dtype)
        steps["topk_window_float32_summaries"] = lambda: attn.decode(q, kc, vc, seqlens, k_new=kn, v_new=vn,
                                                                     summaries=summ32)
        for splits in (2, 8, 16, 32):  # the static and picked tiles' split count (a short row: latency)
            steps[f"given_selection_splits{splits}"] = with_options(attn, {"decode_splits": splits}, given_step)
        diffs = {}
        for v, opts in VARIANTS.items():  # each kernel variant's step and its step given the selection
            try:
                steps[f"topk_window_{v}"] = with_options(attn, opts, full_step)
                steps[f"topk_window_given_selection_{v}"] = with_options(attn, opts, given_step)
                diffs[v] = (steps[f"topk_window_{v}"]().float() - steps["topk_window"]().float()).abs().max().item()
                launches[f"topk_window_{v}"] = kernels_of(steps[f"topk_window_{v}"])
            except Exception as e:  # noqa: BLE001  (a variant that does not build here)
                res["notes"].append(f"selectors B={B} {v}: {type(e).__name__}: {str(e)[:160]}")
                steps.pop(f"topk_window_{v}", None)
                steps.pop(f"topk_window_given_selection_{v}", None)
        for splits in (8, 16):  # the variants' split counts (a pipelined row may want fewer, longer splits)
            best = {**VARIANTS["chunk4_pipelined"], "decode_splits": splits}
            if "topk_window_chunk4_pipelined" in steps:
                steps[f"given_selection_splits{splits}_chunk4_pipelined"] = with_options(attn, best, given_step)
        fns = {k: (f if SMOKE else captured(f).replay) for k, f in steps.items()}
        fns["topk_window_eager"] = steps["topk_window"]
        fns["sdpa_whole_cache"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
        times = {k: median(v) for k, v in interleaved(fns, med, rounds=5).items()}
        step, given = times["topk_window"], times["topk_window_given_selection"]
        row = {"pattern": SEL_SRC, "N": n, "B": B, "Nq": 1, "ms": times, "graph": not SMOKE,
               "selection_float32_summaries_ms": times["topk_window_float32_summaries"] - given,
               "summaries_dtype": str(summ.mean.dtype),
               "selection_ms": step - given, "selection_share": (step - given) / step,
               "speedup_vs_dense_causal": times["dense_causal"] / step,
               "speedup_vs_sdpa": times["sdpa_whole_cache"] / step, "selected_reuse_equal": same,
               "launches": {k: sum(c for _, c, _ in v) for k, v in launches.items()}, "kernels": launches,
               "done": times["dense_causal"] / step >= 5 and (step - given) / step < 0.25, "variants": {}}
        for v, opts in VARIANTS.items():
            if f"topk_window_{v}" not in times:
                continue
            vs, vg = times[f"topk_window_{v}"], times[f"topk_window_given_selection_{v}"]
            row["variants"][v] = {"options": opts, "ms": vs, "given_selection_ms": vg, "selection_share": (vs - vg) / vs,
                                  "speedup_vs_dense_causal": times["dense_causal"] / vs, "over_default": vs / step,
                                  "max_diff_vs_default": diffs[v],
                                  "done": times["dense_causal"] / vs >= 5 and (vs - vg) / vs < 0.25}
        res["selectors"].append(row)
        print(f"selectors N={n} B={B}: step {step:.3f} ms (selection {row['selection_share']:.0%}), dense "
              f"{times['dense_causal']:.3f} ms ({row['speedup_vs_dense_causal']:.1f}x), SDPA "
              f"{times['sdpa_whole_cache']:.3f} ms, launches {row['launches']['topk_window']}; given selection "
              f"{given:.3f} ms, by splits " + " ".join(f"{k[22:]}:{v:.3f}" for k, v in times.items()
                                                       if k.startswith("given_selection_splits")), flush=True)
        for v, x in row["variants"].items():
            print(f"  {v}: step {x['ms']:.3f} ms ({x['over_default']:.2f}x the default's, selection "
                  f"{x['selection_share']:.0%}, {x['speedup_vs_dense_causal']:.1f}x dense), done {x['done']}", flush=True)
        save()


def kernels_of(fn: Any) -> list[tuple[str, int, float]]:
    """The device kernels (and memsets / copies) one eager call of fn runs: (name, count, device µs), from
    torch.profiler (empty on the CPU)."""
    if DEV != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return [(e.key[:80], e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]


def quick(res: dict[str, Any], save: Any) -> None:
    """Issue 21's open criteria in about 100 s: the selector case (`selectors`); a window + sinks step at
    batch 1, Nq = 1 from 8k to 512k, eager and replayed, with the host's time per eager call and the kernels
    of one eager step (time flat in the context); dense causal at 128k over a contiguous and a paged cache
    (shuffled pages) at batch 1, 8 and 32, each replayed from a CUDA graph and eager (paged within 1.1x), beside
    SDPA over the whole cache (dense decode at least SDPA's speed). The selector case needs about 40 s of the
    deadline (`BENCH_DEADLINE`) left when it starts, or it is skipped."""
    selectors(res, save)
    res["flat"], res["paged"] = [], []
    attn = P.compile(f"pattern p = {PATTERNS['swa_sink'][0]}\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
    for n in CONTEXTS[:1] + CONTEXTS[2:]:
        kc = torch.randn(1, HKV, n, D, device=DEV, dtype=DT)
        vc = torch.randn(1, HKV, n, D, device=DEV, dtype=DT)
        q = torch.randn(1, H, 1, D, device=DEV, dtype=DT)
        seqlens = torch.full((1,), n, dtype=torch.int32, device=DEV)
        step = functools.partial(attn.decode, q, kc, vc, seqlens)
        fns = {"eager": step, **({} if SMOKE else {"graph": captured(step).replay})}
        times = {k: median(v) for k, v in interleaved(fns, med, rounds=3).items()}
        row = {"pattern": PATTERNS["swa_sink"][0], "N": n, "B": 1, "Nq": 1, "ms": times, "host_ms": host_ms(step, sync),
               "kernels": kernels_of(step)}
        res["flat"].append(row)
        print(f"flat N={n:7d}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in times.items()) +
              f"  host {row['host_ms']:.3f} ms/call", flush=True)
        save()
    res["host_profile"] = host_profile(step)  # the last context's step: where an eager call's host time goes
    save()
    dense = P.compile("pattern p = causal\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
    n = CONTEXTS[2] if len(CONTEXTS) > 2 else CONTEXTS[0]
    for B in (1, 8, 32) if not SMOKE else BATCHES:
        if left() < 20:
            res["notes"].append(f"paged B={B}: deadline, skipped")
            continue
        kc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
        vc = torch.randn(B, HKV, n, D, device=DEV, dtype=DT)
        kp, vp, table = paged(kc, vc)
        q = torch.randn(B, H, 1, D, device=DEV, dtype=DT)
        seqlens = torch.full((B,), n, dtype=torch.int32, device=DEV)
        steps = {"contiguous": lambda: dense.decode(q, kc, vc, seqlens),
                 "paged": lambda: dense.decode(q, kp, vp, seqlens, page_table=table)}
        fns = {**{f"{k}_eager": f for k, f in steps.items()},
               **({} if SMOKE else {f"{k}_graph": captured(f).replay for k, f in steps.items()}),
               # dense decode's other criterion: at least SDPA's speed over the same whole cache
               "sdpa_whole_cache": lambda: torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)}
        times = {k: median(v) for k, v in interleaved(fns, med, rounds=3).items()}
        mode = "eager" if SMOKE else "graph"
        row = {"pattern": "causal", "N": n, "B": B, "Nq": 1, "ms": times,
               "paged_over_contiguous": times[f"paged_{mode}"] / times[f"contiguous_{mode}"],
               "sdpa_over_contiguous_eager": times["sdpa_whole_cache"] / times["contiguous_eager"],
               "max_diff": (steps["paged"]().float() - steps["contiguous"]().float()).abs().max().item()}
        res["paged"].append(row)
        print(f"paged N={n} B={B:2d}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in times.items()) +
              f"  paged/contiguous {row['paged_over_contiguous']:.2f}", flush=True)
        save()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    tune_dense(res, save)


def host_profile(step: Any, calls: int = 300) -> list[list[Any]]:
    """cProfile of `calls` eager steps (no sync between them): the 25 functions with the most own time, as
    [function, calls, own seconds per step, cumulative seconds per step]."""
    import cProfile
    import pstats

    step()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    sync()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = [[f"{f[0].rsplit('/', 2)[-1]}:{f[1]}:{f[2]}", v[1], v[2] / calls, v[3] / calls] for f, v in stats.items()]
    return sorted(rows, key=lambda r: -r[2])[:25]


def tune_dense(res: dict[str, Any], save: Any) -> None:
    """Dense causal decode at 128k, batch 8 and 1, over the kernel's key block, splits, warps, stages and loads
    (`decode_*` options; 0: the defaults), graph-replayed beside SDPA over the whole cache and the tuner's
    own pick (`default`): what settles the defaults where dense decode must reach SDPA's speed. Skipped per
    batch when the deadline is near."""
    res["tune_dense"] = []
    dense = P.compile("pattern p = causal\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
    n = CONTEXTS[2] if len(CONTEXTS) > 2 else CONTEXTS[0]
    grid = [(64, 0, 0, 0, 0), (64, 2, 0, 0, 1)] if SMOKE else [
        (block, splits, warps, stages, tma) for block in (64, 128) for splits in (0, 2, 16)
        for warps in (4, 8) for stages in (0, 4) for tma in (0, 1)]
    for B in BATCHES if SMOKE else (8, 1):  # B=32's step (5 ms) would take the sweep's whole time
        if left() < 30:
            res["notes"].append(f"tune_dense B={B}: deadline, skipped")
            continue
        kc, vc, q, seqlens = full_cache(B, n)
        want = dense.decode(q, kc, vc, seqlens).float()
        fns: dict[str, Any] = {"sdpa_whole_cache": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, kc, vc, enable_gqa=True)}
        fns["default"] = functools.partial(dense.decode, q, kc, vc, seqlens)  # the tuner's pick
        if not SMOKE:
            fns["default"] = captured(fns["default"]).replay
        for block, splits, warps, stages, tma in grid:
            def step(block: int = block, splits: int = splits, warps: int = warps, stages: int = stages,
                     tma: int = tma) -> Any:
                with dense.options(decode_block=block, decode_splits=splits, decode_warps=warps, decode_stages=stages,
                                   decode_tma=tma):
                    return dense.decode(q, kc, vc, seqlens)
            name = f"b{block}_s{splits}_w{warps}_st{stages}_tma{tma}"
            try:
                if (step().float() - want).abs().max().item() > 2e-2:
                    res["notes"].append(f"tune_dense B={B} {name}: output differs from the default's")
                    continue
                fns[name] = step if SMOKE else captured(step).replay
            except Exception as e:  # noqa: BLE001  (shared memory exceeded, say)
                res["notes"].append(f"tune_dense B={B} {name}: {type(e).__name__}: {str(e)[:120]}")
        times = {k: median(v) for k, v in interleaved(fns, med, rounds=3).items()}
        best = min((k for k in times if k not in ("sdpa_whole_cache", "default")), key=times.__getitem__)
        reads = B * HKV * n * D * 2 * torch.empty((), dtype=DT).element_size()
        res["tune_dense"].append({"N": n, "B": B, "bytes_kv": reads, "ms": times, "best": best,
                                  "default": times.get("default"),
                                  "best_over_sdpa": times["sdpa_whole_cache"] / times[best]})
        print(f"tune_dense B={B}: best {best} {times[best]:.3f} ms ({reads / times[best] / 1e6:.0f} GB/s), default "
              f"(tuned) {times['default']:.3f}, SDPA {times['sdpa_whole_cache']:.3f}", flush=True)
        save()
        if DEV == "cuda":
            torch.cuda.empty_cache()


SWEEP_AT = [("causal", 131072 if not SMOKE else 256, 8 if not SMOKE else 2), ("swa_sink", 131072 if not SMOKE else 256, 1)]


def sweep(res: dict[str, Any], save: Any) -> None:
    """The decode kernel's key block and split count around the defaults (`decode_block`, `decode_splits`
    options), graph-replayed, at a dense and a windowed case: what settles the heuristics."""
    res["sweep"] = []
    for name, n, B in SWEEP_AT:
        if left() < 40:
            res["notes"].append(f"sweep {name}: deadline, skipped")
            continue
        attn = P.compile(f"pattern p = {PATTERNS[name][0]}\n", **({"block_m": 16, "block_n": 16} if SMOKE else {}))
        kc, vc, q, seqlens = full_cache(B, n)
        fns: dict[str, Any] = {}
        for block in (32, 64, 128) if not SMOKE else (16,):
            for splits in (0, 1, 2, 4, 8, 16, 32, 64) if not SMOKE else (0, 2):
                def step(block: int = block, splits: int = splits) -> Any:
                    with attn.options(decode_block=block, decode_splits=splits):
                        return attn.decode(q, kc, vc, seqlens)
                try:
                    fns[f"block{block}_splits{splits}"] = step if SMOKE else captured(step).replay
                except Exception as e:  # noqa: BLE001  (a block too large for shared memory, say)
                    res["notes"].append(f"sweep {name} block {block} splits {splits}: {type(e).__name__}: {str(e)[:120]}")
        times = interleaved(fns, med, rounds=3)
        reads = keys_read(attn, n, 1) * B * HKV * D * 2 * torch.empty((), dtype=DT).element_size()
        res["sweep"].append({"pattern": name, "N": n, "B": B, "Nq": 1, "bytes_kv": reads,
                             "ms": {k: median(v) for k, v in times.items()}})
        save()


if __name__ == "__main__":
    main()
