# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Permuted patterns on the GPU, one run: what a caller-given order costs, and PBS-Attn end to end.

1. The order's own cost: `permute(causal & window(1023), segment=256, by=given)` called with a random
   permutation of every segment vs the same pattern without permute (the difference is the gathers of q,
   k, v and of the results, and the permutation's check).
2. PBS-Attn (patterns/pbs_attn.pat: keys permuted within segments of 256, the first block and the 90%-mass
   blocks of 64 of earlier segments, the own segment causal), its two patterns merged by log-sum-exp, vs
   dense causal SDPA; keys ordered per segment by the mass the last query block gives them, as the paper
   orders them (the ordering itself is not timed).

B=1, H=32 (8 KV heads), D=128, bf16, N = 32768. Forward and forward + backward; median of
`triton.testing.do_bench`. Writes JSON to argv[1] (default benchmarks/results/permute_h100.json). About a
minute on an H100.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

B, H, HKV, D, N, SEG = 1, 32, 8, 128, 32768, 256
ROOT = Path(__file__).resolve().parent.parent


def key_order(q, k):  # type: ignore[no-untyped-def]
    """Per KV head, each segment's keys sorted by the softmax mass the last 64 queries (first query head of
    the group) give them, most first: [1, HKV, N] absolute positions (PBS-Attn's key permutation)."""
    import torch

    last = q[:, :: H // HKV, -64:].float()  # [1, HKV, 64, D]
    mass = torch.softmax(last @ k.float().transpose(-1, -2) / D**0.5, -1).sum(2)  # [1, HKV, N]
    order = torch.empty(mass.shape, dtype=torch.int64, device=q.device)
    for a in range(0, N, SEG):
        order[..., a : a + SEG] = a + torch.argsort(mass[..., a : a + SEG], dim=-1, descending=True)
    return order


def main() -> None:
    import torch
    import triton
    from runinfo import run_info

    import patterndsl as P
    from patterndsl.runtime.positions import merge

    def med(fn, grads=None) -> float:  # type: ignore[no-untyped-def]
        return float(triton.testing.do_bench(fn, warmup=10, rep=100, grad_to_none=grads, return_mode="median"))

    path = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "benchmarks" / "results" / "permute_h100.json")
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    grads = [q, k, v]
    rows = []

    # 1. the order's own cost
    body = "causal & window(1023)"
    plain = P.compile(f"pattern p = {body}\n")
    permuted = P.compile(f"pattern p = permute({body}, segment={SEG}, by=given)\n")
    perm = torch.stack([torch.randperm(SEG, device="cuda") + a for a in range(0, N, SEG)]).reshape(1, N)
    for name, fn in (("window, plain", lambda: plain(q, k, v)),
                     ("window, permuted (random order)", lambda: permuted(q, k, v, permutation=perm))):
        fn()
        rows.append({"case": name, "fwd_ms": med(fn),
                     "fwd_bwd_ms": med(lambda: fn().backward(do), grads)})

    # 2. PBS-Attn end to end vs dense causal SDPA
    program = P.load(ROOT / "patterns" / "pbs_attn.pat")
    far, near = (P.compile(program, name) for name in ("pbs", "pbs_diagonal"))
    with torch.no_grad():
        order = key_order(q, k)  # per KV head: k and v are gathered once per KV head
    ident = torch.arange(N, device="cuda")[None]

    def pbs():  # type: ignore[no-untyped-def]
        return merge([far(q, k, v, permutation=(ident, order), return_lse=True), near(q, k, v, return_lse=True)])[0]

    def sdpa():  # type: ignore[no-untyped-def]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    kept = far.selected_blocks(q.detach(), k.detach(), permutation=(ident, order)).float().mean().item()
    for name, fn in (("pbs (far + own segment, merged)", pbs), ("dense causal sdpa", sdpa)):
        fn()
        rows.append({"case": name, "fwd_ms": med(fn), "fwd_bwd_ms": med(lambda: fn().backward(do), grads)})
    result = {
        **run_info(),
        "shape": {"B": B, "H": H, "Hkv": HKV, "D": D, "N": N, "segment": SEG, "dtype": "bfloat16"},
        "pbs_selected_block_fraction": kept,
        "rows": rows,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r['case']:40s} fwd {r['fwd_ms']:8.3f} ms  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms")


if __name__ == "__main__":
    main()
