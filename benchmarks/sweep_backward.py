# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Backward tiles on the GPU, one run: each candidate (BM1, BN1, BM2, BN2, warps1, stages1, warps2, stages2) with
and without TMA descriptors, forward + backward step timed, and each backward kernel's own time from the
profiler, so dK/dV's and dQ's tiles can be chosen separately. Gradients are checked against the first
candidate's (the pointer-load default).

    python benchmarks/sweep_backward.py OUTDIR      (SWEEP_D=64 for head_dim 64; SWEEP_SET=grid for the 2-D
    neighborhoods on their token layouts, read in place; a dry run on CPU:
    BENCH_DEVICE=cpu TRITON_INTERPRET=1 SWEEP_N=80 SWEEP_H=2)

Candidates are compiled first in parallel worker processes (Triton's on-disk cache), then timed one by one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from bench_backward import _rel
from bench_forward import Variant, med, variant
from runinfo import run_info

import patterndsl as P

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B = 1
D = int(os.environ.get("SWEEP_D", 128))
H = int(os.environ.get("SWEEP_H", 16))
N = int(os.environ.get("SWEEP_N", 16384))
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
GRID = os.environ.get("SWEEP_SET") == "grid"
PATTERNS = [("causal", "pattern p = causal\n"), ("sliding_window_1024", "pattern p = causal & window(1023)\n")]
# (BM1, BN1, BM2, BN2, warps1, stages1, warps2, stages2), TMA (the bwd_tma option)[, more kernel options]
CANDIDATES: list[tuple] = [
    ((32, 64, 64, 32, 8, 3, 8, 3), False),  # the first pointer-load tiles (8 warps, 3 stages)
    ((32, 64, 64, 64, 4, 2, 4, 2), True),  # the TMA tiles the first sweep chose
    ((32, 64, 128, 64, 4, 3, 8, 2), True),  # the TMA tiles before that sweep
    # the first pointer-load row below is the pointer default, the last row the TMA default (docs/decisions.md,
    # backward tiles)
    ((32, 64, 64, 64, 4, 2, 4, 2), False),
    ((32, 64, 64, 32, 4, 2, 4, 3), False),
    ((32, 64, 64, 64, 4, 2, 4, 3), True),
    ((32, 64, 64, 64, 4, 2, 8, 2), True),
    ((32, 64, 64, 128, 4, 2, 8, 2), True),
    ((32, 64, 128, 128, 4, 2, 8, 2), True),
    ((32, 64, 64, 64, 8, 2, 4, 2), True),
    ((64, 64, 64, 64, 4, 2, 4, 2), True),
    # the dQ kernel computes delta and lse2 by default (the bwd_fuse_pre option: the pre-pass launch goes);
    # this row times the separate pre-pass (docs/decisions.md)
    ((64, 64, 64, 64, 4, 2, 4, 2), True, {"bwd_fuse_pre": False}),
    # 128-key dK/dV tiles and 32-key dQ tiles (Triton's tutorial shape: 32 x 128 / 128 x 32), never swept before
    ((32, 128, 128, 32, 4, 3, 4, 3), True),
    ((32, 128, 64, 64, 4, 2, 4, 2), True),
    ((32, 128, 64, 64, 8, 2, 4, 2), True),
    ((64, 128, 64, 64, 8, 2, 4, 2), True),
    ((64, 128, 64, 64, 8, 3, 4, 2), True),
    ((64, 64, 128, 32, 4, 2, 4, 3), True),
    ((64, 64, 128, 32, 4, 2, 8, 2), True),
    ((64, 64, 64, 32, 4, 2, 4, 3), True),
    ((64, 64, 128, 64, 4, 2, 8, 2), True),
]
if GRID:  # N as a square grid (128 x 128 at 16384); pointer loads, as token layouts read in place
    SIDE = math.isqrt(N)
    PATTERNS = [
        ("dilated_2d_k7_d4", f"layout g = grid({SIDE}, {SIDE})\npattern p = neighborhood(g, kernel=7, dilation=4)\n"),
        ("neighborhood_2d_k13", f"layout g = grid({SIDE}, {SIDE})\npattern p = neighborhood(g, kernel=13)\n"),
    ]
    CANDIDATES = [
        ((32, 64, 64, 64, 4, 2, 4, 2), False),  # the pointer default
        ((64, 64, 64, 64, 4, 2, 4, 2), False),
        ((64, 32, 64, 32, 4, 3, 4, 3), False),  # the grid tuning rows
        ((32, 32, 32, 32, 4, 3, 4, 3), False),
        # longer dK/dV rows and larger dQ tiles: fewer programs, each loading K/V (or Q/dO) once for more work
        ((64, 128, 128, 64, 8, 2, 8, 2), False),
        ((32, 128, 128, 32, 8, 2, 4, 3), False),
        ((128, 64, 128, 128, 8, 2, 8, 2), False),
        ((64, 128, 128, 64, 8, 3, 8, 3), False),
    ]


def build(src: str, cfg: tuple[int, ...], tma: bool, switches: dict | None = None) -> Variant:
    """The pattern compiled with backward tiles `cfg` (no backward tuning), launched with the bwd_tma option
    `tma` and `switches`, the other backward options at their defaults."""
    attn = P.compile(src, bwd_config=cfg)
    return variant(attn, ("bwd_tma", "bwd_fuse_pre"), {"bwd_tma": tma, **(switches or {})})


def inputs(n: int):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def step(var: Variant, qkv, do):
    """One forward + backward step, inside `with var.active()` (the options are entered once, around the timing)."""
    return torch.autograd.grad(var.attn(*qkv), qkv, do)


def _warm(task: tuple[int, int]) -> str | None:
    pi, ci = task
    try:
        qkv, do = inputs(1024 if DEV == "cuda" else N)
        var = build(PATTERNS[pi][1], *CANDIDATES[ci])
        with var.active():
            step(var, qkv, do)
        if DEV == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 (a candidate that cannot run is reported, not fatal)
        return f"{type(e).__name__}: {str(e)[:300]}"


def kernel_ms(fn) -> dict[str, float]:
    """Mean device time per step of each backward kernel (profiler, five steps)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        for name in ("_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_pre"):
            if e.key.startswith(name):
                out[name] = out.get(name, 0.0) + e.device_time_total / 1e3 / 5
    return out


def _out_name() -> str:
    return f"sweep_backward{'_grid' if GRID else ''}{'' if D == 128 else f'_d{D}'}_h100.json"


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    os.makedirs(outdir, exist_ok=True)
    t0 = time.perf_counter()
    tasks = [(pi, ci) for pi in range(len(PATTERNS)) for ci in range(len(CANDIDATES))]
    failed = {}
    if DEV == "cuda":
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(8, mp_context=mp.get_context("spawn")) as pool:
            for task, err in zip(tasks, pool.map(_warm, tasks), strict=True):
                if err:
                    failed[task] = err
    print(f"compiled {len(tasks)} in {time.perf_counter() - t0:.0f} s, failed: {failed}", flush=True)
    qkv, do = inputs(N)
    rows = []
    for pi, (name, src) in enumerate(PATTERNS):
        ref = None
        for ci, (cfg, tma, *switches) in enumerate(CANDIDATES):
            row = {"pattern": name, "config": list(cfg), "tma": tma, "switches": switches[0] if switches else {}}
            if (pi, ci) in failed:
                row["error"] = failed[(pi, ci)]
                rows.append(row)
                continue
            var = build(src, cfg, tma, row["switches"])
            with var.active():
                got = step(var, qkv, do)
                if ref is None:
                    ref = got
                row["rel_err_vs_first"] = max(_rel(a, b) for a, b in zip(got, ref, strict=True))
                row["step_ms"] = med(lambda: step(var, qkv, do), quick=True)
                if DEV == "cuda":
                    row.update({f"{k}_ms": v for k, v in kernel_ms(lambda: step(var, qkv, do)).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(outdir, _out_name()), "w") as f:
                json.dump({**run_info(), "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": str(DT)}, "rows": rows}, f, indent=1)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
