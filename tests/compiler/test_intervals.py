"""Interval reasoning is sound (ALL and NONE are never wrong) and exact on single pairs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as P
from patterndsl import expr as E
from patterndsl.intervals import ALL, NONE, SOME, classify
from patterndsl.mask import dense_mask
from patterndsl.semantics import predicate

PATTERNS = [
    "causal & window(3)",
    "window(2, dilation=3)",
    "window(before=4, after=1)",
    "global(-2:) | rows(1:20:3) | cols([3, -1])",
    "hops(2) & causal",
    "hops(3)",
    "blockwise(4, window(1) | random(2, seed=1))",
    "where(k % 8 >= 6)",
    "causal - window(2)",
    "stride(5) | sink(3)",
    "where(q * q <= k * 3 + 2)",
    "where(min(q, k) * 2 == max(q, k) - 1 or abs(q - k) ** 2 < 7)",
    "random(3, seed=2)",
    "window(N // 8)",
    "blockwise(3, hops(2) | window(1)) & causal",
    "~(window(3) | sink(2)) & causal",
]


def _rects(n: int, data: st.DataObject, count: int = 64) -> tuple[np.ndarray, ...]:
    draw = data.draw
    i_lo = np.array(draw(st.lists(st.integers(0, n - 1), min_size=count, max_size=count)))
    j_lo = np.array(draw(st.lists(st.integers(0, n - 1), min_size=count, max_size=count)))
    i_hi = np.minimum(n - 1, i_lo + np.array(draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))))
    j_hi = np.minimum(n - 1, j_lo + np.array(draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))))
    return i_lo, i_hi, j_lo, j_hi


@pytest.mark.parametrize("source", PATTERNS)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_classification_is_sound_on_rectangles(source: str, n: int, data: st.DataObject) -> None:
    pattern = P.pattern(source)
    mask = dense_mask(pattern, n)
    pred = E.bind_n(predicate(pattern), n)
    i_lo, i_hi, j_lo, j_hi = _rects(n, data)
    verdict = classify(pred, i_lo, i_hi, j_lo, j_hi)
    for k in range(len(i_lo)):
        block = mask[i_lo[k] : i_hi[k] + 1, j_lo[k] : j_hi[k] + 1]
        assert verdict[k] in (NONE, SOME, ALL)
        if verdict[k] == ALL:
            assert block.all()
        if verdict[k] == NONE:
            assert not block.any()


@pytest.mark.parametrize("source", PATTERNS)
def test_classification_is_exact_on_single_pairs(source: str) -> None:
    n = 37
    pattern = P.pattern(source)
    pred = E.bind_n(predicate(pattern), n)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    verdict = classify(pred, i, i, j, j)
    np.testing.assert_array_equal(verdict == ALL, dense_mask(pattern, n))
    assert not (verdict == SOME).any()


def test_torch_and_numpy_agree() -> None:
    torch = pytest.importorskip("torch")
    n = 45
    rng = np.random.default_rng(0)
    i_lo = rng.integers(0, n, 200)
    j_lo = rng.integers(0, n, 200)
    i_hi = np.minimum(n - 1, i_lo + rng.integers(0, 7, 200))
    j_hi = np.minimum(n - 1, j_lo + rng.integers(0, 7, 200))
    for source in PATTERNS:
        pred = E.bind_n(predicate(P.pattern(source)), n)
        a = classify(pred, i_lo, i_hi, j_lo, j_hi)
        b = classify(pred, *(torch.from_numpy(x) for x in (i_lo, i_hi, j_lo, j_hi)), xp=torch)
        np.testing.assert_array_equal(a, b.numpy(), err_msg=source)
