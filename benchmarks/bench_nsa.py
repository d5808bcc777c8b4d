"""NSA's attention layer on the GPU: the three branches (compressed, selected, window) with their gates,
against dense causal SDPA, forward and forward+backward.

B=1, N = 65536 (BENCH_NS), 64 query heads over 4 KV heads (GQA), D=128, bf16, random normal inputs.
Branches: `runtime.compressed_attention` (block means of 64 tokens), the selected branch
`causal & (sink(64) | window(63) | topk(16, block=64, score=compressed, share=kv))` and the window
`causal & window(511)`, mixed by per-head gates as examples/nsa_model.py does (the gates are inputs here,
no projections). SDPA: `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`. Each branch is timed on
its own too, forward and forward+backward (gradients of q, k, v), and the selected branch's selection alone
(`selected_blocks`: scores, picks and a dense block mask), and its scoring kernels alone (`scoring_ms`; with
other tiles `scoring_tiles_ms`). Median of `triton.testing.do_bench`. Writes
JSON to argv[1] (default benchmarks/results/nsa.json) after every measurement; BENCH_BUDGET_S (default 90)
skips a sequence length that would start after that many seconds; BENCH_SCORING_ONLY=1 measures the
selection and the scoring kernels only, BENCH_LAYER_ONLY=1 the layer and SDPA only.
Run: python benchmarks/bench_nsa.py OUT.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from typing import Any

import torch
import triton

import patterndsl as P
from patterndsl.runtime import compressed_attention, selection

B, HQ, HKV, D, BLK = 1, 64, 4, 128, 64
NS = [int(x) for x in os.environ.get("BENCH_NS", "65536").split(",")]
SELECTED = f"causal & (sink({BLK}) | window({BLK - 1}) | topk(16, block={BLK}, score=compressed, share=kv))"
WINDOW = "causal & window(511)"
# the compressed scoring kernels' tiles tried, (query rows, key blocks, warps, pipeline stages), each kernel's
# with the other's at its default (all without spills on sm_90: benchmarks/kernel_resources.py --sel)
TILES = {"compressed_lse_tiles": [(128, 128, 8, 3), (128, 64, 8, 2), (256, 64, 8, 2), (256, 128, 16, 2), (64, 64, 4, 3)],
         "compressed_sum_tiles": [(128, 64, 8, 2), (64, 128, 4, 2), (64, 256, 8, 2), (128, 256, 16, 2), (64, 64, 4, 3)]}
T0 = time.perf_counter()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "90"))
SCORING_ONLY = os.environ.get("BENCH_SCORING_ONLY") == "1"
LAYER_ONLY = os.environ.get("BENCH_LAYER_ONLY") == "1"  # the layer and SDPA only (a short call)


def med(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median"))


def measure(n: int, slc: Any, win: Any) -> dict[str, Any]:
    """One sequence length: the layer and each branch, forward and forward+backward."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    gates = torch.rand(3, B, HQ, n, 1, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn_like(q)

    def nsa() -> torch.Tensor:
        o_cmp, _ = compressed_attention(q, k, v, BLK)
        # the gated sum in three kernels (a product, two fused multiply-adds) rather than five
        mixed = torch.addcmul(gates[0] * o_cmp, gates[1], slc.attention(q, k, v))
        return torch.addcmul(mixed, gates[2], win.attention(q, k, v))

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    row: dict[str, Any] = {"N": n}
    if SCORING_ONLY:
        with torch.no_grad():
            row["selection_ms"] = med(lambda: slc.selected_blocks(q, k))
        return {**row, **scoring(slc, q.detach(), k.detach())}
    for name, fn in (("nsa", nsa), ("sdpa", sdpa)):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = med(fn)
        row[f"{name}_fwd_bwd_ms"] = med(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), do))
    row["speedup_fwd"] = row["sdpa_fwd_ms"] / row["nsa_fwd_ms"]
    row["speedup_fwd_bwd"] = row["sdpa_fwd_bwd_ms"] / row["nsa_fwd_bwd_ms"]
    if LAYER_ONLY:
        return row
    torch.cuda.empty_cache()
    branches = (("compressed", lambda: compressed_attention(q, k, v, BLK)[0]), ("selected", lambda: slc.attention(q, k, v)),
                ("window", lambda: win.attention(q, k, v)))
    for name, fn in branches:
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = med(fn)
        row[f"{name}_fwd_bwd_ms"] = med(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), do))
    with torch.no_grad():  # the selected branch's scoring and picks alone (as a dense block mask)
        row["selection_ms"] = med(lambda: slc.selected_blocks(q, k))
    row.update(scoring(slc, q.detach(), k.detach()))
    return row


def scoring(slc: Any, q: torch.Tensor, k: torch.Tensor) -> dict[str, Any]:
    """The selector's compressed scores alone (key means, the two scoring kernels and the NaN fill off the
    candidates, no picks) for every query
    block: `scoring_ms` with the default tiles, `scoring_tiles_ms` with one kernel's tiles changed ("option=rows,
    key blocks,warps,stages")."""
    rule = slc.spec.selectors[0].all[0]
    heads = torch.arange(HQ, dtype=torch.int32, device=q.device)
    nb = -(-q.shape[2] // BLK)

    def run() -> torch.Tensor:
        return selection._rule_scores(slc.spec, rule, q, k, None, heads, HQ // HKV, 0, nb)

    out: dict[str, Any] = {"scoring_tiles_ms": {}}
    with torch.no_grad():
        out["scoring_ms"] = med(run)
        for option, tried in TILES.items():
            for tiles in tried:
                with slc.options(**{option: tiles}):
                    out["scoring_tiles_ms"][f"{option}={','.join(map(str, tiles))}"] = med(run)
    return out


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/nsa.json"
    slc, win = P.compile(f"pattern slc = {SELECTED}\n"), P.compile(f"pattern win = {WINDOW}\n")
    meta = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "selected": SELECTED, "window": WINDOW,
            "B": B, "HQ": HQ, "HKV": HKV, "D": D, "block": BLK, "dtype": "bfloat16"}
    rows: list[dict[str, Any]] = []
    for n in NS:
        if BUDGET - (time.perf_counter() - T0) < 30:
            break
        rows.append(measure(n, slc, win))
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
