"""A compiled pattern inside a CUDA graph (torch.cuda.graph; what torch.compile's "reduce-overhead" mode does):
at short sequences a training step is bound by host time (docs/perf-notes.md: ~0.6-0.75 ms a step at
N = 4096 on the H100's host), and replaying a captured step is how a user removes it. Capture must not sync
or allocate outside the graph's pool, and a replay must compute with the new values of the static inputs.

Run with `pytest -m gpu tests/gpu/test_gpu_cudagraph.py`; skipped without CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest

import patterndsl as P

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

# the fast kernel (two patterns) and the layout kernel (the dilated window's token layout)
CASES = ["causal & window(255)", "causal", "causal & window(255, dilation=4)"]


def _inputs(n: int, d: int, seed: int, grad: bool) -> list[Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(2, 4, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            for _ in range(4)]  # fmt: skip


def _captured(step: Any, static: list[Any]) -> tuple[Any, Any]:
    """(graph, outputs of `step(*static)` captured in it), after warm-up on a side stream (tuning, table
    building and triton's compiles happen there, outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    return graph, out


@pytest.mark.parametrize("src", CASES)
def test_forward_replays_with_new_inputs(src: str) -> None:
    attn = P.compile(f"pattern p = {src}\n")
    n, d = 1000, 64  # a partial last block
    static = _inputs(n, d, 0, False)
    with torch.no_grad():
        graph, out = _captured(lambda q, k, v, _: attn.attention(q, k, v), static)
        for seed in (1, 2):
            fresh = _inputs(n, d, seed, False)
            for s, f in zip(static, fresh, strict=True):
                s.copy_(f)
            out.fill_(float("nan"))  # what the replay does not write shows
            graph.replay()
            want = attn.attention(*fresh[:3])
            assert torch.equal(out, want), f"replay differs from eager: {(out.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("src", CASES)
def test_training_step_replays_with_new_inputs(src: str) -> None:
    attn = P.compile(f"pattern p = {src}\n")
    n, d = 1000, 64
    static = _inputs(n, d, 0, True)

    def step(q: Any, k: Any, v: Any, do: Any) -> Any:
        return torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do)

    graph, grads = _captured(step, static)
    for seed in (1, 2):
        fresh = _inputs(n, d, seed, True)
        with torch.no_grad():
            for s, f in zip(static, fresh, strict=True):
                s.copy_(f)
            for g in grads:
                g.fill_(float("nan"))
        graph.replay()
        want = step(*fresh)
        for name, got, w in zip("qkv", grads, want, strict=True):
            assert torch.equal(got, w), f"d{name}: replay differs from eager by {(got.float() - w.float()).abs().max()}"
