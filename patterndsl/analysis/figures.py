"""Which method gives each figure at this N: exact in bounded work where structure allows, else bounds.

Rows (pairs, keys per query, reach, empty rows) and tiles (FULL / PARTIAL per tile size), tried in order:

1. structure: affine row pieces (`pieces.py`) and lattice-point tile counts (`tiles.py`) for predicates
   built from conditions on i - j, on i and on j, and `blockwise` of them; a neighborhood axis by axis.
   Exact, with work that does not grow with N.
2. enumeration of rows and tiles (`count.py`, `cost.py`): exact, O(N) memory, so only for
   N <= ARRAY_LIMIT, and only within a work budget (a predicate interval reasoning cannot split, such
   as `(q * 7 + k * 3) % 11 < 4`, would otherwise cost O(N^2)).
3. bounds from a quad tree with a frontier cap (`coarse.py`), at any N, with the reason.

The pair count, when the pattern has a closed form nnz(N) valid at this N (`symbolic.py`), is exact
whatever method gave the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import ir
from ..expr import Expr
from . import coarse
from . import cost as C
from .bound import Value, exact, lower, make, upper
from .count import RowStats, bound_predicate, row_stats
from .limits import ARRAY_LIMIT, ARRAY_WORK, Budget, OverBudget
from .pieces import NotSeparable, neighborhood_summary, row_pieces, summarize
from .tiles import TileTerms, per_block, tile_terms

BOUNDS_WHY = (
    "bounds: the pattern has no structure the analyser can use at this N (conditions on i - j, on q, on k), "
    "and an exact count would enumerate O(N) rows or more"
)


@dataclass(frozen=True)
class RowFigures:
    pairs: Value
    rows: dict[str, Any]
    method: str
    exact: bool


@dataclass(frozen=True)
class TileFigures:
    visited: Value
    full: Value
    source: str
    exact: bool

    @property
    def partial(self) -> Value:
        if isinstance(self.visited, int) and isinstance(self.full, int):
            return self.visited - self.full
        return make(max(0, lower(self.visited) - upper(self.full)), upper(self.visited) - lower(self.full))


def row_figures(p: ir.Pattern, n: int, closed_pairs: int | None = None) -> RowFigures:
    """Every per-row figure of a static pattern at length n, each exact or bounded."""
    pred = bound_predicate(p, n)
    found = _exact_rows(p, pred, n)
    if found is not None:
        return found
    bounded, rows = coarse.row_bounds(pred, n)
    if closed_pairs is not None:
        bounded = closed_pairs
        rows["keys_per_query"]["mean"] = closed_pairs / n
    return RowFigures(bounded, rows, BOUNDS_WHY, exact(bounded) and all(exact(v) for v in _flat(rows)))


def _exact_rows(p: ir.Pattern, pred: Expr, n: int) -> RowFigures | None:
    if isinstance(p, ir.Neighborhood) and not p.layout.has_extra_tokens:
        try:
            pairs, rows = neighborhood_summary(p, n)
            return RowFigures(pairs, rows, "neighborhood: per-axis rows, multiplied (exact)", True)
        except OverBudget:
            pass
    try:
        pieces, how = row_pieces(pred, n)
        pairs, rows = summarize(pieces, n)
        return RowFigures(pairs, rows, how, True)
    except (NotSeparable, OverBudget):
        pass
    if n <= ARRAY_LIMIT:
        try:
            stats = row_stats(p, n, Budget(ARRAY_WORK))
            return RowFigures(stats.pairs, rows_from_stats(stats), stats.method, True)
        except OverBudget:
            pass
    return None


def _flat(rows: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for v in rows.values():
        out += list(v.values()) if isinstance(v, dict) and "min" in v else [v]
    return out


def exact_pairs(p: ir.Pattern, n: int) -> int | None:
    """The exact pair count when one of the exact methods serves it at this N, else None."""
    f = _exact_rows(p, bound_predicate(p, n), n)
    return f.pairs if f is not None and isinstance(f.pairs, int) else None


def rows_from_stats(s: RowStats) -> dict[str, Any]:
    """The `rows` figures from per-row arrays."""
    has = s.counts > 0
    i = np.arange(s.n)[has]
    empty = s.empty_rows
    future = s.last[has] > i
    return {
        "keys_per_query": _summary(s.counts),
        "reach_back": _summary(i - s.first[has]),  # i - nearest-to-start allowed key
        "reach_forward": _summary(s.last[has] - i),
        "first_key": _summary(s.first[has]),
        "last_key": _summary(s.last[has]),
        "empty_rows": int(empty.size),
        "first_empty_row": int(empty[0]) if empty.size else None,
        "sees_future": bool(future.any()),
        "first_future_row": int(i[future][0]) if future.any() else None,
    }


def _summary(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(x.min()), "mean": float(x.mean()), "max": int(x.max())}


def tile_figures(pred: Expr, n: int, block_q: int, block_k: int) -> TileFigures:
    """FULL and PARTIAL tiles of a bound predicate at length n, exact or bounded."""
    try:
        visited, full = tile_terms(pred, n, block_q, block_k).totals()
        return TileFigures(visited, full, "lattice points of tile offsets per zone pair (exact)", True)
    except (NotSeparable, OverBudget):
        pass
    if n <= ARRAY_LIMIT:
        try:
            b = C.block_counts(pred, n, block_q, block_k, Budget(ARRAY_WORK))
            return TileFigures(b.visited, int(b.full.sum()), b.source, True)
        except OverBudget:
            pass
    v, f = coarse.tile_bounds(pred, n, block_q, block_k)
    return TileFigures(v, f, "bounds: interval classification of tile ranges, stopped at its work budget", False)


def block_rows(pred: Expr, n: int, b: int) -> TileTerms | None:
    """Per-query-block counts of non-empty b x b tiles in affine pieces, or None when unavailable."""
    try:
        t = tile_terms(pred, n, b, b)
        per_block(t.visited, t.q_blocks)  # affine when the tiles are square
        return t
    except (NotSeparable, OverBudget):
        return None
