"""What every benchmark's JSON records about where it ran, so numbers from different runs are never mixed up;
what a call launched (the runtime keeps no record of its last launch: its kernels' arguments say); and the
host's time per call."""

from __future__ import annotations

import contextlib
import datetime
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton


def run_info() -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)",
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


class _Recorded:
    """A kernel launched as before (`kernel[grid](...)`), each launch's keyword arguments appended to `log`."""

    def __init__(self, kernel: Any, log: list[dict]) -> None:
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid: Any) -> Any:
        launch = self.kernel[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            self.log.append(kwargs)
            return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def backward_launches() -> Iterator[dict[str, Any]]:
    """Inside the block, the static backward's kernels record their launches; after it, the dict yielded holds
    `tiles` (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps1, stages1, warps2, stages2: dK/dV's, then dQ's) and
    `tma` of the last backward launched (tuned or configured: what ran), if one ran. Tuning launches come
    before the real ones, so the last launch of each kernel is the step's own."""
    from patterndsl.runtime import backward

    dq: list[dict] = []
    dkdv: list[dict] = []
    saved = backward._attn_bwd_dq, backward._attn_bwd_dkdv
    backward._attn_bwd_dq, backward._attn_bwd_dkdv = _Recorded(saved[0], dq), _Recorded(saved[1], dkdv)
    got: dict[str, Any] = {}
    try:
        yield got
    finally:
        backward._attn_bwd_dq, backward._attn_bwd_dkdv = saved
        if dq and dkdv:
            a, b = dkdv[-1], dq[-1]
            got["tiles"] = (a["BLOCK_M"], a["BLOCK_N"], b["BLOCK_M"], b["BLOCK_N"], a["num_warps"], a["num_stages"],
                            b["num_warps"], b["num_stages"])  # fmt: skip
            got["tma"] = int(b.get("TMA", 0))


def host_ms(fn: Callable[[], Any], sync: Callable[[], None], reps: int = 200) -> float:
    """The host's time per call of fn (ms), nothing waiting on the device between calls (`sync` only before
    and after): what a call costs where the launches, not the kernels, are the bottleneck."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) * 1e3 / reps


def captured(step: Any, warmups: int = 1) -> Any:
    """A CUDA graph of `step()` (`patterndsl.runtime.capture`: warm-ups outside the capture); `.replay()`
    reruns it."""
    from patterndsl.runtime import capture

    return capture(step, warmups)[0]
