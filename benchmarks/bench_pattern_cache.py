"""PatternKVCache as the context grows: memory kept, host time of an append, whether it synchronizes, and (where
`attn.decode` exists) the time of a decode step through its pages. One run, JSON to argv[1].

For each pattern and context length the cache is filled in chunks of BENCH_CHUNK tokens (the chunk's queries
would attend after each), then one-token appends are timed on the host with nothing waiting on the GPU, and
checked with `torch.cuda.set_sync_debug_mode` for a synchronizing call. Dense attention runs with max_seqlen
set (no reallocation while filling). Env: BENCH_NS (8192,32768,131072,524288), BENCH_B (8), BENCH_HKV (8),
BENCH_H (32), BENCH_D (128), BENCH_CHUNK (4096), BENCH_DEVICE (cuda; cpu for a dry run at small sizes).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from runinfo import host_ms, run_info

import patterndsl as P
from patterndsl.cache import PatternKVCache

PATTERNS = {"streaming_1023_4": "causal & (window(1023) | sink(4))", "dense_causal": "causal"}
NS = [int(x) for x in os.environ.get("BENCH_NS", "8192,32768,131072,524288").split(",")]
B, HKV, H, D = (int(os.environ.get(f"BENCH_{k}", v)) for k, v in (("B", "8"), ("HKV", "8"), ("H", "32"), ("D", "128")))
CHUNK = int(os.environ.get("BENCH_CHUNK", "4096"))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
DT = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def _host_ms(fn: Any) -> float:
    return host_ms(fn, _sync)


def _syncs(fn: Any) -> list[str]:
    if DEVICE != "cuda":
        return []
    from host_overhead import syncs

    return syncs(fn)


def _decode_ms(attn: Any, cache: PatternKVCache) -> float | None:
    if not hasattr(attn, "decode"):
        return None
    q = torch.randn(B, H, 1, D, dtype=DT, device=DEVICE)

    def step() -> Any:
        return attn.decode(q, cache.k_pages, cache.v_pages, cache.cache_seqlens, page_table=cache.page_table)

    if DEVICE != "cuda":
        step()
        return None
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=10, rep=50))


def measure(name: str, src: str, n: int) -> dict[str, Any]:
    before = _allocated()
    cache = PatternKVCache(src, batch=B, kv_heads=HKV, head_dim=D, max_append=CHUNK, dtype=DT, device=DEVICE,
                           max_seqlen=n + 1024 if name.startswith("dense") else None)  # fmt: skip
    chunk = torch.randn(B, HKV, CHUNK, D, dtype=DT, device=DEVICE)
    while cache.length + CHUNK <= n:
        cache.append(chunk, chunk)
    if cache.length < n:
        rest = chunk[:, :, : n - cache.length]
        cache.append(rest, rest)
    _sync()
    one = torch.randn(B, HKV, 1, D, dtype=DT, device=DEVICE)
    row: dict[str, Any] = {
        "pattern": name, "source": src, "context": n, "page_size": cache.page_size,
        "memory_bytes": cache.memory_bytes(), "table_bytes": cache.page_table.nbytes,
        "allocated_bytes": _allocated() - before, "retained": cache.retention.text(),
        "append_1_host_ms": _host_ms(lambda: cache.append(one, one)),
        "append_syncs": _syncs(lambda: cache.append(one, one)),
    }  # fmt: skip
    attn = P.compile(f"pattern p = {src}\n")
    row["decode_step_ms"] = _decode_ms(attn, cache)
    return row


def main() -> None:
    out = sys.argv[1]
    rows = []
    for name, src in PATTERNS.items():
        for n in NS:
            rows.append(measure(name, src, n))
            print(json.dumps(rows[-1]), flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"run": run_info(), "B": B, "Hkv": HKV, "H": H, "D": D, "dtype": str(DT), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
