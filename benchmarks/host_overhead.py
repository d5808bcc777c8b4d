# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Where a forward+backward step's time goes that no kernel accounts for, on the GPU, one run.

For each pattern: the step as the benchmarks time it (`do_bench`, which empties L2 and starts its clock
before every call, so host work ahead of the first launch counts), the sum of the step's kernel times (the
profiler), the host time of one step when nothing waits on the GPU (a burst of steps after a sync), and
whether the step synchronizes with the GPU anywhere (`torch.cuda.set_sync_debug_mode`). Then a cProfile of
the host side of the window's steps, the top functions by own time. Writes host_overhead.json to argv[1].
Env: BENCH_N (16384), BENCH_D (128), BENCH_ONLY (pattern names), BENCH_PROFILE (the pattern to cProfile),
BENCH_PROFILE_PASS (fwd: profile the forward alone instead of the step).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
import warnings

import torch
from bench_forward import DT, PATTERNS, B, H, med
from runinfo import run_info

import patterndsl as P

N = int(os.environ.get("BENCH_N", "16384"))  # short sequences expose host time the most
D = int(os.environ.get("BENCH_D", "128"))


def kernel_ms(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / 5


def host_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


def syncs(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sorted({str(w.message)[:160] for w in caught})


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=DT) for _ in range(4))
    qkv = [t.requires_grad_() for t in (q, k, v)]
    only = [x for x in os.environ.get("BENCH_ONLY", "causal,sliding_window_1024,power_b64").split(",") if x]
    rows = []
    for name, src, _mm, _causal in PATTERNS:
        if name not in only:
            continue
        mod = P.compile(f"pattern p = {src}\n")
        def step() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(mod.attention(*qkv), qkv, do)

        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return mod.attention(q, k, v)

        step()
        row = {"pattern": name, "step_ms": med(step), "step_kernels_ms": kernel_ms(step),
               "step_host_ms": host_ms(step), "fwd_ms": med(fwd), "fwd_kernels_ms": kernel_ms(fwd),
               "fwd_host_ms": host_ms(fwd), "step_syncs": syncs(step), "fwd_syncs": syncs(fwd)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if name == os.environ.get("BENCH_PROFILE", "sliding_window_1024"):
            prof = cProfile.Profile()
            prof.enable()
            what = fwd if os.environ.get("BENCH_PROFILE_PASS") == "fwd" else step
            for _ in range(50):
                what()
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
            print(s.getvalue()[-6000:], flush=True)
            row["profile"] = s.getvalue()[-12000:]  # kept in the JSON: a call's output tail is too short for it
    with open(os.path.join(outdir, "host_overhead_h100.json"), "w") as f:
        json.dump({**run_info(), "shape": {"B": B, "H": H, "N": N, "D": D}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
