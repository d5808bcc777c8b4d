"""Exact per-row figures at any N, in time and memory that do not grow with N: rows in affine pieces.

Most patterns are built from three kinds of conditions: on the offset d = i - j alone (windows, causal,
hops), on the query i alone (`rows`, the row half of `global`) and on the key j alone (`sink`, `cols`).
A predicate that is a boolean combination of such conditions ("separable") is read as:

- every condition holds on a few runs of its one variable, found by interval subdivision of that
  variable's range (`runs_1d`, bounded work, exact at its leaves);
- the i-conditions cut the rows into row zones, the j-conditions the keys into key zones; inside one
  (row zone, key zone) the predicate is a fixed set of offsets, again a few runs of d;
- for query i and key zone [c0, c1) the allowed offsets lie in [i - c1 + 1, i - c0], so a row's key
  count, first key and last key change slope only where that window's ends cross a run's ends:
  i = a + c0, b + 1 + c0, a + c1, b + c1 for every run [a, b]. Between consecutive breakpoints they are
  affine in i, so each piece is described by its two end rows, and every figure (min, max, sum, the
  first row where something holds) follows from the ends.

`blockwise(b, P)` (i and j only as i // b and j // b) is the same on the block grid, with the last,
partial block made a zone of its own (it holds fewer tokens); a piece then spans whole blocks, and rows
i = b * u + r (0 <= r < rows of block u) share block u's figures. A neighborhood is a product over axes
and is summarised axis by axis. Anything else raises `NotSeparable`, and anything whose runs or pieces
outgrow the work budget `OverBudget`; the caller then counts rows (small N) or gives bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import expr as E
from .. import intervals, ir
from ..expr import Expr, offset_form
from ..intervals import merge_runs
from ..mask import eval_numpy
from ..tiling import block_form
from .count import classify_cost, draw_width
from .limits import ARRAY_LIMIT, Budget, OverBudget

MAX_PIECES = 1 << 15  # row pieces (and zone x run pairs) one analysis may hold


class NotSeparable(Exception):
    """The predicate mixes i and j in a way other than through i - j."""


# --- runs of a condition on one variable ------------------------------------------------------------


def runs_1d(pred: Expr, var: str, lo: int, hi: int, budget: Budget, n: int) -> np.ndarray:
    """Maximal runs [a, b] (inclusive, an [R, 2] int64 array, ascending) of x in [lo, hi] where `pred`,
    a condition on the one variable `var` ("i" or "j"; N bound), holds: `intervals.runs` under the
    analysis's budget."""
    per_point = max(1, draw_width(pred) // 64)  # a draw costs a bitmap row per point
    return intervals.runs(pred, var, lo, hi, n, budget.spend, classify_cost(pred), per_point)


# --- separable predicates ---------------------------------------------------------------------------

Skeleton = tuple[Any, ...]  # ("const", bool) | ("atom", k) | ("and", (..)) | ("or", (..)) | ("not", x)


@dataclass(frozen=True)
class Atom:
    kind: str  # "i", "j" or "d" (for "d" the expression reads d as the variable i, as offset_form does)
    expr: Expr


def separate(pred: Expr) -> tuple[Skeleton, list[Atom]]:
    """The boolean structure of a predicate over conditions on i, on j and on i - j (NotSeparable if none)."""
    atoms: list[Atom] = []

    def go(e: Expr) -> Skeleton:
        free = E.free_vars(e)
        if not free:
            value = eval_numpy(e, np.zeros(1, np.int64), np.zeros(1, np.int64), 1)
            return ("const", bool(np.asarray(value).reshape(-1)[0]))
        if free <= {"i"} or free <= {"j"}:
            atoms.append(Atom("i" if free <= {"i"} else "j", e))
            return ("atom", len(atoms) - 1)
        form = offset_form(e)
        if form is not None:
            atoms.append(Atom("d", form))
            return ("atom", len(atoms) - 1)
        match e:
            case E.And(args):
                return ("and", tuple(go(a) for a in args))
            case E.Or(args):
                return ("or", tuple(go(a) for a in args))
            case E.Not(a):
                return ("not", go(a))
        raise NotSeparable

    return go(pred), atoms


def _evaluate(s: Skeleton, values: Sequence[Any]) -> Any:
    match s:
        case ("const", v):
            return v
        case ("atom", k):
            return values[k]
        case ("and", xs):
            out: Any = True
            for x in xs:
                out = out & _evaluate(x, values)
            return out
        case ("or", xs):
            out = False
            for x in xs:
                out = out | _evaluate(x, values)
            return out
        case ("not", x):
            inner = _evaluate(x, values)
            return ~inner if isinstance(inner, np.ndarray) else not inner
    raise TypeError(s)


def _member(runs: np.ndarray, x: int) -> bool:
    k = int(np.searchsorted(runs[:, 0], x, side="right")) - 1
    return k >= 0 and x <= int(runs[k, 1])


@dataclass(frozen=True)
class Zone:
    lo: int  # first unit of the zone
    hi: int  # one past its last
    key: tuple[bool, ...]  # the truth of every condition on this zone's variable


@dataclass
class Structure:
    """A separable predicate on `n` units: row zones, key zones, and the offset runs of each pair."""

    n: int
    skeleton: Skeleton
    atoms: list[Atom]
    rows: list[Zone]
    cols: list[Zone]
    d_edges: np.ndarray  # elementary offset intervals [d_edges[k], d_edges[k + 1])
    d_values: list[np.ndarray]  # per offset condition: its truth on each elementary interval
    budget: Budget
    _offsets: dict[tuple[tuple[bool, ...], tuple[bool, ...]], np.ndarray]

    def offsets(self, row: Zone, col: Zone) -> np.ndarray:
        """Runs of allowed d = i - j for i in the row zone and j in the key zone."""
        key = (row.key, col.key)
        if key not in self._offsets:
            self.budget.spend(self.d_edges.size)
            values: list[Any] = []
            ri = iter(row.key)
            ci = iter(col.key)
            di = iter(self.d_values)
            for a in self.atoms:
                values.append(next(ri) if a.kind == "i" else next(ci) if a.kind == "j" else next(di))
            truth = np.broadcast_to(np.asarray(_evaluate(self.skeleton, values), dtype=bool), self.d_edges[:-1].shape)
            lo, hi = self.d_edges[:-1][truth], self.d_edges[1:][truth] - 1
            self._offsets[key] = merge_runs(np.stack([lo, hi], axis=1))
        return self._offsets[key]


def structure(
    pred: Expr, n: int, budget: Budget, row_edges: Sequence[int] = (), col_edges: Sequence[int] = ()
) -> Structure:
    """The zones and offset runs of a separable predicate on n units (extra zone edges may be asked)."""
    skeleton, atoms = separate(pred)
    per_atom = []
    for a in atoms:
        if a.kind == "d":
            per_atom.append(runs_1d(a.expr, "i", -(n - 1), n - 1, budget, n))
        else:
            per_atom.append(runs_1d(a.expr, a.kind, 0, n - 1, budget, n))
        if sum(r.shape[0] for r in per_atom) > MAX_PIECES:
            raise OverBudget

    def zones(kind: str, extra: Sequence[int]) -> list[Zone]:
        mine = [r for a, r in zip(atoms, per_atom, strict=True) if a.kind == kind]
        edges = {0, n, *(e for e in extra if 0 < e < n)}
        for r in mine:
            edges.update(int(x) for x in r[:, 0])
            edges.update(int(x) + 1 for x in r[:, 1])
        cuts = sorted(e for e in edges if 0 <= e <= n)
        return [Zone(a, b, tuple(_member(r, a) for r in mine)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    d_runs = [r for a, r in zip(atoms, per_atom, strict=True) if a.kind == "d"]
    d_edges = {-(n - 1), n}
    for r in d_runs:
        d_edges.update(int(x) for x in r[:, 0])
        d_edges.update(int(x) + 1 for x in r[:, 1])
    edges = np.array(sorted(d_edges), dtype=np.int64)
    starts = edges[:-1]
    d_values = []
    for r in d_runs:
        if r.shape[0] == 0:
            d_values.append(np.zeros(starts.shape, dtype=bool))
            continue
        k = np.searchsorted(r[:, 0], starts, side="right") - 1
        d_values.append((k >= 0) & (starts <= r[np.maximum(k, 0), 1]))
    rows, cols = zones("i", row_edges), zones("j", col_edges)
    if len(rows) * len(cols) > MAX_PIECES:
        raise OverBudget
    return Structure(n, skeleton, atoms, rows, cols, edges, d_values, budget, {})


# --- rows in affine pieces ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Units u0..u1 (rows g*u + r, 0 <= r < rows_per_unit); count, first and last key (in tokens) are
    affine in u, given at both ends. An empty row has first = N and last = -1 (the whole piece is)."""

    u0: int
    u1: int
    g: int
    rows_per_unit: int
    count: tuple[int, int]
    first: tuple[int, int]
    last: tuple[int, int]


def _key_zones(st: Structure, row: Zone, weight: Any) -> list[tuple[int, int, int, np.ndarray]]:
    out = []
    for col in st.cols:
        runs = st.offsets(row, col)
        if runs.shape[0]:
            out.append((col.lo, col.hi, weight(col), runs))
    return out


def _upto(runs: np.ndarray, prefix: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How many allowed offsets are <= v (runs ascending, prefix: their cumulative lengths from 0)."""
    a, b = runs[:, 0], runs[:, 1]
    k = np.searchsorted(a, v, side="right")
    km = np.maximum(k - 1, 0)
    return np.where(k > 0, prefix[km] + np.minimum(b[km], v) - a[km] + 1, 0)


def _at(zones: list[tuple[int, int, int, np.ndarray]], x: np.ndarray, big: int) -> tuple[np.ndarray, ...]:
    """Weighted key count, first and last key unit of rows (units) x, one key zone at a time."""
    count = np.zeros(x.shape, dtype=np.int64)
    first = np.full(x.shape, big, dtype=np.int64)
    last = np.full(x.shape, -1, dtype=np.int64)
    for c0, c1, w, runs in zones:
        a, b = runs[:, 0], runs[:, 1]
        prefix = np.concatenate([[0], np.cumsum(b - a + 1)])
        upper, lower = x - c0, x - c1 + 1  # allowed offsets d of this zone's keys: lower <= d <= upper
        count += w * (_upto(runs, prefix, upper) - _upto(runs, prefix, lower - 1))
        k = np.searchsorted(a, upper, side="right")
        dmax = np.where(k > 0, np.minimum(upper, b[np.maximum(k - 1, 0)]), lower - 1)
        ok = dmax >= lower
        first = np.where(ok, np.minimum(first, x - dmax), first)
        k2 = np.searchsorted(b, lower, side="left")
        dmin = np.where(k2 < a.size, np.maximum(lower, a[np.minimum(k2, a.size - 1)]), upper + 1)
        ok2 = dmin <= upper
        last = np.where(ok2, np.maximum(last, x - dmin), last)
    return count, first, last


def row_pieces(pred: Expr, n: int, budget: Budget | None = None) -> tuple[list[Piece], str]:
    """Exact rows of a bound predicate at length n, in affine pieces, and how they were found."""
    budget = budget or Budget()
    blocked = block_form(pred)
    if blocked is not None:
        b, inner = blocked
        nb = -(-n // b)
        tail = n - b * (nb - 1)
        st = structure(inner, nb, budget, row_edges=(nb - 1,), col_edges=(nb - 1,))
        pieces = _pieces(st, b, tail, n)
        return pieces, f"blocks of {b}: {_count(pieces)} over {nb:,} blocks (exact)"
    st = structure(pred, n, budget)
    pieces = _pieces(st, 1, 1, n)
    return pieces, f"offset and token-range runs: {_count(pieces)} (exact)"


def _count(pieces: list[Piece]) -> str:
    return f"{len(pieces)} affine piece{'' if len(pieces) == 1 else 's'}"


def _pieces(st: Structure, g: int, tail: int, n: int) -> list[Piece]:
    nu = st.n

    def weight(col: Zone) -> int:
        return tail if col.lo == nu - 1 else g  # the last block holds `tail` tokens

    out: list[Piece] = []
    for row in st.rows:
        zones = _key_zones(st, row, weight)
        cuts = [np.array([row.lo], dtype=np.int64)]
        for c0, c1, _, runs in zones:  # where the window [i - c1 + 1, i - c0] meets a run's end
            a, b = runs[:, 0], runs[:, 1]
            cuts += [a + c0, b + 1 + c0, a + c1, b + c1]
        starts = np.unique(np.concatenate(cuts))
        starts = starts[(starts >= row.lo) & (starts < row.hi)]
        if starts.size > MAX_PIECES:
            raise OverBudget
        ends = np.concatenate([starts[1:] - 1, [row.hi - 1]])
        budget_points = 3 * starts.size * max(1, len(zones))
        st.budget.spend(budget_points)
        mids = (starts + ends) // 2
        xs = np.concatenate([starts, ends, mids])
        count, first_u, last_u = _at(zones, xs, nu)
        empty = count == 0
        first = np.where(empty, n, first_u * g)
        last = np.where(empty, -1, last_u * g + np.where(last_u == nu - 1, tail - 1, g - 1))
        k = starts.size
        for t in range(k):
            u0, u1, um = int(starts[t]), int(ends[t]), int(mids[t])
            vals = [(int(v[t]), int(v[k + t]), int(v[2 * k + t])) for v in (count, first, last)]
            for v0, v1, vm in vals:  # a broken piece would be a bug in the breakpoints: never silently wrong
                if (vm - v0) * (u1 - u0) != (v1 - v0) * (um - u0):
                    raise AssertionError(f"row figures not affine on units {u0}..{u1}")
            if (vals[0][0] == 0) != (vals[0][1] == 0):
                raise AssertionError(f"rows {u0}..{u1} are partly empty")
            rows = tail if u0 == nu - 1 else g
            if u0 != u1 and u1 == nu - 1 and tail != g:
                raise AssertionError("the last, partial block must be a piece of its own")
            out.append(Piece(u0, u1, g, rows, vals[0][:2], vals[1][:2], vals[2][:2]))
        if len(out) > MAX_PIECES:
            raise OverBudget
    return out


# --- figures from pieces -------------------------------------------------------------------------------


@dataclass
class _Acc:
    """min, max and exact sum over a set of rows, and how many rows."""

    lo: int | None = None
    hi: int | None = None
    total: int = 0
    rows: int = 0

    def add(self, lo: int, hi: int, total: int, rows: int) -> None:
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.total += total
        self.rows += rows

    def summary(self) -> dict[str, float]:
        if not self.rows or self.lo is None or self.hi is None:
            return {"min": 0, "mean": 0.0, "max": 0}
        return {"min": self.lo, "mean": self.total / self.rows, "max": self.hi}


def _affine(v: tuple[int, int], m: int) -> tuple[int, int, int]:
    """min, max and sum of an affine function of m consecutive units given at both ends."""
    return min(v), max(v), (v[0] + v[1]) * m // 2


def summarize(pieces: list[Piece], n: int) -> tuple[int, dict[str, Any]]:
    """Allowed pairs and the `rows` figures of `patc analyze`, exactly, from affine pieces."""
    keys, back, fwd, first, last = _Acc(), _Acc(), _Acc(), _Acc(), _Acc()
    empty_rows = 0
    first_empty: int | None = None
    first_future: int | None = None
    for p in pieces:
        m, r, g = p.u1 - p.u0 + 1, p.rows_per_unit, p.g
        lo, hi, total = _affine(p.count, m)
        keys.add(lo, hi, r * total, m * r)
        if p.count[0] == 0:
            empty_rows += m * r
            first_empty = g * p.u0 if first_empty is None else min(first_empty, g * p.u0)
            continue
        spread = m * r * (r - 1) // 2  # sum over the rows of a unit of their offset r
        for acc, v in ((first, p.first), (last, p.last)):
            lo, hi, total = _affine(v, m)
            acc.add(lo, hi, r * total, m * r)
        h = (g * p.u0 - p.first[0], g * p.u1 - p.first[1])  # i - first at r = 0
        lo, hi, total = _affine(h, m)
        back.add(lo, hi + r - 1, r * total + spread, m * r)
        f = (p.last[0] - g * p.u0, p.last[1] - g * p.u1)  # last - i at r = 0
        lo, hi, total = _affine(f, m)
        fwd.add(lo - (r - 1), hi, r * total - spread, m * r)
        if max(f) > 0:
            if f[0] > 0:
                u = p.u0
            else:
                slope = (f[1] - f[0]) // (p.u1 - p.u0)
                u = p.u0 + (-f[0]) // slope + 1
            row = g * u
            first_future = row if first_future is None else min(first_future, row)
    pairs = keys.total
    kq = keys.summary()
    kq["mean"] = pairs / n
    return pairs, {
        "keys_per_query": kq,
        "reach_back": back.summary(),
        "reach_forward": fwd.summary(),
        "first_key": first.summary(),
        "last_key": last.summary(),
        "empty_rows": empty_rows,
        "first_empty_row": first_empty,
        "sees_future": first_future is not None,
        "first_future_row": first_future,
    }


# --- neighborhoods: a product over axes --------------------------------------------------------------


def neighborhood_summary(p: ir.Neighborhood, n: int) -> tuple[int, dict[str, Any]]:
    """The `rows` figures of a neighborhood from per-axis rows: counts multiply, offsets add.

    Row i has coordinates (i_0, ..., i_k) and i = sum s_a * i_a (row-major strides s_a); its keys are the
    product of per-axis key sets, so count(i) = prod c_a(i_a) and first(i) = sum s_a * first_a(i_a). A
    row is empty when any axis is. Since sum_{b > a} s_b * (dims_b - 1) < s_a, the sign of last(i) - i
    is the sign of its first non-zero axis term, which finds the first row that sees a later key.
    """
    from ..semantics import _neighborhood_axis
    from .count import predicate_stats

    dims = p.layout.dims
    strides = p.layout.strides
    if max(dims) > ARRAY_LIMIT:
        raise OverBudget
    axes = []
    for a, size in enumerate(dims):
        pred = _neighborhood_axis(E.I, E.J, size, p.kernel[a], p.dilation[a], p.stride[a], p.causal[a])
        s = predicate_stats(E.bind_n(pred, size), size)
        pos = np.arange(size, dtype=np.int64)
        has = s.counts > 0
        axes.append((s, pos, has))
    live = [int(h.sum()) for _, _, h in axes]
    total_live = int(np.prod(np.array(live, dtype=object))) if live else 1
    pairs = 1
    kmin, kmax = 1, 1
    for s, _, _ in axes:
        pairs *= int(s.counts.sum())
        kmin *= int(s.counts.min())
        kmax *= int(s.counts.max())

    def separable(term: Any) -> dict[str, float]:
        """min / mean / max over live rows of sum_a s_a * term_a(i_a)."""
        if total_live == 0:
            return {"min": 0, "mean": 0.0, "max": 0}
        lo = hi = total = 0
        for a, (s, pos, has) in enumerate(axes):
            t = term(s, pos)[has].astype(object)
            lo += strides[a] * int(min(t))
            hi += strides[a] * int(max(t))
            total += strides[a] * int(sum(t)) * (total_live // live[a])
        return {"min": lo, "mean": total / total_live, "max": hi}

    empty = n - total_live
    first_empty = None
    for a, (_, _, has) in enumerate(axes):
        if not has.all():
            row = strides[a] * int(np.flatnonzero(~has)[0])
            first_empty = row if first_empty is None else min(first_empty, row)
    first_future = None
    if total_live:
        least = [int(pos[has][0]) for _, pos, has in axes]
        for a, (s, pos, has) in enumerate(axes):
            ahead = has & (s.last > pos)
            if not ahead.any():
                continue
            prefix_ok = True
            row = strides[a] * int(pos[ahead][0])
            for b in range(a):
                sb, pb, hb = axes[b]
                level = hb & (sb.last == pb)
                if not level.any():
                    prefix_ok = False
                    break
                row += strides[b] * int(pb[level][0])
            if prefix_ok:
                row += sum(strides[b] * least[b] for b in range(a + 1, len(dims)))
                first_future = row if first_future is None else min(first_future, row)
    return pairs, {
        "keys_per_query": {"min": kmin, "mean": pairs / n, "max": kmax},
        "reach_back": separable(lambda s, pos: pos - s.first),
        "reach_forward": separable(lambda s, pos: s.last - pos),
        "first_key": separable(lambda s, pos: s.first),
        "last_key": separable(lambda s, pos: s.last),
        "empty_rows": empty,
        "first_empty_row": first_empty,
        "sees_future": first_future is not None,
        "first_future_row": first_future,
    }
