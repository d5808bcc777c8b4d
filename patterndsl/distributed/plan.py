"""Who needs which keys: the exchange of a context-parallel run, derived from the pattern's tiles.

A rank's queries need the keys of every tile they visit. The tiles come from the analyser's quad tree
(`analysis.cost.tiles_of`: rectangles of FULL tiles and single PARTIAL ones, never an N x N array), in
tokens; each rectangle's query rows and key columns are cut by the placement's runs, and where a run of
queries and a run of keys belong to different ranks the keys' owner sends that run's part of the
rectangle's columns. Exact at tile granularity; per (receiver, sender) the intervals are merged, so a
key row travels at most once to each rank. Packed documents: each document's tiles, shifted to its start.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .. import expr as E
from ..analysis.cost import tiles_of
from ..analysis.count import predicate_stats
from .placement import Placement

if TYPE_CHECKING:
    from ..runtime.spec import PatternSpec


@dataclass(frozen=True)
class Terms:
    """What the exchange depends on: each predicate the heads use (N free) with how many heads (and
    layers) use it, and whether a selector may pick blocks beyond them (then every key is needed)."""

    predicates: tuple[tuple[E.Expr, int], ...]
    dynamic: bool = False

    @staticmethod
    def of_spec(spec: PatternSpec, layer: int | None = None) -> Terms:
        """A compiled pattern's terms (a model's at `layer`)."""
        from ..runtime.common import _head_patterns

        patterns = _head_patterns(spec, layer)
        heads = (patterns,) if isinstance(patterns, int) else patterns
        used = sorted(set(heads))
        dynamic = any(spec.selectors[p] is not None for p in used)
        return Terms(tuple((spec.predicates[p].expr, heads.count(p)) for p in used), dynamic)


def doc_bounds(n: int, docs: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """(start, length) of each document: `docs` are the cu_seqlens boundaries, None one sequence of n."""
    if docs is None:
        return [(0, n)]
    return [(a, b - a) for a, b in zip(docs[:-1], docs[1:], strict=True) if b > a]


@lru_cache(maxsize=64)
def _row_counts(expr: E.Expr, n: int) -> np.ndarray:
    return predicate_stats(E.bind_n(expr, n), n).counts


@lru_cache(maxsize=64)
def _rects(expr: E.Expr, n: int, block: int) -> tuple[np.ndarray, ...]:
    t = tiles_of(E.bind_n(expr, n), n, block, block)
    q_lo, q_hi = np.concatenate([t.q_lo, t.part_q]), np.concatenate([t.q_hi, t.part_q + 1])
    k_lo, k_hi = np.concatenate([t.k_lo, t.part_k]), np.concatenate([t.k_hi, t.part_k + 1])
    return (q_lo * block, np.minimum(q_hi * block, n), k_lo * block, np.minimum(k_hi * block, n))


def row_costs(terms: Terms, n: int, docs: tuple[int, ...] | None = None) -> np.ndarray:
    """Allowed pairs per query row [n], summed over the heads (exact: the analyser's row counts)."""
    out = np.zeros(n, dtype=np.int64)
    for expr, heads in terms.predicates:
        for start, length in doc_bounds(n, docs):
            out[start:start + length] += heads * _row_counts(expr, length)
    return out


def tiles(terms: Terms, n: int, block: int, docs: tuple[int, ...] | None = None) -> tuple[np.ndarray, ...]:
    """(q_lo, q_hi, k_lo, k_hi) token intervals of rectangles covering every visited tile of every head's
    predicate (block x block tiles, per document)."""
    parts: list[tuple[np.ndarray, ...]] = []
    for expr, _ in terms.predicates:
        for start, length in doc_bounds(n, docs):
            parts.append(tuple(a + start for a in _rects(expr, length, block)))
    return tuple(np.concatenate(x) for x in zip(*parts, strict=True))


def _expand(lo: np.ndarray, hi: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rectangle index, run index) for every run that the intervals [lo, hi) overlap (runs sorted)."""
    first = np.searchsorted(stops, lo, side="right")
    last = np.searchsorted(starts, hi, side="left")
    count = np.maximum(last - first, 0)
    rect = np.repeat(np.arange(lo.size), count)
    at = np.arange(rect.size) - np.repeat(np.cumsum(count) - count, count)
    return rect, first[rect] + at


@dataclass(frozen=True)
class Plan:
    """The exchange of one placement: `recv[r][s]` the merged key intervals [m, 2] that rank r receives
    from rank s (empty for s == r), in global token positions."""

    placement: Placement
    block: int
    recv: tuple[tuple[np.ndarray, ...], ...]

    def tokens_sent(self) -> np.ndarray:
        """Key rows each rank sends (over all receivers)."""
        w = self.placement.world
        return np.array([sum(int((self.recv[r][s][:, 1] - self.recv[r][s][:, 0]).sum()) for r in range(w))
                         for s in range(w)], dtype=np.int64)

    def tokens_received(self) -> np.ndarray:
        return np.array([sum(int((iv[:, 1] - iv[:, 0]).sum()) for iv in row) for row in self.recv], dtype=np.int64)


def plan(terms: Terms, placement: Placement, block: int = 128, docs: tuple[int, ...] | None = None) -> Plan:
    """The keys each rank needs from each other rank for `placement` (see the module's docstring)."""
    w, n = placement.world, placement.n
    runs = sorted((a, b, r) for r, rr in enumerate(placement.runs) for a, b in rr if b > a)
    starts, stops, owner = (np.array([x[i] for x in runs], dtype=np.int64) for i in range(3))
    empty = np.zeros((0, 2), dtype=np.int64)
    if terms.dynamic:  # a selector may pick any block: every key everywhere
        return Plan(placement, block, tuple(tuple(empty if s == r else np.array(
            [[a, b] for a, b in placement.runs[s] if b > a], dtype=np.int64).reshape(-1, 2) for s in range(w))
            for r in range(w)))
    q_lo, q_hi, k_lo, k_hi = tiles(terms, n, block, docs)
    rect, qrun = _expand(q_lo, q_hi, starts, stops)
    rect2, krun = _expand(k_lo[rect], k_hi[rect], starts, stops)
    rect, qrun = rect[rect2], qrun[rect2]
    r, s = owner[qrun], owner[krun]
    lo = np.maximum(k_lo[rect], starts[krun])
    hi = np.minimum(k_hi[rect], stops[krun])
    keep = (r != s) & (hi > lo)
    r, s, lo, hi = r[keep], s[keep], lo[keep], hi[keep]
    group = r * w + s
    order = np.lexsort((lo, group))
    group, lo, hi = group[order], lo[order] + group[order] * (n + 1), hi[order] + group[order] * (n + 1)
    reach = np.maximum.accumulate(hi) if hi.size else hi  # groups are offset apart: one running max
    new = np.ones(lo.size, dtype=bool)
    new[1:] = lo[1:] > reach[:-1]
    seg = np.cumsum(new) - 1
    m_lo = lo[new]
    m_hi = np.zeros(m_lo.size, dtype=np.int64)
    np.maximum.at(m_hi, seg, hi)
    m_group = group[new]
    base = m_group * (n + 1)
    merged = np.stack([m_lo - base, m_hi - base], 1)
    recv = [[empty] * w for _ in range(w)]
    bounds = np.searchsorted(m_group, np.arange(w * w + 1))
    for g in np.unique(m_group):
        recv[int(g) // w][int(g) % w] = merged[bounds[g]:bounds[g + 1]]
    return Plan(placement, block, tuple(tuple(row) for row in recv))


def imbalance(costs: np.ndarray) -> float:
    """max / mean - 1 of per-rank costs (0: perfectly balanced)."""
    mean = float(costs.mean()) if costs.size else 0.0
    return 0.0 if mean == 0 else float(costs.max()) / mean - 1.0


def rank_costs(placement: Placement, row_cost: np.ndarray) -> np.ndarray:
    """Allowed pairs per rank: the row costs of the rows it owns."""
    prefix = np.concatenate([[0], np.cumsum(row_cost)])
    return np.array([sum(int(prefix[b] - prefix[a]) for a, b in rr) for rr in placement.runs], dtype=np.int64)
