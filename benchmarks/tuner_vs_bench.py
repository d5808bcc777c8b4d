# ruff: noqa: B023  (the timing lambda runs inside its loop iteration)
"""Does the forward tuner rank its candidates as the benchmarks do? On the GPU, one run, per pattern of
bench_forward: each TUNE_CONFIGS candidate timed the tuner's way (`_time_ms`: back-to-back launches, warm L2)
and do_bench's way (L2 flushed, median), then the tuner's pick from an empty cache, twice, with its do_bench
time. Writes tuner_vs_bench_h100.json to argv[1]. Env: BENCH_ONLY (pattern names)."""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time

import bench_forward as bf
import torch
from runinfo import run_info

import patterndsl as P


def main() -> None:
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    names = [p[0] for p in bf.PATTERNS if not only or p[0] in only]
    t0 = time.perf_counter()
    bf.warm_all(names, 12)
    print(f"warm-up compile {time.perf_counter() - t0:.0f} s", flush=True)
    q, k, v = (torch.randn(bf.B, bf.H, bf.N, bf.D, device="cuda", dtype=bf.DT) for _ in range(3))
    res = []
    for name, src, _, _ in bf.PATTERNS:
        if name not in names:
            continue
        rows = []
        for cfg, sw in bf.variants(name):
            mod = bf.build(src, cfg, sw)
            fn = functools.partial(mod.attention, q, k, v)
            fn()
            tuner, bench = mod._time_ms(fn, 5), bf.med(fn)
            rows.append({"variant": bf.label(cfg, sw), "tuner_ms": tuner, "do_bench_ms": bench})
            print(f"{name:22s} {bf.label(cfg, sw):60s} tuner {tuner:.4f}  do_bench {bench:.4f}", flush=True)
        picks = []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as d:
                os.environ["PATTERNDSL_CACHE_DIR"] = d
                m = P.compile(f"pattern p = {src}\n")
                m._TUNED.clear()
                m.attention(q, k, v)
                t = bf.med(lambda: m.attention(q, k, v))
                picks.append({"config": list(m.LAST_CONFIG), "do_bench_ms": t})
                print(f"{name:22s} tuner pick {m.LAST_CONFIG}  do_bench {t:.4f}", flush=True)
        res.append({"pattern": name, "candidates": rows, "picks": picks})
    with open(os.path.join(sys.argv[1], "tuner_vs_bench_h100.json"), "w") as f:
        json.dump({**run_info(), "forward": res}, f, indent=1)


if __name__ == "__main__":
    main()
