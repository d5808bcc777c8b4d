"""The dK/dV kernel's heavy key blocks split over several programs (`bwd_split`), on the GPU: forward and
forward+backward with the automatic split (the default) against `bwd_split=0` (every key block in one
program), in one run on one card.

B=1, N = 16384 and 65536 (BENCH_NS), D=128, bf16, random normal inputs. Cases: NSA's selected branch (64 query heads
over 4 KV heads, `causal & (sink(64) | window(63) | topk(16, block=64, score=compressed, share=kv))`), its
static part alone (the sink's key block read by every query block of 16 heads), and Longformer (16 heads,
`window(256) | global(0:16)`). Per case and setting: the medians of `triton.testing.do_bench` and, from
one instrumented backward, the dK/dV rows' work in tile iterations (query blocks times the group's heads):
the heaviest row, the mean, and the heaviest program after the split. Writes JSON to argv[1] (default
benchmarks/results/bwd_split.json) after every case.
Run: python benchmarks/bench_bwd_split.py OUT.json
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import triton
from runinfo import run_info

import patterndsl as P

D = 128
NS = [int(x) for x in os.environ.get("BENCH_NS", "16384,65536").split(",")]
CASES = {
    "nsa_selected": ("causal & (sink(64) | window(63) | topk(16, block=64, score=compressed, share=kv))", 64, 4),
    "sink_window": ("causal & (window(63) | sink(64))", 64, 4),
    "longformer": ("window(256) | global(0:16)", 16, 16),
}


def med(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median"))


@contextlib.contextmanager
def split_work() -> Iterator[list[dict[str, Any]]]:
    """Inside the block, each dK/dV launch's row work as the split saw it: heaviest row, mean row, chunk
    (tile iterations per piece), programs per key block and the bound on the heaviest program, the larger
    of the chunk and the heaviest row over its programs (computed, not timed; one device read per launch).
    With `bwd_split=0` only the bound the split was decided on. The static splits' cache is emptied first,
    so that they are planned again in the block."""
    from patterndsl.runtime import backward

    log: list[dict[str, Any]] = []
    real_slots, real_chunk, real_args = backward._slots, backward._split_chunk, backward._split_args
    backward._SPLITS.clear()

    def slots(work: torch.Tensor, chunk: int, cap: int) -> torch.Tensor:
        top = int(work.max())
        log.append({"top": top, "mean": float(work.float().mean()), "chunk": chunk, "cap": cap})
        return real_slots(work, chunk, cap)

    def chunk_of(mean: float, top: int) -> int:
        got = real_chunk(mean, top)
        if got == 0:
            log.append({"bound_top": top, "bound_mean": mean, "chunk": 0})
        return got

    def args(split: Any, *rest: Any) -> Any:
        if split is not None and log:  # the heaviest program: a piece of max(chunk, top / programs per row)
            log[-1]["programs_per_row"] = split.chunks
            log[-1]["heaviest_piece_bound"] = max(split.chunk, -(-log[-1]["top"] // split.chunks))
        return real_args(split, *rest)

    backward._slots, backward._split_chunk, backward._split_args = slots, chunk_of, args
    try:
        yield log
    finally:
        backward._slots, backward._split_chunk, backward._split_args = real_slots, real_chunk, real_args


def measure(name: str, src: str, hq: int, hkv: int, n: int) -> dict[str, Any]:
    attn = P.compile(f"pattern p = {src}\n")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, hq, n, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(1, hkv, n, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    do = torch.randn_like(q)
    row: dict[str, Any] = {"case": name, "pattern": src, "N": n, "HQ": hq, "HKV": hkv}
    for label, split in (("whole", 0), ("split", None)):
        with attn.options(bwd_split=split):
            with torch.no_grad():
                row[f"{label}_fwd_ms"] = med(lambda: attn.attention(q, k, v))
            row[f"{label}_fwd_bwd_ms"] = med(lambda: torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do))
            row[f"{label}_bwd_ms"] = row[f"{label}_fwd_bwd_ms"] - row[f"{label}_fwd_ms"]
            with split_work() as log:
                torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do)
                torch.cuda.synchronize()
            row[f"{label}_work"] = log
    row["bwd_speedup"] = row["whole_bwd_ms"] / row["split_bwd_ms"]
    return row


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bwd_split.json"
    rows: list[dict[str, Any]] = []
    for n in NS:
        for name, (src, hq, hkv) in CASES.items():
            rows.append(measure(name, src, hq, hkv, n))
            torch.cuda.empty_cache()
            with open(path, "w") as f:
                json.dump({"meta": {**run_info(), "D": D, "dtype": "bfloat16"}, "rows": rows}, f, indent=1)
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
