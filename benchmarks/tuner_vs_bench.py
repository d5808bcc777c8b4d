# ruff: noqa: B023  (the timing lambda runs inside its loop iteration)
"""Does the forward tuner pick what the benchmarks measure fastest, every time? On the GPU, one run, per
pattern of bench_forward: the tuner's pick from an empty cache, TUNINGS times (default 3), each with every
round it timed (`patterndsl.runtime.tuning.records()`); then every candidate timed do_bench's way (L2 flushed, median) in three
interleaved rounds, alternating in direction, so the H100's clock drift spreads over all of them.
Writes tuner_rounds_h100.json to argv[1]. Env: BENCH_ONLY (pattern names), TUNE_EXTRA (more D = 128
candidates to try, e.g. "128,32,8,2,1;128,32,8,3,1,0,128")."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import bench_forward as bf
import torch
from runinfo import run_info
from triton.testing import do_bench

import patterndsl as P
from patterndsl.runtime import Attention, tuning


def extra_candidates(text: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in c.split(",")) for c in text.split(";") if c.strip())


def with_extra(table: tuple, extra: tuple) -> tuple:
    """TUNE_CONFIGS with `extra` appended to its D = 128 row."""
    return tuple((d, tuple(c) + extra) if d == 128 else (d, c) for d, c in table)


def with_candidates(attn, extra: tuple):
    """The compiled pattern with `extra` tuning candidates in its D = 128 row: a spec of its own (its own key,
    so its tuning is remembered apart from the pattern's), or the pattern itself when there are none."""
    if not extra:
        return attn
    spec = attn.spec
    return Attention(dataclasses.replace(spec, key=f"{spec.key}+extra", tune_configs=with_extra(spec.tune_configs, extra)))


def _forget(attn) -> list:
    """Drop this pattern's tuned choices from memory (a new process would start so); their keys."""
    keys = [x for x in tuning._TUNED if x[0] == attn.spec.key]
    for x in keys:
        del tuning._TUNED[x]
    return keys


def tune(attn, q, k, v) -> dict:
    with tempfile.TemporaryDirectory() as d:
        os.environ["PATTERNDSL_CACHE_DIR"] = d
        _forget(attn)
        before = tuning.records()[-1] if tuning.records() else None
        t0 = time.perf_counter()
        attn(q, k, v)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert tuning.records()[-1] is not before, "the call tuned (an empty cache)"
    record = bf.last_tuning(attn)  # the tiles the call launches (not a token layout's two ways)
    rounds = {",".join(map(str, c)): list(t) for c, t in record.rounds.items()}
    return {"pick": list(attn.config(q, k, v)), "seconds": seconds, "rounds_ms": rounds}


def bench_rounds(attn, q, k, v, rounds: int = 3) -> dict:
    """do_bench medians of every candidate of the last tuning, launched through the pattern as users do (the
    tuned choice in memory set to each candidate in turn)."""
    (fields,) = [x for x in tuning._TUNED if x[0] == attn.spec.key and x[1][0] == bf.tile_kind(attn)]
    cands = list(bf.last_tuning(attn).rounds)
    times: dict = {c: [] for c in cands}
    for r in range(rounds):
        for c in cands if r % 2 == 0 else reversed(cands):
            tuning._TUNED[fields] = c
            times[c].append(do_bench(lambda: attn(q, k, v), warmup=25, rep=100))
    return {",".join(map(str, c)): t for c, t in times.items()}


def main() -> None:
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    extra = extra_candidates(os.environ.get("TUNE_EXTRA", ""))
    tunings = int(os.environ.get("TUNINGS", "3"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(bf.B, bf.H, bf.N, bf.D, device="cuda", dtype=bf.DT) for _ in range(3))
    res = []
    for name, src, _, _ in bf.PATTERNS:
        if only and name not in only:
            continue
        attn = with_candidates(P.compile(f"pattern p = {src}\n"), extra)
        picks = []
        for i in range(tunings):
            picks.append(tune(attn, q, k, v))
            print(f"{name:22s} tuning {i}: pick {tuple(picks[-1]['pick'])} in {picks[-1]['seconds']:.1f} s", flush=True)
            for c, ts in sorted(picks[-1]["rounds_ms"].items(), key=lambda x: sum(x[1]))[:4]:
                print(f"    {c:26s} mean {statistics.fmean(ts):.4f}  rounds {' '.join(f'{t:.4f}' for t in ts)}")
        bench = bench_rounds(attn, q, k, v)
        for c, ts in sorted(bench.items(), key=lambda x: statistics.median(x[1])):
            print(f"{name:22s} do_bench {c:26s} median {statistics.median(ts):.4f}  rounds "
                  f"{' '.join(f'{t:.4f}' for t in ts)}", flush=True)
        res.append({"pattern": name, "tunings": picks, "do_bench_ms": bench})
        with open(os.path.join(sys.argv[1], "tuner_rounds_h100.json"), "w") as f:
            json.dump({**run_info(), "extra_candidates": [list(c) for c in extra], "forward": res}, f, indent=1)


if __name__ == "__main__":
    main()
