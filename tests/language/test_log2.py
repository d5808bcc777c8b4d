"""`log2(x)` in index expressions: the floor of the base-2 logarithm of a positive x, -1 for x <= 0.

Checked against Python's own arithmetic (math.log2 on small integers), through every evaluator: the
reference mask, interval bounds (a tile's bounds must contain every value inside it) and the radial
pattern written with it against the hand-unrolled form it replaces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import LIBRARY
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask

import patterndsl as P
from patterndsl import expr as E
from patterndsl import ir
from patterndsl.intervals import Interval, _interval
from patterndsl.mask import dense_mask


def _floor_log2(x: int) -> int:
    return math.floor(math.log2(x)) if x > 0 else -1


def test_values_at_zero_negatives_and_powers() -> None:
    xs = [-(2**40), -5, -1, 0, 1, 2, 3, 4, 7, 8, 1023, 1024, 2**40 - 1, 2**40, 2**61]
    want = [-1, -1, -1, -1, 0, 1, 1, 2, 2, 3, 9, 10, 39, 40, 61]
    assert [E.evaluate_int(E.log2(E.const(x))) for x in xs] == want
    arr = np.array(xs, dtype=np.int64)
    assert E.ilog2_of(arr).tolist() == want


@pytest.mark.parametrize("n", [1, 9, 40])
def test_where_with_log2_matches_brute_force(n: int) -> None:
    src = "causal & where(log2(q - k) % 2 == 0 or log2(k - q) == -1 and log2(N) > 4)"
    body = P.pattern(src)
    m = dense_mask(body, n)
    assert (m == reference_mask(body, n)).all()
    i, j = np.divmod(np.arange(n * n), n)
    want = [(b <= a) and (_floor_log2(a - b) % 2 == 0 or _floor_log2(b - a) == -1 and _floor_log2(n) > 4)
            for a, b in zip(i, j, strict=True)]  # fmt: skip
    assert (m.reshape(-1) == np.array(want, dtype=bool)).all()


def test_log2_of_n_folds_in_arguments() -> None:
    body = P.pattern("causal & window(log2(N))")
    assert isinstance(body, ir.Inter) and isinstance(body.b, ir.Window)
    assert E.evaluate_int(body.b.before, 1000) == 9


@settings(max_examples=30)
@given(st.integers(-300, 300), st.integers(0, 300))
def test_interval_bounds_contain_every_value(lo: int, width: int) -> None:
    iv = _interval(E.Log2(E.Var("i")), {"i": Interval(lo, lo + width)}, np)
    values = [_floor_log2(x) for x in range(lo, lo + width + 1)]
    assert (iv.lo, iv.hi) == (min(values), max(values))  # monotone: exact at the ends


UNROLLED = """
param frames = 16
param tokens = 1024
param w0 = 512
layout video = grid(frames, tokens)
pattern radial = where(video, abs(qc1 - kc1) <= w0 and (abs(qc0 - kc0) < 2 or 2 * abs(qc1 - kc1) <= w0)
    and (abs(qc0 - kc0) < 4 or 4 * abs(qc1 - kc1) <= w0) and (abs(qc0 - kc0) < 8 or 8 * abs(qc1 - kc1) <= w0)
    and (abs(qc0 - kc0) < 16 or 16 * abs(qc1 - kc1) <= w0))
param side = 32
param s0 = 16
layout video2d = grid(frames, side, side)
pattern radial_2d = where(video2d, max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0
    and (abs(qc0 - kc0) < 2 or 2 * max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0)
    and (abs(qc0 - kc0) < 4 or 4 * max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0)
    and (abs(qc0 - kc0) < 8 or 8 * max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0))
"""


@pytest.mark.parametrize(
    "name, defines, n",
    [
        ("radial", {"frames": 8, "tokens": 64, "w0": 32}, 8 * 64),
        ("radial", {"frames": 12, "tokens": 40, "w0": 16}, 12 * 40),
        ("radial_2d", {"frames": 8, "side": 8, "s0": 4}, 8 * 8 * 8),
    ],
)
def test_radial_with_log2_equals_the_unrolled_bands(name: str, defines: dict[str, int], n: int) -> None:
    """Frame distances stay below 16 here, where the hand-unrolled form (up to 2**4) is the whole rule."""
    new = P.load(LIBRARY / "radial.pat", defines).get(name)
    old = P.loads(UNROLLED, defines=defines).get(name)
    assert isinstance(new, ir.PatternDef) and isinstance(old, ir.PatternDef)
    assert (dense_mask(new.body, n) == dense_mask(old.body, n)).all()
