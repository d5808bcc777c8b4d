# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Short sequences with and without host time, on the GPU, one run: a forward+backward step of each 1-D
benchmark pattern at N = 4096 (BENCH_NS), D = 64 and 128, as launched eagerly and as a replayed CUDA graph
(`torch.cuda.graph`, what torch.compile's "reduce-overhead" mode does), ours and torch.compile'd
FlexAttention's, timed in interleaved rounds. Eagerly these steps are bound by host time (docs/perf-notes.md);
replayed, only the kernels count.

Writes graphs_h100.json and graphs_h100.md to argv[1]. Env: BENCH_NS, BENCH_ONLY (pattern names).
"""

from __future__ import annotations

import json
import os
import sys
from statistics import median

import torch
from bench_forward import PATTERNS, side_by_side
from report import graphs_section
from runinfo import captured, run_info
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import patterndsl as P

B, H = 1, 16
DT = torch.bfloat16


def cell(name: str, src: str, mm, n: int, d: int, flex) -> dict:
    mod = P.compile(f"pattern p = {src}\n")
    q, k, v, do = (torch.randn(B, H, n, d, device="cuda", dtype=DT) for _ in range(4))
    qkv = [t.requires_grad_() for t in (q, k, v)]
    bm = create_block_mask(mm, None, None, n, n, device="cuda")

    def ours(q, k, v, do):
        return torch.autograd.grad(mod.attention(q, k, v), (q, k, v), do)

    def theirs(q, k, v, do):
        return torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do)

    row: dict = {"pattern": name, "N": n, "D": d}
    fns = {"ours": lambda: ours(*qkv, do), "flex": lambda: theirs(*qkv, do)}
    for who, step in (("ours", ours), ("flex", theirs)):
        try:
            graph = captured(lambda step=step: step(*qkv, do), warmups=3)
            fns[f"{who}_graph"] = graph.replay
        except Exception as e:  # noqa: BLE001 (a peer that cannot be captured is reported, not fatal)
            row[f"{who}_graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rounds = side_by_side(fns)
    row["rounds_ms"] = rounds
    row.update({f"{k}_ms": median(t) for k, t in rounds.items()})
    return row


def write_markdown(res: dict, path: str) -> None:
    lines = [f"# {graphs_section(res)[0][3:]}", *graphs_section(res)[1:]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"
    os.makedirs(outdir, exist_ok=True)
    ns = [int(x) for x in os.environ.get("BENCH_NS", "4096").split(",")]
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 4096
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name, src, mm, _ in PATTERNS:
        if only and name not in only:
            continue
        for d in (64, 128):
            for n in ns:
                row = cell(name, src, mm, n, d, flex)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "rounds_ms"}), flush=True)
                res = {**run_info(), "rows": rows}
                with open(os.path.join(outdir, "graphs_h100.json"), "w") as f:
                    json.dump(res, f, indent=1)
                write_markdown(res, os.path.join(outdir, "graphs_h100.md"))


if __name__ == "__main__":
    main()
