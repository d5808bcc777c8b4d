"""Bounds for any static predicate at any N, in bounded work: a quad tree that stops at a frontier cap.

The last resort, for predicates without the structure `pieces.py` and `tiles.py` use (e.g. `q // 3 ==
k // 2`, or runs too many to list) at an N too large to enumerate rows. Rectangles of (i, j) pairs (or
of tiles) are classified by `intervals.classify`; ALL rectangles are certain, SOME ones are split until
the frontier would pass FRONTIER rectangles, and what is left SOME is unresolved. Every figure is then
a bound: certain pairs <= pairs <= certain + unresolved, and per row the same, read off the rectangles
that cover it. Quad-tree rectangles are aligned on powers of two, so the rectangles covering a row
are found level by level with a sorted lookup, never with an array over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..expr import Expr
from ..intervals import ALL, SOME, classify
from .bound import Bound, Value, make
from .count import classify_cost

FRONTIER = 1 << 18  # SOME rectangles one level may hold


@dataclass(frozen=True)
class Rects:
    """Quad-tree leaves in units (tokens or tiles), half-open: [q_lo, q_hi) x [k_lo, k_hi)."""

    q_lo: np.ndarray
    q_hi: np.ndarray
    k_lo: np.ndarray
    k_hi: np.ndarray
    certain: np.ndarray  # bool: ALL (else SOME: unresolved)
    size: np.ndarray  # the side of the quad-tree cell each came from (a power of two)


def quadtree(pred: Expr, n: int, unit_q: int = 1, unit_k: int = 1, frontier: int = FRONTIER) -> Rects:
    """ALL rectangles, and the SOME ones left when splitting would pass the frontier (or at single units)."""
    nq, nk = -(-n // unit_q), -(-n // unit_k)
    frontier = max(4, frontier // classify_cost(pred))
    size = 1 << max(0, (max(nq, nk) - 1).bit_length())
    qb = np.zeros(1, dtype=np.int64)
    kb = np.zeros(1, dtype=np.int64)
    out: list[tuple[np.ndarray, ...]] = []
    while qb.size:
        q_hi = np.minimum(qb + size, nq)
        k_hi = np.minimum(kb + size, nk)
        verdict = classify(
            pred, qb * unit_q, np.minimum(q_hi * unit_q, n) - 1, kb * unit_k, np.minimum(k_hi * unit_k, n) - 1
        )
        every = verdict == ALL
        some = verdict == SOME
        stop = size == 1 or 4 * int(some.sum()) > frontier
        keep = every | some if stop else every
        out.append((qb[keep], q_hi[keep], kb[keep], k_hi[keep], every[keep], np.full(int(keep.sum()), size)))
        if stop:
            break
        qb, kb = qb[some], kb[some]
        half = size // 2
        kids_q = np.concatenate([qb, qb, qb + half, qb + half])
        kids_k = np.concatenate([kb, kb + half, kb, kb + half])
        inside = (kids_q < nq) & (kids_k < nk)
        qb, kb, size = kids_q[inside], kids_k[inside], half
    parts = [np.concatenate(x) for x in zip(*out, strict=True)]
    return Rects(*parts)


def tile_bounds(pred: Expr, n: int, block_q: int, block_k: int) -> tuple[Bound, Bound]:
    """(visited, FULL) tiles: an ALL rectangle's tiles are FULL; a SOME one's may be anything."""
    r = quadtree(pred, n, block_q, block_k)
    area = [int(a) * int(b) for a, b in zip(r.q_hi - r.q_lo, r.k_hi - r.k_lo, strict=True)]
    sure = sum(a for a, c in zip(area, r.certain.tolist(), strict=True) if c)
    unsure = sum(area) - sure
    return Bound(sure, sure + unsure), Bound(sure, sure + unsure)


@dataclass(frozen=True)
class _Rows:
    """Elementary row ranges [start, stop) with bounds that hold for every row in them."""

    start: np.ndarray
    stop: np.ndarray
    count_lo: np.ndarray  # keys surely allowed
    count_hi: np.ndarray  # keys possibly allowed
    first_lo: np.ndarray  # bounds on the first key, if the row has one
    first_hi: np.ndarray
    last_lo: np.ndarray
    last_hi: np.ndarray


def _cover(r: Rects, starts: np.ndarray, mask: np.ndarray, values: np.ndarray, reduce: Any, fill: int) -> np.ndarray:
    """Per row range starting at `starts`: `reduce` (np.minimum or np.maximum) of `values` over the
    rectangles selected by `mask` that cover it, `fill` where none does."""
    out = np.full(starts.shape, fill, dtype=np.int64)
    for s in np.unique(r.size[mask]).tolist():
        sel = mask & (r.size == s)
        keys, vals = r.q_lo[sel], values[sel]
        order = np.argsort(keys, kind="stable")
        keys, vals = keys[order], vals[order]
        uniq, first = np.unique(keys, return_index=True)
        agg = reduce.reduceat(vals, first)
        cell = starts // s * s  # the cell of this level holding each row range
        k = np.clip(np.searchsorted(uniq, cell), 0, uniq.size - 1)
        hit = uniq[k] == cell
        out = np.where(hit, reduce(out, agg[k]), out)
    return out


def _rows(r: Rects, n: int) -> _Rows:
    edges = np.unique(np.concatenate([[0, n], r.q_lo, r.q_hi]))
    edges = edges[(edges >= 0) & (edges <= n)]
    start, stop = edges[:-1], edges[1:]
    width = (r.k_hi - r.k_lo).astype(np.int64)
    lo_idx, hi_idx = np.searchsorted(edges, r.q_lo), np.searchsorted(edges, r.q_hi)

    def summed(mask: np.ndarray) -> np.ndarray:
        diff = np.zeros(edges.size, dtype=np.int64)
        np.add.at(diff, lo_idx[mask], width[mask])
        np.add.at(diff, hi_idx[mask], -width[mask])
        return np.cumsum(diff)[:-1]

    sure, unsure = r.certain, ~r.certain
    every = np.ones(r.certain.shape, dtype=bool)
    count_lo = summed(sure)
    count_hi = count_lo + summed(unsure)
    first_lo = _cover(r, start, every, r.k_lo, np.minimum, n)
    first_sure = _cover(r, start, sure, r.k_lo, np.minimum, n)
    first_any = _cover(r, start, unsure, r.k_hi - 1, np.maximum, -1)
    first_hi = np.where(first_sure < n, first_sure, first_any)
    last_hi = _cover(r, start, every, r.k_hi - 1, np.maximum, -1)
    last_sure = _cover(r, start, sure, r.k_hi - 1, np.maximum, -1)
    last_any = _cover(r, start, unsure, r.k_lo, np.minimum, n)
    last_lo = np.where(last_sure >= 0, last_sure, last_any)
    return _Rows(start, stop, count_lo, count_hi, first_lo, first_hi, last_lo, last_hi)


def _span(values: list[tuple[int, int]], certain: list[bool]) -> dict[str, Value]:
    """min / mean / max bounds of a figure over non-empty rows, from per-range (lowest, highest)
    values and whether each range surely has keys. The mean is bounded by the extremes."""
    possible = values
    sure = [v for v, c in zip(values, certain, strict=True) if c]
    if not possible:
        return {"min": 0, "mean": 0.0, "max": 0}
    mn_lo = min(v[0] for v in possible)
    mn_hi = min(v[1] for v in sure) if sure else max(v[1] for v in possible)
    mx_lo = max(v[0] for v in sure) if sure else min(v[0] for v in possible)
    mx_hi = max(v[1] for v in possible)
    return {
        "min": make(mn_lo, max(mn_lo, mn_hi)),
        "mean": make(float(mn_lo), float(mx_hi)),
        "max": make(min(mx_lo, mx_hi), mx_hi),
    }


def row_bounds(pred: Expr, n: int, frontier: int = FRONTIER) -> tuple[Value, dict[str, Any]]:
    """Allowed pairs and the `rows` figures of `patc analyze`, each exact or bounded."""
    rows = _rows(quadtree(pred, n, frontier=frontier), n)
    length = [int(x) for x in rows.stop - rows.start]
    start = [int(x) for x in rows.start]
    last_row = [s + m - 1 for s, m in zip(start, length, strict=True)]
    c_lo, c_hi = [int(x) for x in rows.count_lo], [int(x) for x in rows.count_hi]
    pairs = make(
        sum(a * m for a, m in zip(c_lo, length, strict=True)), sum(b * m for b, m in zip(c_hi, length, strict=True))
    )
    live = [k for k in range(len(start)) if c_hi[k] > 0]
    sure = [c_lo[k] > 0 for k in live]
    f_lo, f_hi = [int(rows.first_lo[k]) for k in live], [int(rows.first_hi[k]) for k in live]
    l_lo, l_hi = [int(rows.last_lo[k]) for k in live], [int(rows.last_hi[k]) for k in live]
    lo_row, hi_row = [start[k] for k in live], [last_row[k] for k in live]
    empty_lo = sum(m for m, b in zip(length, c_hi, strict=True) if b == 0)
    empty_hi = sum(m for m, a in zip(length, c_lo, strict=True) if a == 0)
    maybe_empty = [s for s, a in zip(start, c_lo, strict=True) if a == 0]
    surely_empty = [s for s, b in zip(start, c_hi, strict=True) if b == 0]
    future_sure = [lo_row[t] for t in range(len(live)) if sure[t] and l_lo[t] > lo_row[t]]
    future_maybe = [lo_row[t] for t in range(len(live)) if l_hi[t] > lo_row[t]]
    sees: bool | None = True if future_sure else (False if not future_maybe else None)
    return pairs, {
        "keys_per_query": {
            "min": make(min(c_lo), min(c_hi)),
            "mean": make(
                sum(a * m for a, m in zip(c_lo, length, strict=True)) / n,
                sum(b * m for b, m in zip(c_hi, length, strict=True)) / n,
            ),
            "max": make(max(c_lo), max(c_hi)),
        },
        "reach_back": _span([(lo_row[t] - f_hi[t], hi_row[t] - f_lo[t]) for t in range(len(live))], sure),
        "reach_forward": _span([(l_lo[t] - hi_row[t], l_hi[t] - lo_row[t]) for t in range(len(live))], sure),
        "first_key": _span(list(zip(f_lo, f_hi, strict=True)), sure),
        "last_key": _span(list(zip(l_lo, l_hi, strict=True)), sure),
        "empty_rows": make(empty_lo, empty_hi),
        "first_empty_row": _first(maybe_empty, surely_empty),
        "sees_future": sees,
        "first_future_row": _first(future_maybe, future_sure),
    }


def _first(maybe: list[int], sure: list[int]) -> Any:
    """The first row with a property: None when no row may have it; a bound when one surely has it;
    else {"lower": x, "upper": None}: not before x, if at all."""
    if not maybe:
        return None
    if sure:
        return make(maybe[0], sure[0])
    return {"lower": maybe[0], "upper": None}
