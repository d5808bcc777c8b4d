"""Capturing a step in a CUDA graph: the warm-up a pattern's first call needs happens outside the capture.

A first call per shape may autotune (timing with host synchronisation), compile kernels and build block
or run tables on the host; none of that can be captured. `capture` runs the step first on a side stream,
then records it, so decode steps and short training steps replay with new tensor values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def capture(step: Callable[[], Any], warmups: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(the graph, its output): `step()` run `warmups` times on a side stream, then captured in a CUDA graph
    whose `.replay()` reruns it on the tensors it was recorded with."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # (torch leaves it unannotated)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
