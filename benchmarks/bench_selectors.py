# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Dynamic selection end to end on the GPU: the NSA-like `causal & (window(511) | topk(16, block=64) | sink(64))`.

B=1, H=16, D=128, bf16, N = 32768, 65536, 131072. Ours end to end = pooling + block scores + top-k +
per-(batch, head) tables + attention, one `attention(q, k, v)` call. Against dense causal SDPA and against
FlexAttention given the same selected blocks (its BlockMask built from our selection with
`BlockMask.from_kv_blocks`, that build included in its time; selection itself shared, counted too).
Writes JSON to argv[1] (default docs/benchmarks/) after every measurement; prints a table.
Env: BENCH_BUDGET_S (default 110) skips what would start after that many seconds; BENCH_NS picks the N;
BENCH_TOPK_ROWS sets the fused top-k kernel's query blocks per program (the topk_rows option).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import torch
import triton

import patterndsl as P
from patterndsl.runtime import forward
from patterndsl.runtime.common import _heads
from patterndsl.runtime.options import current_options
from patterndsl.runtime.selection import _dynamic_tables, _pooled, _sel_dense, _selection
from patterndsl.runtime.tables import block_tables

B, H, D = 1, 16, 128
NS = [int(x) for x in os.environ.get("BENCH_NS", "32768,65536,131072").split(",")]
SRC = "causal & (window(511) | topk(16, block=64) | sink(64))"
BLK = 64
DT = torch.bfloat16
T0 = time.perf_counter()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "110"))


def med(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def left() -> float:
    return BUDGET - (time.perf_counter() - T0)


def dense_blocks(off, idx, rows, cols):
    out = torch.zeros((rows, cols), dtype=torch.bool, device=off.device)
    r = torch.repeat_interleave(torch.arange(rows, device=off.device), (off[1:] - off[:-1]).long())
    out[r, idx.long()] = True
    return out


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(meta: dict, rows: list[dict]) -> str:
    """The table of docs/benchmarks/selectors_h100.md."""
    out = [
        f"# Dynamic selection end to end ({meta['gpu']}, {meta['date']}, torch {meta['torch']}, "
        f"triton {meta['triton']})",
        "",
        f"`{meta['pattern']}`, B={B}, H={H}, D={D}, bf16, random normal q, k, v. Median of "
        "`triton.testing.do_bench`. Ours = one `attention(q, k, v)` call: block means + block scores + "
        "top-16 + per-(batch, head) tables + attention. Pool = the block means alone; selection = pool + "
        "scores + top-16 (`_selection`); tables = the merge with the static part's (`_dynamic_tables`). "
        "Flex = `BlockMask.from_kv_blocks` built from the same selected blocks (selection included) + "
        "compiled `flex_attention` (64 x 64 blocks). Attention alone = the same call with that selection and its "
        "tables handed in; ours minus it is what selection and tables add inside a call (timed apart, each of their "
        "small launches also waits for the host after do_bench's cache flush, which inside a call overlaps the "
        "GPU's work).",
        "",
        "| N | ours ms | pool ms | selection ms | tables ms | selection + tables ms | share of ours "
        "| attention alone ms | added inside the call | dense causal SDPA ms | SDPA / ours | Flex total ms "
        "| Flex mask build ms | Flex attention ms | Flex / ours | rel. err vs Flex |",
        "| --- " * 16 + "|",
    ]
    for r in rows:
        if "speedup_vs_sdpa" not in r:
            continue
        att, inside = r.get("attention_only_ms"), r.get("in_call_share")
        cells = [
            str(r["N"]), _f(r["ours_ms"]), _f(r["pool_ms"]), _f(r["selection_ms"]), _f(r["tables_ms"]),
            _f(r["selection_and_tables_ms"]), _f(100 * r["selection_share"], ".1f") + "%", _f(att),
            "-" if inside is None else _f(100 * inside, ".1f") + "%",
            _f(r["sdpa_causal_ms"]), _f(r["speedup_vs_sdpa"], ".2f"), _f(r.get("flex_ms")),
            _f(r.get("flex_mask_build_ms")), _f(r.get("flex_attention_ms")), _f(r.get("flex_over_ours"), ".2f"),
            _f(r.get("rel_err_vs_flex"), ".1e"),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    visited = [
        f"{r['visited_tiles_per_head']:.0f} of {r['dense_causal_tiles_per_head']} causal at N = {r['N']}"
        for r in rows
        if "visited_tiles_per_head" in r
    ]
    out += ["", "Visited 64 x 64 tiles per head: " + ", ".join(visited) + "."]
    notes = [f"N = {r['N']}: {r['flex_note']}" for r in rows if r.get("flex_note")]
    if notes:
        out += ["", "Flex: " + "; ".join(notes) + "."]
    return "\n".join(out) + "\n"


def main() -> None:
    attn = P.compile(f"pattern nsa = {SRC}\n")
    rows = int(os.environ.get("BENCH_TOPK_ROWS", current_options().topk_rows))  # query blocks per top-k program
    with attn.options(topk_rows=rows):  # every call below, ours and the selection Flex is given
        run(attn)


def run(attn) -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"
    os.makedirs(outdir, exist_ok=True)
    dev = torch.device("cuda")
    spec = attn.spec
    heads = _heads(0, 0, H, dev)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "pattern": SRC,
        "shape": {"B": B, "H": H, "D": D, "dtype": str(DT)},
    }
    rows: list[dict] = []

    def dump() -> None:
        with open(os.path.join(outdir, "selectors_h100.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(outdir, "selectors_h100.md"), "w") as f:
            f.write(markdown(meta, rows))

    data = {}
    for n in NS:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=DT) for _ in range(3))
        data[n] = (q, k, v)
        row: dict = {"N": n}
        rows.append(row)
        out = attn(q, k, v)
        row["ours_ms"] = med(lambda: attn(q, k, v))
        row["pool_ms"] = med(lambda: _pooled(q, k, BLK))
        row["selection_ms"] = med(lambda: _selection(spec, 0, q, k, None, heads, 1))
        sel = _selection(spec, 0, q, k, None, heads, 1)
        row["tables_ms"] = med(lambda: _dynamic_tables(spec, 0, sel, B, H, n, BLK, BLK, dev))
        row["selection_and_tables_ms"] = med(
            lambda: _dynamic_tables(spec, 0, _selection(spec, 0, q, k, None, heads, 1), B, H, n, BLK, BLK, dev)
        )
        row["selection_share"] = row["selection_and_tables_ms"] / row["ours_ms"]
        # the same call with this selection and its tables handed in: the attention kernel alone, so ours minus
        # this is what selection and tables add inside a call (where their launches overlap the GPU's work;
        # timed apart, each small launch waits for the host after do_bench's cache flush)
        tabs = _dynamic_tables(spec, 0, sel, B, H, n, BLK, BLK, dev)
        keep = forward._selection, forward._dynamic_tables  # what the forward launch calls them by
        forward._selection, forward._dynamic_tables = (lambda *a, **kw: sel), (lambda *a, **kw: tabs)
        try:
            row["attention_only_ms"] = med(lambda: attn(q, k, v))
        finally:
            forward._selection, forward._dynamic_tables = keep
        row["in_call_share"] = (row["ours_ms"] - row["attention_only_ms"]) / row["ours_ms"]
        f_off, f_idx, p_off, p_idx = tabs
        visited = int(f_off[-1]) + int(p_off[-1])
        row["visited_tiles_per_head"] = visited / H
        row["dense_causal_tiles_per_head"] = (n // BLK) * (n // BLK + 1) // 2
        row["sdpa_causal_ms"] = med(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        row["speedup_vs_sdpa"] = row["sdpa_causal_ms"] / row["ours_ms"]
        row["finite"] = bool(torch.isfinite(out).all())
        print(
            f"N={n:6d} ours {row['ours_ms']:8.3f} ms (selection+tables {row['selection_and_tables_ms']:.3f} ms, "
            f"{100 * row['selection_share']:.1f}%: pool {row['pool_ms']:.3f}, selection {row['selection_ms']:.3f}, "
            f"tables {row['tables_ms']:.3f}) | sdpa causal {row['sdpa_causal_ms']:8.3f} ms | "
            f"x{row['speedup_vs_sdpa']:.2f} | attention alone {row['attention_only_ms']:.3f} ms: selection + tables "
            f"add {100 * row['in_call_share']:.1f}% inside the call",
            flush=True,
        )
        dump()
    # FlexAttention on the same selected blocks (compiles once per N: runs while the budget lasts)
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as e:  # pragma: no cover
        meta["flex_error"] = repr(e)
        dump()
        return
    flex = torch.compile(flex_attention, dynamic=False)
    for row in rows:
        n = row["N"]
        if left() < 40:
            row["flex_ms"] = None
            row["flex_note"] = "skipped: benchmark time budget"
            dump()
            continue
        q, k, v = data[n]
        nb = -(-n // BLK)
        s_off, s_idx, sp_off, sp_idx = block_tables(spec, n, BLK, BLK, dev, 0)  # static part P0
        full0 = dense_blocks(s_off, s_idx, nb, nb)
        part0 = dense_blocks(sp_off, sp_idx, nb, nb)
        qi = torch.arange(nb, device=dev)

        def build():
            sel = _sel_dense(_selection(spec, 0, q, k, None, heads, 1), nb).view(B, H, nb, nb)
            full1 = qi[None, :] < qi[:, None]
            full = (sel & full1) | (~sel & full0)
            part = ((sel & (qi[None, :] == qi[:, None])) | (~sel & part0)) & ~full

            def mm(b, h, qq, kk):
                return (kk <= qq) & ((qq - kk <= 511) | (kk < 64) | sel[b, h, qq // BLK, kk // BLK])

            def lists(x):
                cnt = x.sum(-1, dtype=torch.int32)
                idx = torch.argsort(x.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
                return cnt, idx

            kvn, kvi = lists(part)
            fn, fi = lists(full)
            return BlockMask.from_kv_blocks(kvn, kvi, fn, fi, BLOCK_SIZE=BLK, mask_mod=mm)

        try:
            t0 = time.perf_counter()
            bm = build()
            fo = flex(q, k, v, block_mask=bm, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})
            torch.cuda.synchronize()
            row["flex_compile_s"] = time.perf_counter() - t0
            ours = attn(q, k, v)
            row["rel_err_vs_flex"] = ((ours.float() - fo.float()).norm() / fo.float().norm()).item()
            row["flex_mask_build_ms"] = med(build)
            row["flex_attention_ms"] = med(
                lambda: flex(q, k, v, block_mask=bm, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})
            )
            row["flex_ms"] = row["flex_mask_build_ms"] + row["flex_attention_ms"]
            row["flex_over_ours"] = row["flex_ms"] / row["ours_ms"]
            print(
                f"N={n:6d} flex {row['flex_ms']:8.3f} ms (mask build incl. selection {row['flex_mask_build_ms']:.3f} ms) "
                f"| flex/ours {row['flex_over_ours']:.2f} | rel err {row['rel_err_vs_flex']:.1e}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001  (record, keep the other numbers)
            row["flex_ms"] = None
            row["flex_note"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"N={n} flex failed: {row['flex_note']}", flush=True)
        dump()


if __name__ == "__main__":
    main()
