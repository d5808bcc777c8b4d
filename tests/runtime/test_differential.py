"""A differential fuzzer: random static expressions at random N (odd, prime, not a multiple of any tile), the
compiled pattern's forward and gradients through the CPU path (float64) and Triton's interpreter (float32)
against a float64 masked softmax built from the reference mask, and packed documents against separate
calls. Slow: many small compiles and interpreted kernels."""

from __future__ import annotations

import warnings

import pytest
from helpers import check_grads, cu_of
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import document_splits, expressions

import patterndsl as P
from patterndsl.source import PatternError

pytestmark = [pytest.mark.slow, pytest.mark.interpreter]

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
warnings.filterwarnings("ignore", message=".*CPU tensors take a PyTorch reference path.*")

SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))
ODD_N = st.sampled_from([1, 2, 3, 7, 13, 17, 29, 31, 37, 41, 47, 53, 61])


def _compiled(src: str, n: int):  # type: ignore[no-untyped-def]
    try:
        mask = P.dense_mask(src, n)
        attn = P.compile(f"pattern p = {src}\n", **SMALL)
    except PatternError:
        assume(False)
    return attn, mask


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(src=expressions(max_leaves=3), n=ODD_N, dtype=st.sampled_from(["float64", "float32"]),
       gqa=st.booleans())  # fmt: skip
def test_random_patterns_forward_and_gradients_match_float64(src: str, n: int, dtype: str, gqa: bool) -> None:
    attn, mask = _compiled(src, n)
    check_grads(attn, mask, h=2, hkv=1 if gqa else 2, dtype=getattr(torch, dtype), with_lse=True,
                autograd=dtype == "float64")  # fmt: skip


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(src=expressions(max_leaves=3), lengths=document_splits)
def test_random_patterns_on_packed_documents_equal_separate_calls(src: str, lengths: list[int]) -> None:
    try:
        attn = P.compile(f"pattern p = {src}\n", **SMALL)
        for n in set(lengths) - {0}:
            P.dense_mask(src, n)
    except PatternError:
        assume(False)
    total = sum(lengths)
    assume(total > 0)
    g = torch.Generator().manual_seed(total)
    q, k, v = (torch.randn(total, 2, 16, generator=g) for _ in range(3))
    out = attn(q, k, v, cu_seqlens=cu_of(lengths))
    start = 0
    for n in lengths:
        if n:
            part = slice(start, start + n)
            alone = attn(*(t[part].permute(1, 0, 2)[None] for t in (q, k, v)))[0].permute(1, 0, 2)
            assert torch.allclose(out[part], alone, atol=1e-5), (src, lengths, n)
        start += n
