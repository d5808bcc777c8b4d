"""NSA's compressed branch (`runtime.compressed_attention`) against a float64 brute force written from its
definition: query i attends to the mean key and value of every block that ends at or before i."""

from __future__ import annotations

import runpy
from typing import Any

import numpy as np
import pytest
from helpers import ROOT

torch = pytest.importorskip("torch")

from patterndsl.runtime import compressed_attention  # noqa: E402 (it imports torch)


def _reference(q: Any, k: Any, v: Any, b: int, causal: bool, pooled: Any = None) -> tuple[np.ndarray, np.ndarray]:
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    bsz, heads, n, d = q.shape
    group = heads // k.shape[1]
    nb = -(-n // b)
    out = np.zeros_like(q)
    lse = np.full((bsz, heads, n), -np.inf)
    for bi in range(bsz):
        for h in range(heads):
            g = h // group
            if pooled is None:
                keys = [k[bi, g, c * b : (c + 1) * b].mean(0) for c in range(nb)]
                vals = [v[bi, g, c * b : (c + 1) * b].mean(0) for c in range(nb)]
            else:
                keys, vals = list(np.asarray(pooled[0], np.float64)[bi, g]), list(np.asarray(pooled[1], np.float64)[bi, g])
            for i in range(n):
                seen = [c for c in range(nb) if not causal or (c + 1) * b - 1 <= i]
                if not seen:
                    continue
                z = np.array([q[bi, h, i] @ keys[c] for c in seen]) / np.sqrt(d)
                top = z.max()
                w = np.exp(z - top)
                lse[bi, h, i] = top + np.log(w.sum())
                out[bi, h, i] = sum(wc * vals[c] for wc, c in zip(w / w.sum(), seen, strict=True))
    return out, lse


@pytest.mark.parametrize("causal", [True, False])
def test_compressed_branch_matches_the_definition(causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64)  # a ragged last block of 5 tokens
    k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = compressed_attention(q, k, v, 8, causal=causal, chunk=16)
    want, want_lse = _reference(q, k, v, 8, causal)
    assert np.abs(out.numpy() - want).max() < 1e-12
    assert np.array_equal(np.isinf(lse.numpy()), np.isinf(want_lse))
    fin = np.isfinite(want_lse)
    assert np.abs(lse.numpy()[fin] - want_lse[fin]).max() < 1e-5  # lse is float32
    if causal:  # the first 7 queries see no whole block: zeros and -inf, no NaN
        assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7])) and torch.isinf(lse[:, :, :7]).all()


@pytest.mark.slow
def test_caller_pooling_and_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 20, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 20, 4, generator=g, dtype=torch.float64) for _ in range(2))
    kp, vp = (torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, _ = compressed_attention(q, k, v, 4, pooled=(kp, vp))
    want, _ = _reference(q.detach(), k, v, 4, True, (kp.detach(), vp.detach()))
    assert np.abs(out.detach().numpy() - want).max() < 1e-12
    assert torch.autograd.gradcheck(lambda a, b, c: compressed_attention(a, k, v, 4, pooled=(b, c))[0], (q, kp, vp))
    with pytest.raises(ValueError, match=r"pooled keys and values must be \[1, 1, 5, 4\] each"):
        compressed_attention(q, k, v, 4, pooled=(kp[:, :, :4], vp))


@pytest.mark.slow
def test_nsa_model_example_runs() -> None:
    runpy.run_path(str(ROOT / "examples" / "nsa_model.py"), run_name="__main__")


@pytest.mark.interpreter
@pytest.mark.parametrize("causal, n, b", [(True, 37, 8), (False, 37, 8), pytest.param(True, 300, 4, marks=pytest.mark.slow)])
def test_kernel_path_matches_the_definition_and_its_gradients(causal: bool, n: int, b: int) -> None:
    """The attention kernels' path (float32 in the interpreter): output and lse against the brute force,
    gradients of q, k, v (through the block means) and of the caller's pooling against the float64 CPU path,
    with a gradient on lse too. n = 300, b = 4: 75 summaries over five key tiles of the 300-query tables."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, n, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, n, 16, generator=g).requires_grad_() for _ in range(2))
    kp, vp = (torch.randn(1, 2, -(-n // b), 16, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn(1, 4, n, 16, generator=g)
    dl = torch.randn(1, 4, n, generator=g)
    for pooled in (None, (kp, vp)):
        out, lse = compressed_attention(q, k, v, b, causal=causal, pooled=pooled)
        want, want_lse = _reference(q.detach(), k.detach(), v.detach(), b, causal,
                                    None if pooled is None else (kp.detach(), vp.detach()))
        assert np.abs(out.detach().numpy() - want).max() < 1e-5
        assert np.array_equal(np.isinf(lse.detach().numpy()), np.isinf(want_lse))
        fin = np.isfinite(want_lse)
        assert np.abs(lse.detach().numpy()[fin] - want_lse[fin]).max() < 1e-5
        leaves = (q, k, v) if pooled is None else (q, kp, vp)
        wide = tuple(x.detach().double().requires_grad_() for x in leaves)
        o64, l64 = (compressed_attention(wide[0], k.detach().double(), v.detach().double(), b, causal=causal, pooled=wide[1:])
                    if pooled is not None else compressed_attention(*wide, b, causal=causal))
        loss = lambda o, s: (o * do.to(o.dtype)).sum() + (torch.where(torch.isinf(s), 0, s) * dl.to(s.dtype)).sum()  # noqa: E731
        got = torch.autograd.grad(loss(out, lse), leaves)
        ref = torch.autograd.grad(loss(o64, l64), wide)
        for a, r in zip(got, ref, strict=True):
            assert (a.double() - r).abs().max() < 1e-4
