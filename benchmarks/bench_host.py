# ruff: noqa: B023  (the step closures run inside their loop iteration)
"""Host time of a short eager training step, on the GPU, one run: forward + backward of `attn(q, k, v)` with
q, k, v requiring gradients (the path users take) at N = 4096, B = 1, H = 16, D = 64 and 128, bf16, for
causal and causal window 1023; ours beside torch.compile'd FlexAttention (its block mask built once) and
SDPA (`is_causal`, or a dense boolean mask for the window). `ours` is the default call, `ours_direct` the same
with the `direct_launch` option (plans launched through the compiled kernels' own launchers), `ours_triton`
the Triton kernels where FlashAttention-4 is installed and may take the band.

Per step and per peer, in interleaved rounds (medians):
- host_fwd_ms, host_bwd_ms, host_ms: how long the Python calls take to return while the GPU is kept busy by
  a long `torch.cuda._sleep` enqueued first, so no launch ever waits on the device: the host's cost alone;
- eager_ms: the whole step, as CUDA events around an eager step after a synchronisation see it (host-bound
  steps show their host time here);
- graph_ms: the same step replayed from a CUDA graph (`patterndsl.runtime.capture`): the kernels alone.

Writes JSON to argv[1] (default benchmarks/results/host_h100.json). Env: BENCH_ROUNDS (7), BENCH_N (4096).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F
from runinfo import run_info
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import patterndsl as P
from patterndsl.runtime import capture

B, H = 1, 16
N = int(os.environ.get("BENCH_N", "4096"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
DT = torch.bfloat16
WINDOW = 1023
PATTERNS = {"causal": "causal", "causal_window_1023": f"causal & window({WINDOW})"}
STEPS = 10  # eager steps issued behind one sleep kernel, each timed on its own


def mm_causal(b: Any, h: Any, q: Any, k: Any) -> Any:
    return q >= k


def mm_window(b: Any, h: Any, q: Any, k: Any) -> Any:
    return (q >= k) & (q - k <= WINDOW)


Step = tuple[Callable[[], Any], Callable[[Any], Any]]  # (forward, backward of its output)


def steps(name: str, d: int, flex: Any) -> dict[str, Step]:
    q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=DT) for _ in range(4))
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    attn = P.compile(f"pattern p = {PATTERNS[name]}\n")
    bm = create_block_mask(mm_causal if name == "causal" else mm_window, None, None, N, N, device="cuda")
    i = torch.arange(N, device="cuda")
    dense = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= WINDOW)

    def sdpa() -> Any:
        if name == "causal":
            return F.scaled_dot_product_attention(*qkv, is_causal=True)
        return F.scaled_dot_product_attention(*qkv, attn_mask=dense)

    def bwd(o: Any) -> Any:
        return torch.autograd.grad(o, qkv, do)

    def direct() -> Any:
        with attn.options(direct_launch=True):  # the backward runs under the forward's options
            return attn(*qkv)

    def triton_only() -> Any:
        with attn.options(fa4=False):
            return attn(*qkv)

    return {"ours": (lambda: attn(*qkv), bwd), "ours_direct": (direct, bwd), "ours_triton": (triton_only, bwd),
            "flex": (lambda: flex(*qkv, block_mask=bm), bwd), "sdpa": (sdpa, bwd)}


def host_times(fwd: Callable[[], Any], bwd: Callable[[Any], Any]) -> tuple[list[float], list[float]]:
    """Per step (forward issue ms, backward issue ms) of STEPS steps issued behind a sleep kernel long enough
    that the device is still busy when the last returns (checked: the elapsed host time stays under it)."""
    torch.cuda.synchronize()
    sleep_ms = 200.0
    torch.cuda._sleep(int(sleep_ms * 1e-3 * _CLOCK_HZ))
    f, b = [], []
    t_start = time.perf_counter()
    for _ in range(STEPS):
        t0 = time.perf_counter()
        o = fwd()
        t1 = time.perf_counter()
        bwd(o)
        t2 = time.perf_counter()
        f.append((t1 - t0) * 1e3)
        b.append((t2 - t1) * 1e3)
    busy = (time.perf_counter() - t_start) * 1e3 < sleep_ms * 0.5
    torch.cuda.synchronize()
    if not busy:
        print("warning: the device idled before the steps were issued; host times include waits", flush=True)
    return f, b


def event_ms(fn: Callable[[], Any], reps: int = 10) -> list[float]:
    """Each of `reps` calls timed by CUDA events after a synchronisation: host gaps between launches count."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return out


def _clock_hz() -> float:
    """The sleep kernel's cycles per second, measured (clocks vary by card and boost state)."""
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(10_000_000)
    e.record()
    torch.cuda.synchronize()
    return 10_000_000 / (s.elapsed_time(e) * 1e-3)


_CLOCK_HZ = 1.5e9


def cell(name: str, d: int, flex: Any) -> dict[str, Any]:
    fns = steps(name, d, flex)
    row: dict[str, Any] = {"pattern": name, "N": N, "D": d}
    graphs: dict[str, Any] = {}
    for who, (fwd, bwd) in fns.items():
        for _ in range(3):  # compile, tune, build tables
            bwd(fwd())
        try:
            graphs[who] = capture(lambda fwd=fwd, bwd=bwd: bwd(fwd()), warmups=2)[0]
        except Exception as e:  # noqa: BLE001 (a peer that cannot be captured is reported, not fatal)
            row[f"{who}_graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    raw: dict[str, dict[str, list[float]]] = {w: {"host_fwd": [], "host_bwd": [], "eager": [], "graph": []}
                                              for w in fns}
    for _ in range(ROUNDS):
        for who, (fwd, bwd) in fns.items():
            f, b = host_times(fwd, bwd)
            raw[who]["host_fwd"] += f
            raw[who]["host_bwd"] += b
            raw[who]["eager"] += event_ms(lambda fwd=fwd, bwd=bwd: bwd(fwd()))
            if who in graphs:
                raw[who]["graph"] += event_ms(graphs[who].replay)
    for who, r in raw.items():
        for metric, xs in r.items():
            if xs:
                row[f"{who}_{metric}_ms"] = median(xs)
        row[f"{who}_host_ms"] = median(f + b for f, b in zip(r["host_fwd"], r["host_bwd"], strict=True))
    row["raw_ms"] = raw
    return row


def main() -> None:
    global _CLOCK_HZ
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/host_h100.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 4096
    flex = torch.compile(flex_attention, dynamic=False)
    _CLOCK_HZ = _clock_hz()
    rows = []
    for name in PATTERNS:
        for d in (64, 128):
            row = cell(name, d, flex)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "raw_ms"}), flush=True)
            with open(path, "w") as f:
                json.dump({**run_info(), "shape": {"B": B, "H": H, "N": N}, "sleep_clock_hz": _CLOCK_HZ,
                           "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
