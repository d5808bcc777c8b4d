"""FlexAttention's BlockMask two ways, side by side in one process: `attn.to_flex_block_mask(N)` (from the
analytic tables) and Flex's own `create_block_mask` (the mask_mod evaluated over every block, compiled), at
N = 64k, 256k and 1M, block 128, on the GPU. Each build starts from empty table caches (the first time a user
asks); the median of interleaved rounds. A small N checks the two masks list the same blocks.

    python benchmarks/bench_flex_mask.py OUT.json [--rounds 5] [--max-n 1048576]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask

import patterndsl as P
from patterndsl.runtime import tables

sys.path.insert(0, str(Path(__file__).parent))
from runinfo import run_info  # noqa: E402


def _causal_window_sink(w: int, s: int) -> Callable[..., Any]:
    def mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return (q >= k) & ((q - k <= w) | (k < s))
    return mod


def _causal_window(w: int) -> Callable[..., Any]:
    def mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return (q >= k) & (q - k <= w)
    return mod


def _longformer(w: int, g: int) -> Callable[..., Any]:
    def mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return ((q - k).abs() <= w) | (q < g) | (k < g)
    return mod


def _causal(b: Any, h: Any, q: Any, k: Any) -> Any:
    return q >= k


# (name, patterndsl source, the mask_mod a Flex user writes by hand)
CASES = [
    ("streaming_w1023_s4", "causal & (window(1023) | sink(4))", _causal_window_sink(1023, 4)),
    ("causal_window_4095", "causal & window(4095)", _causal_window(4095)),
    ("longformer_256_g16", "window(256) | global(0:16)", _longformer(256, 16)),
    ("causal", "causal", _causal),
]


def _timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _ours(attn: Any, n: int) -> Any:
    tables._TABLES.clear()  # a cold build: what the first call at this length pays
    tables._TABLES_T.clear()
    return attn.to_flex_block_mask(n, device="cuda")


def _rows(counts: Any, indices: Any) -> list[list[int]]:
    c, i = counts[0, 0].cpu(), indices[0, 0].cpu()
    return [sorted(i[r, : int(c[r])].tolist()) for r in range(c.numel())]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-n", type=int, default=1 << 20)
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    for name, src, mod in CASES:
        attn = P.compile(f"pattern p = {src}\n")
        small = attn.to_flex_block_mask(4096, device="cuda")
        ref = create_block_mask(mod, None, None, 4096, 4096, device="cuda")
        same = all(_rows(getattr(small, f"{s}_num_blocks"), getattr(small, f"{s}_indices")) ==
                   _rows(getattr(ref, f"{s}_num_blocks"), getattr(ref, f"{s}_indices"))
                   for s in ("kv", "full_kv", "q", "full_q"))
        for n in (1 << 16, 1 << 18, 1 << 20):
            if n > args.max_n:
                continue
            _ours(attn, n)  # warm-up: CUDA kernels of the table build, Flex's compile of the mask_mod
            create_block_mask(mod, None, None, n, n, device="cuda", _compile=True)
            ours: list[float] = []
            flex: list[float] = []
            for _ in range(args.rounds):
                ours.append(_timed(lambda a=attn, m=n: _ours(a, m)))
                flex.append(_timed(lambda f=mod, m=n: create_block_mask(f, None, None, m, m, device="cuda",
                                                                        _compile=True)))
            bm = _ours(attn, n)
            row = {"pattern": name, "source": src, "n": n, "block": 128, "same_blocks_at_4096": same,
                   "ours_ms": 1e3 * statistics.median(ours), "create_block_mask_ms": 1e3 * statistics.median(flex),
                   "ours_index_bytes": sum(t.numel() * t.element_size() for t in
                                           (bm.kv_indices, bm.full_kv_indices, bm.q_indices, bm.full_q_indices))}
            row["speedup"] = row["create_block_mask_ms"] / row["ours_ms"]
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.write_text(json.dumps({"run": run_info(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
