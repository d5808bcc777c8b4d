"""The FlashAttention-4 backend's choice, on the CPU: which patterns are bands (against the brute-force reading
of the language), why a call cannot go to FA4, and that such a call runs on our kernels unchanged. The
comparisons with FA4 itself are GPU tests (tests/gpu/test_gpu_fa4.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_mask
from strategies import expressions, render, small, trees

import patterndsl as P
from patterndsl.runtime.fa4 import Band, Docs, band, why_not
from patterndsl.semantics import predicate

BAND_ATOMS = st.one_of(
    st.sampled_from(["full", "none", "causal", "~causal"]),
    small.map(lambda r: f"window({r})"),
    st.tuples(small, small).map(lambda ab: f"window({ab[0]}, {ab[1]})"),
    st.just("window(N // 4)"),
)


def _band_mask(b: Band, n: int) -> np.ndarray:
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (b.left is None or (i - j <= b.left)) & (b.right is None or (j - i <= b.right)) & (i >= 0)


def _is_band(mask: np.ndarray) -> bool:
    """The mask is one run of offsets d = i - j holding d = 0, read off the mask alone."""
    n = mask.shape[0]
    i, j = np.indices(mask.shape)
    offsets = {int(d) for d in (i - j)[mask]}
    if not offsets or 0 not in offsets:
        return False
    lo, hi = min(offsets), max(offsets)
    return bool((mask == ((i - j >= lo) & (i - j <= hi))).all()) and n > 0


@given(expressions(), st.integers(1, 40))
def test_a_band_is_exactly_what_the_pattern_allows(src: str, n: int) -> None:
    """Sound for every pattern: where `band` answers, its window is the reference mask."""
    body = P.pattern(src)
    b = band(predicate(body), n)
    if b is not None:
        assert (_band_mask(b, n) == reference_mask(body, n)).all(), (src, b)


@given(st.tuples(trees(BAND_ATOMS, max_leaves=4), st.booleans()).map(lambda t: render(*t)), st.integers(1, 40))
def test_every_band_of_windows_is_found(src: str, n: int) -> None:
    """Complete where the predicate reads i - j alone: each such mask that is a band holding the diagonal is
    recognised."""
    body = P.pattern(src)
    assert (band(predicate(body), n) is not None) == _is_band(reference_mask(body, n)), src


def test_bands_of_the_usual_patterns() -> None:
    n = 4096
    assert band(predicate(P.pattern("causal")), n) == Band(None, 0)
    assert band(predicate(P.pattern("causal & window(1023)")), n) == Band(1023, 0)
    assert band(predicate(P.pattern("window(100)")), n) == Band(100, 100)
    assert band(predicate(P.pattern("full")), n) == Band(None, None)
    assert band(predicate(P.pattern("window(4095)")), n) == Band(None, None)
    huge = 1 << 40  # found by interval subdivision: the work does not grow with N
    assert band(predicate(P.pattern("causal & window(1023)")), huge) == Band(1023, 0)
    assert band(predicate(P.pattern("causal & stride(3)")), huge) is None  # scattered offsets: given up early
    for src in ("window(256) | global(0:16)", "causal & window(1023, dilation=4)", "causal & (window(7) | sink(4))",
                "causal & blockwise(64, window(1))", "window(5) - window(2)", "causal - window(0)"):
        assert band(predicate(P.pattern(src)), n) is None, src


def _qkv(n: int = 64, d: int = 64, dtype: Any = torch.bfloat16, h: int = 2, hkv: int = 2) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, h, n, d, generator=g).to(dtype), torch.randn(1, hkv, n, d, generator=g).to(dtype),
            torch.randn(1, hkv, n, d, generator=g).to(dtype))


@pytest.mark.parametrize("src, reason", [
    ("pattern p = window(8) | global(0:2)\n", "not a band"),
    ("pattern p = heads {\n    0:1 => causal\n    1:2 => window(4)\n}\n", "different patterns"),
    ("pattern p = causal & window(7, dilation=4)\n", "token layout"),
    ("pattern p = causal & topk(2, block=16)\n", "selector"),
])  # fmt: skip
def test_patterns_fa4_cannot_express(src: str, reason: str) -> None:
    attn = P.compile(src)
    q, k, v = _qkv()
    patterns = 0 if attn.spec.head_pattern is None else attn.spec.head_pattern
    assert reason in (why_not(attn.spec, patterns, q, k, v) or ""), src


def test_inputs_fa4_cannot_take() -> None:
    spec = P.compile("pattern p = causal\n").spec
    assert "bfloat16 or float16" in (why_not(spec, 0, *_qkv(dtype=torch.float32)) or "")
    assert "head dims" in (why_not(spec, 0, *_qkv(d=4)) or "")
    assert "head dims" in (why_not(spec, 0, *_qkv(d=264)) or "")
    assert "CUDA" in (why_not(spec, 0, *_qkv()) or "")  # a band in range: the device is what is missing


@pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")
@pytest.mark.parametrize("fa4", [True, None])
def test_a_call_fa4_cannot_take_runs_ours(fa4: bool | None) -> None:
    """The fallback: asked for FA4 (or left to the tuner) where it cannot run, the call is ours, bit for bit."""
    attn = P.compile("pattern p = causal & window(15)\n")
    q, k, v = _qkv(n=48, dtype=torch.float64)
    want = attn(q, k, v, return_lse=True)
    with attn.options(fa4=fa4):
        got = attn(q, k, v, return_lse=True)
        assert attn.backend(q, k, v) == "torch"
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_packed_documents_need_a_pattern_free_of_n() -> None:
    """Per document the band must be the same rule at every length: a window of N // 4 is not."""
    q, k, v = _qkv()
    docs = Docs(torch.tensor([0, 20, 64], dtype=torch.int32), 44)
    assert "does not read N" in (why_not(P.compile("pattern p = window(N // 4)\n").spec, 0, q, k, v, docs) or "")
    assert "CUDA" in (why_not(P.compile("pattern p = causal & window(7)\n").spec, 0, q, k, v, docs) or "")


@pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")
def test_packed_documents_fa4_cannot_take_run_ours() -> None:
    attn = P.compile("pattern p = causal & window(5)\n")
    q, k, v = (t[0].transpose(0, 1) for t in _qkv(n=40, dtype=torch.float64))
    cu = torch.tensor([0, 0, 17, 40])
    want = attn(q, k, v, cu_seqlens=cu, return_lse=True)
    with attn.options(fa4=True):
        got = attn(q, k, v, cu_seqlens=cu, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
