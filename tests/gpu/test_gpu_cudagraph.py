"""A compiled pattern inside a CUDA graph (torch.cuda.graph; what torch.compile's "reduce-overhead" mode does):
at short sequences a training step is bound by host time (docs/perf-notes.md: ~0.6-0.75 ms a step at
N = 4096 on the H100's host), and replaying a captured step is how a user removes it. Capture must not sync
or allocate outside the graph's pool, and a replay must compute with the new values of the static inputs.

Run with `pytest -m gpu tests/gpu/test_gpu_cudagraph.py`; skipped without CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import cuda_graph

import patterndsl as P

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

# the fast kernel (two patterns) and the layout kernel (the dilated window's token layout)
CASES = ["causal & window(255)", "causal", "causal & window(255, dilation=4)"]


def _inputs(n: int, d: int, seed: int, grad: bool) -> list[Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(2, 4, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            for _ in range(4)]  # fmt: skip


@pytest.mark.parametrize("src", CASES)
def test_forward_replays_with_new_inputs(src: str) -> None:
    attn = P.compile(f"pattern p = {src}\n")
    n, d = 1000, 64  # a partial last block
    static = _inputs(n, d, 0, False)
    with torch.no_grad():
        graph, out = cuda_graph(lambda: attn.attention(*static[:3]), warmups=2)
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

    graph, grads = cuda_graph(lambda: step(*static), warmups=2)
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
