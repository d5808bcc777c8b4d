"""`neighborhood` against NATTEN's own rule (its FlexAttention mask), written here from scratch.

The README promises NATTEN's semantics, so the reference below is phrased the way NATTEN states its
mask, not the way LANGUAGE.md does: per axis, the dilation group's corrected length, the stride
group's *leader* query (the right-hand centre for a non-causal axis, the last query for a causal one),
a window centre clamped by the left and right half-widths, and on a causal axis the leader's lower
bound with the query itself as the upper one. The two phrasings agreeing on every case is the point.
It shares nothing with `patterndsl.semantics` or `tests/reference.py`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from helpers import assert_tables_match_mask
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as P
from patterndsl import expr as E
from patterndsl import ir
from patterndsl import layout as L
from patterndsl.blocks import block_tables
from patterndsl.mask import dense_mask, eval_numpy
from patterndsl.semantics import predicate


@dataclass(frozen=True)
class AxisArgs:
    n: int
    kernel: int
    dilation: int
    stride: int
    causal: bool


def natten_axis(x: int, y: int, a: AxisArgs) -> bool:
    """Whether key coordinate y is in query coordinate x's neighborhood on one axis, NATTEN's way."""
    d, s, k = a.dilation, a.stride, a.kernel
    if x % d != y % d:  # dilation groups never mix
        return False
    qp, kp = x // d, y // d
    group = x % d
    length = a.n // d + (1 if group < a.n % d else 0)  # positions in this dilation group
    first_of_group = (qp // s) * s
    if a.causal:
        leader = min(first_of_group + s - 1, length - 1)
        return kp <= qp and leader - kp < k
    leader = min(first_of_group + s // 2, length - 1)
    left, right = k // 2, k // 2 - (1 - k % 2)
    centre = min(max(leader, left), length - 1 - right)
    return centre - left <= kp <= centre + right


def natten_mask(dims: tuple[int, ...], axes: tuple[AxisArgs, ...]) -> np.ndarray:
    """The [N, N] mask: a product over axes of row-major coordinates, one pair at a time."""
    coords = list(itertools.product(*(range(n) for n in dims)))
    out = np.zeros((len(coords), len(coords)), dtype=bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            out[qi, ki] = all(natten_axis(x, y, a) for x, y, a in zip(qc, kc, axes, strict=True))
    return out


def _lit(values: tuple[object, ...]) -> str:
    return "(" + ", ".join(str(v).lower() for v in values) + ",)"


def ours(dims: tuple[int, ...], axes: tuple[AxisArgs, ...]) -> np.ndarray:
    """The library's dense mask for the same arguments, through the parser and the checker."""
    text = (
        f"layout g = grid({', '.join(map(str, dims))})\n"
        f"pattern p = neighborhood(g, kernel={_lit(tuple(a.kernel for a in axes))}, "
        f"dilation={_lit(tuple(a.dilation for a in axes))}, stride={_lit(tuple(a.stride for a in axes))}, "
        f"causal={_lit(tuple(a.causal for a in axes))})\n"
    )
    body = P.loads(text).get("p")
    assert isinstance(body, P.ir.PatternDef) and not isinstance(body.body, P.ir.Heads)
    return dense_mask(body.body, int(np.prod(dims)))


def _check(dims: tuple[int, ...], axes: tuple[AxisArgs, ...]) -> None:
    want, got = natten_mask(dims, axes), ours(dims, axes)
    diff = int((want != got).sum())
    assert diff == 0, f"grid{dims} {axes}: {diff} pairs differ from NATTEN's rule"


# --- the reference itself, on rows worked out by hand ------------------------------------------------


def _rows(n: int, k: int, s: int, causal: bool, d: int = 1) -> list[list[int]]:
    a = AxisArgs(n, k, d, s, causal)
    return [[y for y in range(n) if natten_axis(x, y, a)] for x in range(n)]


def test_reference_even_stride_uses_the_right_hand_centre() -> None:
    # n = 8, K = 3, s = 2: groups {0,1} {2,3} {4,5} {6,7} lead with 1, 3, 5, 7 (7 shifted in to 6)
    assert _rows(8, 3, 2, False) == [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + [[4, 5, 6]] * 2 + [[5, 6, 7]] * 2
    # stride = kernel (even) is blocked attention: each group sees exactly its own tokens
    assert _rows(8, 4, 4, False) == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4


def test_reference_causal_stride_starts_at_the_last_query_and_ends_at_the_query() -> None:
    # n = 6, K = 3, s = 2: groups {0,1} {2,3} {4,5}; lower bound from 1, 3, 5: 0, 1, 3
    assert _rows(6, 3, 2, True) == [[0], [0, 1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5]]
    # the last group is cut by the axis: its leader is the axis' last position (4, so keys from 3)
    assert _rows(5, 2, 4, True) == [[], [], [2], [2, 3], [3, 4]]


def test_reference_dilation_groups_have_their_own_lengths() -> None:
    # n = 7, d = 2: group 0 holds 0, 2, 4, 6 (4 positions), group 1 holds 1, 3, 5 (3 positions)
    assert _rows(7, 3, 1, False, d=2) == [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]]


# --- the library against the reference ------------------------------------------------------------


def test_issue_example_grid_9x9_kernel_5_stride_2() -> None:
    axis = AxisArgs(9, 5, 1, 2, False)
    _check((9, 9), (axis, axis))


def test_every_1d_neighborhood_up_to_length_10() -> None:
    """Exhaustive on one axis: lengths 1..10, every kernel that fits, dilations 1..3, strides 1..4, causal."""
    for n in range(1, 11):
        for d in range(1, min(n, 3) + 1):
            for causal in (False, True):
                kernels = range(1, 7) if causal else range(1, n // d + 1)
                for k, s in itertools.product(kernels, range(1, 5)):
                    _check((n,), (AxisArgs(n, k, d, s, causal),))


@st.composite
def grids(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[AxisArgs, ...]]:
    ndim = draw(st.integers(2, 3))
    top = {2: 8, 3: 5}[ndim]
    dims, axes = [], []
    for _ in range(ndim):
        n = draw(st.integers(1, top))
        d = draw(st.integers(1, min(n, 3)))
        causal = draw(st.booleans())
        k = draw(st.integers(1, 5)) if causal else draw(st.integers(1, n // d))
        dims.append(n)
        axes.append(AxisArgs(n, k, d, draw(st.integers(1, 4)), causal))
    return tuple(dims), tuple(axes)


@settings(max_examples=150, deadline=None)
@given(grids())
def test_2d_and_3d_neighborhoods_match_natten(case: tuple[tuple[int, ...], tuple[AxisArgs, ...]]) -> None:
    _check(*case)


def test_2d_and_3d_even_strides_and_causal_axes() -> None:
    """The cases the old rule got wrong, each once: even strides, odd and even kernels, causal axes."""
    cases = [
        ((9, 9), (AxisArgs(9, 5, 1, 2, False), AxisArgs(9, 4, 1, 4, False))),
        ((8, 6), (AxisArgs(8, 3, 1, 2, True), AxisArgs(6, 2, 1, 2, False))),
        ((7, 10), (AxisArgs(7, 4, 1, 3, True), AxisArgs(10, 4, 2, 2, False))),
        ((4, 5, 6), (AxisArgs(4, 2, 1, 2, True), AxisArgs(5, 3, 1, 4, False), AxisArgs(6, 2, 3, 2, False))),
        ((3, 6, 6), (AxisArgs(3, 3, 1, 2, True), AxisArgs(6, 6, 1, 4, False), AxisArgs(6, 3, 2, 3, True))),
    ]
    for dims, axes in cases:
        _check(dims, axes)



def test_stride_equal_to_kernel_is_blocked_attention_for_odd_and_even_kernels() -> None:
    """NATTEN's reason for the right-hand centre: stride = kernel dividing the axis tiles the grid."""
    for k in (2, 3, 4, 5):
        dims = (2 * k, 3 * k)
        axes = tuple(AxisArgs(n, k, 1, k, False) for n in dims)
        y, x = np.divmod(np.arange(dims[0] * dims[1]), dims[1])
        tile = (y // k) * 3 + x // k
        np.testing.assert_array_equal(ours(dims, axes), tile[:, None] == tile[None, :], err_msg=f"kernel {k}")

# --- block tables stay sound under the rule: plain order and every layout a grid may get -------------


@settings(max_examples=40, deadline=None)
@given(case=grids(), bq=st.sampled_from([4, 16]), bk=st.sampled_from([4, 8, 16]))
def test_block_tables_are_sound_in_plain_order_and_in_layout_space(
    case: tuple[tuple[int, ...], tuple[AxisArgs, ...]], bq: int, bk: int
) -> None:
    """FULL tiles entirely allowed, unlisted tiles empty, listed ones not, for the NATTEN mask itself."""
    dims, axes = case
    want = natten_mask(dims, axes)
    n = want.shape[0]
    grid = ir.Grid("g", dims)
    body = ir.Neighborhood(
        grid,
        tuple(a.kernel for a in axes),
        tuple(a.dilation for a in axes),
        tuple(a.stride for a in axes),
        tuple(a.causal for a in axes),
    )
    assert_tables_match_mask(want, block_tables(body, n, bq, bk))
    pred = predicate(body)
    for lay in L.candidates(grid, body.dilation, max(bq, bk), min(bq, bk))[:4]:
        rows = E.evaluate_int(L.rows(lay), n)
        r = np.arange(rows, dtype=np.int64)
        zero = np.zeros(1, dtype=np.int64)
        token = np.broadcast_to(eval_numpy(E.bind_n(L.logical_index(lay), n), r, zero, n), r.shape)
        ok = np.broadcast_to(eval_numpy(E.bind_n(L.valid(lay), n), r, zero, n), r.shape).astype(bool)
        t = np.where(ok, token, 0)
        physical = want[t[:, None], t[None, :]] & ok[:, None] & ok[None, :]
        lp = E.bind_n(L.layout_predicate(pred, lay), n)
        assert_tables_match_mask(physical, block_tables(lp, rows, bq, bk))
