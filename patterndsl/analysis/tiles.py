"""Exact FULL and PARTIAL tile counts of a separable predicate at any N, by counting lattice points.

A BQ x BK tile (query block qb, key block kb) whose rows lie in one row zone and whose keys lie in one
key zone (`pieces.Structure`) sees the offsets d in [D - BK + 1, D + BQ - 1], D = qb * BQ - kb * BK, each
of them by some pair; the zone pair allows a few runs [a, b] of d. So the tile is non-empty exactly when
D lies in a run widened to [a - BQ + 1, b + BK - 1], and FULL exactly when D lies in a run narrowed to
[a + BK - 1, b - BQ + 1]. Counting the (qb, kb) of a box of such "clean" tiles with D in [v0, v1] is a
lattice-point count: for each qb the kb form an interval whose ends are floor((qb * BQ - v) / BK), and
sums of such floors over a range of qb have a closed form (`floor_sum`, Euclid-like, O(log)).

The few query blocks and key blocks that straddle a zone edge (or are the last, partial ones) are split
into sub-tiles, one per zone pair; a sub-tile's status is an interval condition on the other block
index, so each such block row or column is a union (non-empty) or intersection (FULL) of intervals.

Per query block the counts are returned as terms c * floor((alpha * qb + beta) / m) over ranges of qb:
their sum is the total, and when BQ == BK every term is affine in qb, which gives per-block minima and
maxima too (selector candidates). Work grows with the number of zones, runs and straddling blocks,
never with N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..expr import Expr
from ..intervals import merge_runs
from ..tiling import block_form
from .limits import Budget, OverBudget
from .pieces import MAX_PIECES, Structure, Zone, structure


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum_{x = 0}^{n - 1} floor((a * x + b) / m) for n >= 0, m >= 1, a >= 0 and any integer b."""
    if n <= 0:
        return 0
    q, b = divmod(b, m)
    total = q * n
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y = a * n + b
        if y < m:
            return total
        n, b = divmod(y, m)
        m, a = a, m


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Term:
    """sign * floor((alpha * q + beta) / m) for every query block q in [q0, q1]."""

    q0: int
    q1: int
    sign: int
    alpha: int
    beta: int
    m: int = 1

    def total(self) -> int:
        return self.sign * floor_sum(self.q1 - self.q0 + 1, self.m, self.alpha, self.alpha * self.q0 + self.beta)


def _const(q0: int, q1: int, c: int) -> list[Term]:
    return [Term(q0, q1, 1, 0, c)] if c and q0 <= q1 else []


@dataclass(frozen=True, slots=True)
class TileTerms:
    """Non-empty (visited) and FULL tiles per query block, as sums of terms."""

    q_blocks: int
    visited: list[Term]
    full: list[Term]

    def totals(self) -> tuple[int, int]:
        return sum(t.total() for t in self.visited), sum(t.total() for t in self.full)


def tile_terms(pred: Expr, n: int, block_q: int, block_k: int, budget: Budget | None = None) -> TileTerms:
    """Exact per-query-block tile counts of a bound, separable predicate (NotSeparable / OverBudget else)."""
    budget = budget or Budget()
    blocked = block_form(pred)
    if blocked is not None:
        b, inner = blocked
        if block_q % b or block_k % b:
            raise OverBudget  # tiles that cut the pattern's blocks: no structure to use here
        nb = -(-n // b)
        return _terms(structure(inner, nb, budget), block_q // b, block_k // b)
    return _terms(structure(pred, n, budget), block_q, block_k)


def _widen(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Each run [a, b] as [a + lo, b + hi], dropping empty ones, merged."""
    r = np.stack([runs[:, 0] + lo, runs[:, 1] + hi], axis=1) if runs.shape[0] else runs
    return merge_runs(r[r[:, 0] <= r[:, 1]]) if r.shape[0] else r


def _lattice(q0: int, q1: int, k0: int, k1: int, v0: int, v1: int, p: int, q: int) -> list[Term]:
    """Terms counting, per qb in [q0, q1], the kb in [k0, k1] with v0 <= qb * p - kb * q <= v1.

    For one qb those kb are (Y, X] with X = floor((p * qb - v0) / q), Y = floor((p * qb - v1 - 1) / q),
    Y <= X; clipped to [k0, k1] the count is min(k1, X) - max(k0 - 1, Y) when X >= k0 and Y < k1, else 0.
    X and Y grow with qb, so four thresholds cut [q0, q1] into ranges of one form each.
    """
    t_x0, t_x1 = _cdiv(k0 * q + v0, p), _cdiv(k1 * q + v0, p)  # first qb with X >= k0, X >= k1
    t_y0, t_y1 = _cdiv(k0 * q + v1 + 1, p), _cdiv(k1 * q + v1 + 1, p)  # first qb with Y >= k0, Y >= k1
    cuts = sorted({q0, q1 + 1, *(t for t in (t_x0, t_x1, t_y0, t_y1) if q0 < t <= q1)})
    out: list[Term] = []
    for s, e in zip(cuts[:-1], cuts[1:], strict=True):
        e -= 1
        if s < t_x0 or s >= t_y1:
            continue
        if s >= t_x1:
            out += _const(s, e, k1)
        else:
            out.append(Term(s, e, 1, p, -v0, q))
        if s >= t_y0:
            out.append(Term(s, e, -1, p, -v1 - 1, q))
        else:
            out += _const(s, e, -(k0 - 1))
    return out


Intervals = list[tuple[int, int]]


def _union(sets: list[Intervals]) -> Intervals:
    flat = sorted(x for s in sets for x in s if x[0] <= x[1])
    out: Intervals = []
    for a, b in flat:
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(x: Intervals, y: Intervals) -> Intervals:
    out: Intervals = []
    i = j = 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a <= b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _clip(s: Intervals, lo: int, hi: int) -> Intervals:
    return _intersect(s, [(lo, hi)]) if lo <= hi else []


def _count(s: Intervals) -> int:
    return sum(b - a + 1 for a, b in s)


def _zone_of(zones: list[Zone], x: int) -> Zone:
    lo, hi = 0, len(zones) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if zones[mid].lo <= x:
            lo = mid
        else:
            hi = mid - 1
    return zones[lo]


def _parts(zones: list[Zone], lo: int, hi: int) -> list[tuple[int, int, Zone]]:
    """[lo, hi] cut at zone edges: (first, last, zone) of each part."""
    out = []
    x = lo
    while x <= hi:
        z = _zone_of(zones, x)
        end = min(hi, z.hi - 1)
        out.append((x, end, z))
        x = end + 1
    return out


def _terms(st: Structure, p: int, q: int) -> TileTerms:
    n = st.n
    nq, nk = -(-n // p), -(-n // q)

    def clean(zones: list[Zone], size: int) -> list[tuple[int, int, Zone]]:
        """Per zone, the whole blocks inside it: (first block, last block, zone)."""
        return [(_cdiv(z.lo, size), z.hi // size - 1, z) for z in zones if _cdiv(z.lo, size) <= z.hi // size - 1]

    def straddling(zones: list[Zone], size: int, count: int) -> list[int]:
        inner = {z.lo // size for z in zones if z.lo % size}
        if n % size:
            inner.add(count - 1)
        return sorted(inner)

    clean_q, clean_k = clean(st.rows, p), clean(st.cols, q)
    odd_q, odd_k = straddling(st.rows, p, nq), straddling(st.cols, q, nk)
    if (len(odd_q) + 1) * (len(odd_k) + 1) * (len(st.rows) + len(st.cols)) > MAX_PIECES:
        raise OverBudget
    visited: list[Term] = []
    full: list[Term] = []
    # clean query blocks x clean key blocks: lattice points
    for q0, q1, rz in clean_q:
        for k0, k1, cz in clean_k:
            runs = st.offsets(rz, cz)
            for v0, v1 in _widen(runs, -(p - 1), q - 1).tolist():
                visited += _lattice(q0, q1, k0, k1, v0, v1, p, q)
            for v0, v1 in _widen(runs, q - 1, -(p - 1)).tolist():
                full += _lattice(q0, q1, k0, k1, v0, v1, p, q)
        # clean query blocks x straddling key blocks: intervals of qb
        for kb in odd_k:
            some: list[Intervals] = []
            every: Intervals | None = None
            for s0, s1, cz in _parts(st.cols, kb * q, min(n, kb * q + q) - 1):
                runs = st.offsets(rz, cz).tolist()
                some.append([(_cdiv(a + s0 - p + 1, p), (b + s1) // p) for a, b in runs])
                mine = _union([[(_cdiv(a + s1, p), (b - p + 1 + s0) // p) for a, b in runs]])
                every = mine if every is None else _intersect(every, mine)
            for a, b in _clip(_union(some), q0, q1):
                visited += _const(a, b, 1)
            for a, b in _clip(every or [], q0, q1):
                full += _const(a, b, 1)
    # straddling query blocks: each on its own, against every key block
    for qb in odd_q:
        rows = _parts(st.rows, qb * p, min(n, qb * p + p) - 1)
        v = f = 0
        for k0, k1, cz in clean_k:
            some = []
            every = None
            for s0, s1, rz in rows:
                runs = st.offsets(rz, cz).tolist()
                some.append([(_cdiv(s0 - q + 1 - b, q), (s1 - a) // q) for a, b in runs])
                mine = _union([[(_cdiv(s1 - b, q), (s0 - q + 1 - a) // q) for a, b in runs]])
                every = mine if every is None else _intersect(every, mine)
            v += _count(_clip(_union(some), k0, k1))
            f += _count(_clip(every or [], k0, k1))
        for kb in odd_k:
            cols = _parts(st.cols, kb * q, min(n, kb * q + q) - 1)
            hit, all_in = False, True
            for s0, s1, rz in rows:
                for t0, t1, cz in cols:
                    runs = st.offsets(rz, cz)
                    lo, hi = s0 - t1, s1 - t0  # the sub-tile's offsets
                    meets = bool(((runs[:, 0] <= hi) & (runs[:, 1] >= lo)).any())
                    inside = bool(((runs[:, 0] <= lo) & (runs[:, 1] >= hi)).any())
                    hit |= meets
                    all_in &= inside
            v += int(hit)
            f += int(hit and all_in)
        visited += _const(qb, qb, v)
        full += _const(qb, qb, f)
    st.budget.spend(len(visited) + len(full))
    return TileTerms(nq, visited, full)


def per_block(terms: list[Term], q_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine pieces of the per-query-block count: (starts, value at start, slope), when every term is
    affine (alpha a multiple of m, as when BQ == BK); raises OverBudget otherwise."""
    edges = {0, q_blocks}
    for t in terms:
        if t.alpha % t.m:
            raise OverBudget
        edges.update((t.q0, t.q1 + 1))
    starts = np.array(sorted(e for e in edges if 0 <= e <= q_blocks), dtype=object)
    level = np.zeros(starts.size, dtype=object)
    slope = np.zeros(starts.size, dtype=object)
    index = {int(s): k for k, s in enumerate(starts)}
    for t in terms:
        k0, k1 = index[t.q0], index[t.q1 + 1]
        rate = t.sign * (t.alpha // t.m)
        base = t.sign * (t.beta // t.m)  # floor((alpha q + beta) / m) = (alpha / m) q + floor(beta / m)
        level[k0] += base
        level[k1] -= base
        slope[k0] += rate
        slope[k1] -= rate
    level, slope = np.cumsum(level), np.cumsum(slope)
    return starts[:-1], (level + slope * starts)[:-1], slope[:-1]
