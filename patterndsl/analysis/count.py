"""Exact allowed-pair counts and per-query key spans at a given N, without an N x N mask.

The one question every other figure of the analyser starts from: for each query row i, how many keys
does the pattern allow, and which is the first and the last. Four exact strategies, tried in order:

- offset form: a predicate of `i - j` alone (windows, causal, stride, hops) is evaluated once per
  offset (2N - 1 values) and rows are read off prefix sums;
- block form: a predicate of `i // b` and `j // b` alone (`blockwise`) is counted on the block grid and
  scaled, the partial last block corrected;
- a neighborhood is a product over axes: each axis is counted alone;
- `... | random(r)`: the rest is counted, then the r drawn keys of each row that the rest misses added;
- anything else: quad-tree subdivision of the (i, j) square with `intervals.classify` (ALL rectangles
  count their area, NONE nothing, SOME split), rectangles of 16 x 16 or less evaluated pair by pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import check, ir
from .. import expr as E
from ..expr import Expr, offset_form
from ..intervals import ALL, SOME, classify
from ..mask import eval_numpy
from ..semantics import _neighborhood_axis, predicate, random_keys
from ..source import PatternError
from ..tiling import block_form, is_plain_random
from .limits import Budget, check_arithmetic, check_n

LEAF = 16  # quad-tree rectangles this small are evaluated pair by pair
DENSE_ELEMENTS = 1 << 21  # pairs evaluated per numpy call at the leaves


@dataclass(frozen=True, slots=True)
class RowStats:
    """Per query row: allowed keys, first and last allowed key (n and -1 for an empty row)."""

    n: int
    counts: np.ndarray
    first: np.ndarray
    last: np.ndarray
    method: str

    @property
    def pairs(self) -> int:
        return int(self.counts.sum())

    @property
    def empty_rows(self) -> np.ndarray:
        return np.flatnonzero(self.counts == 0)


def bound_predicate(p: ir.Pattern, n: int) -> Expr:
    """The predicate of a static pattern with N fixed, after the same validation as the mask."""
    check_n(n)
    if ir.is_dynamic(p):
        raise PatternError(
            "this pattern holds a dynamic selector (topk, threshold, vertical, slash): its pairs depend on q and k",
            None,
            "analyse its static part, e.g. the pattern without the topk/threshold term",
        )
    check.validate(p, n)
    pred = predicate(p)
    check_arithmetic(pred, n)
    return E.bind_n(pred, n)


def row_stats(p: ir.Pattern, n: int, budget: Budget | None = None) -> RowStats:
    """Exact per-row statistics of a static pattern at sequence length n (O(N) memory: N <= ARRAY_LIMIT
    is the caller's business). A budget bounds the interval subdivision (OverBudget past it)."""
    pred = bound_predicate(p, n)
    if isinstance(p, ir.Neighborhood) and not p.layout.has_extra_tokens:
        return _neighborhood(p, n)
    return predicate_stats(pred, n, budget)


def count_pairs(p: ir.Pattern, n: int) -> int:
    return row_stats(p, n).pairs


def predicate_stats(pred: Expr, n: int, budget: Budget | None = None) -> RowStats:
    """Exact per-row statistics of a predicate whose N is bound."""
    if isinstance(pred, E.Const):
        ones = np.full(n, n if pred.value else 0, dtype=np.int64)
        first = np.zeros(n, np.int64) if pred.value else np.full(n, n, np.int64)
        last = np.full(n, n - 1 if pred.value else -1, np.int64)
        return RowStats(n, ones, first, last, "constant")
    offset = offset_form(pred)
    if offset is not None:
        return _offset_stats(offset, n)
    blocked = block_form(pred)
    if blocked is not None:
        return _block_stats(blocked[0], blocked[1], n, budget)
    if isinstance(pred, E.Or):
        sparse = [a for a in pred.args if is_plain_random(a)]
        if sparse:
            return _random_union(E.disj(*(a for a in pred.args if a not in sparse)), sparse, n, budget)
        banded = [a for a in pred.args if offset_form(a) is not None]
        if banded and len(banded) < len(pred.args):
            return _union(E.disj(*banded), E.disj(*(a for a in pred.args if a not in banded)), n, budget)
    if is_plain_random(pred):
        return _random_union(E.FALSE, [pred], n, budget)
    return _quadtree(pred, n, budget)


DRAW_BITS = 1 << 28  # bitmap bits evaluating `random` may take (one row of draw_width bits per query row)


def classify_cost(pred: Expr) -> int:
    """Work units one rectangle's classification costs: `random` enumerates the draws of narrow row
    ranges (intervals.RANDOM_ROWS_ENUMERATED rows), everything else is a few interval operations."""
    from ..intervals import RANDOM_ROWS_ENUMERATED

    return RANDOM_ROWS_ENUMERATED if draw_width(pred) else 1


def draw_width(e: Expr) -> int:
    """The widest `random` draw in the predicate (0 when none): evaluating its membership test costs a
    bitmap row of that many bits per distinct query row (see `mask.eval_numpy`)."""
    match e:
        case E.RandomMember(row, col, n, _, _):
            return max(E.evaluate_int(n), draw_width(row), draw_width(col))
        case E.Arith(_, a, b) | E.Cmp(_, a, b):
            return max(draw_width(a), draw_width(b))
        case E.Abs(a) | E.Log2(a) | E.Not(a) | E.IsPow(a, _):
            return draw_width(a)
        case E.And(args) | E.Or(args):
            return max((draw_width(a) for a in args), default=0)
        case E.IfElse(c, t, o):
            return max(draw_width(c), draw_width(t), draw_width(o))
    return 0


# --- offset form: predicates of d = i - j (the rewrite lives in expr.offset_form) ------------------


def _offset_stats(form: Expr, n: int) -> RowStats:
    d = np.arange(-(n - 1), n, dtype=np.int64)
    allowed = np.broadcast_to(eval_numpy(form, d, np.zeros(1, np.int64), n), d.shape).astype(bool)
    idx = np.arange(2 * n - 1, dtype=np.int64)  # idx = d + n - 1; row i uses idx in [i, i + n - 1]
    prefix = np.concatenate([[0], np.cumsum(allowed, dtype=np.int64)])
    rows = np.arange(n, dtype=np.int64)
    counts = prefix[rows + n] - prefix[rows]
    last_at = np.maximum.accumulate(np.where(allowed, idx, -1))[rows + n - 1]  # largest allowed d
    next_at = np.minimum.accumulate(np.where(allowed, idx, 1 << 62)[::-1])[::-1][rows]  # smallest
    has = counts > 0
    first = np.where(has, rows - (last_at - (n - 1)), n)
    last = np.where(has, rows - (next_at - (n - 1)), -1)
    return RowStats(n, counts, first, last, "offset form (exact, O(N))")


def _union(a: Expr, b: Expr, n: int, budget: Budget | None) -> RowStats:
    """|A or B| = |A| + |B| - |A and B| per row; the first and last keys are the extremes of both."""
    sa, sb = predicate_stats(a, n, budget), predicate_stats(b, n, budget)
    both = predicate_stats(E.conj(a, b), n, budget)
    counts = sa.counts + sb.counts - both.counts
    method = f"inclusion-exclusion: {sa.method} | {sb.method}"
    return RowStats(n, counts, np.minimum(sa.first, sb.first), np.maximum(sa.last, sb.last), method)


# --- block form: predicates of i // b and j // b (found by `tiling.block_form`, which the tiles share) ---


def _block_stats(b: int, inner: Expr, n: int, budget: Budget | None) -> RowStats:
    nb = -(-n // b)
    tail = n - b * (nb - 1)  # tokens in the last block
    s = predicate_stats(inner, nb, budget)
    blocks = np.arange(nb, dtype=np.int64)
    last_col = np.broadcast_to(eval_numpy(inner, blocks, np.full(1, nb - 1, np.int64), nb), (nb,)).astype(np.int64)
    per_block = b * s.counts - (b - tail) * last_col
    rows = np.arange(n, dtype=np.int64) // b
    has = s.counts[rows] > 0
    first = np.where(has, b * s.first[rows], n)
    last = np.where(has, np.minimum(n - 1, b * s.last[rows] + b - 1), -1)
    return RowStats(n, per_block[rows], first, last, f"blocks of {b} ({s.method} on {nb} blocks)")


# --- union with random(r): count the rest, then the draws it misses -----------------------------------


def _random_union(rest: Expr, draws: list[Expr], n: int, budget: Budget | None) -> RowStats:
    base = predicate_stats(rest, n, budget)
    rows = np.arange(n, dtype=np.int64)
    keys = np.concatenate(
        [
            random_keys(rows, E.evaluate_int(d.n), E.evaluate_int(d.r), d.seed)
            for d in draws
            if isinstance(d, E.RandomMember)
        ],
        axis=1,
    )
    if keys.shape[1] == 0:
        return base
    keys.sort(axis=1)
    fresh = np.ones(keys.shape, dtype=bool)
    fresh[:, 1:] = keys[:, 1:] != keys[:, :-1]
    if not isinstance(rest, E.Const) or rest.value:
        fresh &= ~np.broadcast_to(eval_numpy(rest, rows[:, None], keys, n), keys.shape).astype(bool)
    counts = base.counts + fresh.sum(axis=1)
    first = np.minimum(base.first, np.where(fresh, keys, n).min(axis=1))
    last = np.maximum(base.last, np.where(fresh, keys, -1).max(axis=1))
    return RowStats(n, counts, first, last, f"{base.method} + enumerated random draws")


# --- neighborhoods: a product over axes ----------------------------------------------------------------


def _neighborhood(p: ir.Neighborhood, n: int) -> RowStats:
    dims = p.layout.dims
    per_axis = [
        predicate_stats(
            E.bind_n(
                _neighborhood_axis(E.I, E.J, dims[a], p.kernel[a], p.dilation[a], p.stride[a], p.causal[a]), dims[a]
            ),
            dims[a],
        )
        for a in range(len(dims))
    ]
    counts = np.ones(1, dtype=np.int64)
    first = np.zeros(1, dtype=np.int64)
    last = np.zeros(1, dtype=np.int64)
    for a, s in enumerate(per_axis):
        stride = p.layout.strides[a]
        counts = (counts[:, None] * s.counts[None, :]).reshape(-1)
        first = (first[:, None] + stride * s.first[None, :]).reshape(-1)
        last = (last[:, None] + stride * s.last[None, :]).reshape(-1)
    has = counts > 0
    return RowStats(
        n, counts, np.where(has, first, n), np.where(has, last, -1), "neighborhood: product of per-axis counts"
    )


# --- generic: quad-tree subdivision with interval reasoning -------------------------------------------


def _quadtree(pred: Expr, n: int, budget: Budget | None) -> RowStats:
    diff = np.zeros(n + 1, dtype=np.int64)
    first = np.full(n, n, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    size = 1 << max(0, (n - 1).bit_length())
    i_lo = np.zeros(1, dtype=np.int64)
    j_lo = np.zeros(1, dtype=np.int64)
    while i_lo.size:
        i_hi = np.minimum(i_lo + size - 1, n - 1)
        j_hi = np.minimum(j_lo + size - 1, n - 1)
        if budget is not None:
            budget.spend(int(i_lo.size) * classify_cost(pred))
        verdict = classify(pred, i_lo, i_hi, j_lo, j_hi)
        full = verdict == ALL
        if full.any():
            a, b, c, d = i_lo[full], i_hi[full], j_lo[full], j_hi[full]
            width = d - c + 1
            np.add.at(diff, a, width)
            np.add.at(diff, b + 1, -width)
            _span_update(first, last, a // size, c, d, size, n)
        some = verdict == SOME
        i_lo, j_lo = i_lo[some], j_lo[some]
        if size <= LEAF or i_lo.size * size * size <= DENSE_ELEMENTS:
            if budget is not None:  # numpy evaluates pairs ~64x cheaper than a classification; draws cost N a row
                budget.spend(int(i_lo.size) * size * max(size, draw_width(pred)) // 64)
            _dense_leaves(pred, n, i_lo, j_lo, size, diff, first, last)
            break
        half = size // 2
        kids_i = np.concatenate([i_lo, i_lo, i_lo + half, i_lo + half])
        kids_j = np.concatenate([j_lo, j_lo + half, j_lo, j_lo + half])
        keep = (kids_i < n) & (kids_j < n)
        i_lo, j_lo, size = kids_i[keep], kids_j[keep], half
    counts = np.cumsum(diff[:n])
    return RowStats(n, counts, first, last, "interval subdivision (exact)")


def _span_update(
    first: np.ndarray, last: np.ndarray, tile: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: int, n: int
) -> None:
    """first/last per row from ALL rectangles aligned on tiles of `size` rows."""
    tiles = -(-n // size)
    if tile.size * 8 < tiles:  # few rectangles: update their rows directly
        for t, a, b in zip(tile.tolist(), lo.tolist(), hi.tolist(), strict=True):
            sl = slice(t * size, min(n, (t + 1) * size))
            np.minimum(first[sl], a, out=first[sl])
            np.maximum(last[sl], b, out=last[sl])
        return
    tmin = np.full(tiles, n, dtype=np.int64)
    tmax = np.full(tiles, -1, dtype=np.int64)
    np.minimum.at(tmin, tile, lo)
    np.maximum.at(tmax, tile, hi)
    np.minimum(first, np.repeat(tmin, size)[:n], out=first)
    np.maximum(last, np.repeat(tmax, size)[:n], out=last)


def _dense_leaves(
    pred: Expr, n: int, i_lo: np.ndarray, j_lo: np.ndarray, size: int,
    diff: np.ndarray, first: np.ndarray, last: np.ndarray,
) -> None:  # fmt: skip
    if i_lo.size == 0:
        return
    ar = np.arange(size, dtype=np.int64)
    step = max(1, DENSE_ELEMENTS // (size * size))
    for s in range(0, i_lo.size, step):
        ii = i_lo[s : s + step, None, None] + ar[None, :, None]
        jj = j_lo[s : s + step, None, None] + ar[None, None, :]
        m = np.broadcast_to(
            eval_numpy(pred, np.minimum(ii, n - 1), np.minimum(jj, n - 1), n), (ii.shape[0], size, size)
        )
        m = m & (ii < n) & (jj < n)
        rows = ii[:, :, 0].reshape(-1)
        flat = m.reshape(-1, size)
        live = rows < n
        rows, flat = rows[live], flat[live]
        cnt = flat.sum(axis=1)
        np.add.at(diff, rows, cnt)
        np.add.at(diff, rows + 1, -cnt)
        hit = cnt > 0
        base = np.repeat(j_lo[s : s + step], size)[live]
        np.minimum.at(first, rows[hit], base[hit] + flat[hit].argmax(axis=1))
        np.maximum.at(last, rows[hit], base[hit] + size - 1 - flat[hit][:, ::-1].argmax(axis=1))
