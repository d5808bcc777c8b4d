"""Receptive field: which keys a query can reach through a stack of attention layers.

Layer l lets query q read token k when layer l's pattern allows (q, k); through layers 1..L the reach is
the boolean product R_L = A_L . R_(L-1), R_0 the identity. Sets are bit-packed rows (uint64 words).

Two granularities, always named in the output:
- token: exact, for N <= TOKEN_LIMIT (A from the reference mask);
- block of G tokens, for larger N: an upper bound (a block pair counts as connected when any pair in it
  may be allowed) and a lower bound (only through FULL block pairs, where every query of the block sees
  every key of the other). Coverage is then given as the fraction of block pairs, between the two bounds.

Coverage at depth L: reached pairs / the pairs full attention would give (causal attention when every
layer is causal). Iteration stops when the target is covered, when the reach stops changing, or after
max_depth layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import expr as E
from .. import ir
from ..intervals import ALL, classify, merge_runs
from ..mask import dense_mask, eval_numpy
from ..semantics import _neighborhood_axis
from ..tiling import full_tiles
from .cost import tiles_of
from .count import DRAW_BITS, bound_predicate, draw_width, predicate_stats, row_stats
from .limits import ARRAY_LIMIT, ARRAY_WORK, Budget, OverBudget
from .pieces import runs_1d

TOKEN_LIMIT = 2048
BLOCK_UNITS = 1024  # at most this many blocks per side at block granularity
GATHER_WORDS = 1 << 24


@dataclass(frozen=True, slots=True)
class Adjacency:
    """CSR lists per unit (token or block): units it reads from; `full` marks FULL block pairs."""

    indptr: np.ndarray
    indices: np.ndarray
    full: np.ndarray

    @property
    def units(self) -> int:
        return self.indptr.size - 1


@dataclass
class Reach:
    granularity: str  # "token" or "block of G tokens"
    unit: int
    units: int
    causal_target: bool
    coverage: list[float] = field(default_factory=list)  # per depth 1.., exact or upper bound
    coverage_lower: list[float] | None = None  # block granularity only
    depth: int | None = None  # first depth with full coverage (exact, or a lower bound at block level)
    depth_upper: int | None = None  # block level: full coverage guaranteed by this depth
    stopped: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "granularity": self.granularity,
            "unit_tokens": self.unit,
            "units": self.units,
            "target": "causal" if self.causal_target else "full",
            "coverage": self.coverage,
            "coverage_lower": self.coverage_lower,
            "depth_full_coverage": self.depth,
            "depth_full_coverage_upper": self.depth_upper,
            "stopped": self.stopped,
        }


def _body_predicate(body: ir.Body, n: int) -> E.Expr:
    return E.disj(*(bound_predicate(p, n) for p in ir.body_patterns(body)))


def token_adjacency(body: ir.Body, n: int) -> Adjacency:
    m: np.ndarray = dense_mask(body, n)
    if m.ndim == 3:
        m = np.any(m, axis=0)  # a token reaches what any head reaches
    counts = m.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.nonzero(m)[1].astype(np.int64)
    return Adjacency(indptr, indices, np.ones(indices.size, dtype=bool))


def block_adjacency(body: ir.Body, n: int, g: int) -> Adjacency:
    t = tiles_of(_body_predicate(body, n), n, g, g)
    units = -(-n // g)
    fq, fk = full_tiles(t)
    q, k = np.concatenate([fq, t.part_q]), np.concatenate([fk, t.part_k])
    f = np.arange(q.size) < fq.size
    order = np.lexsort((k, q))
    q, k, f = q[order], k[order], f[order]
    # No tile is listed twice (FULL and PARTIAL): the builder decides each tile once.
    indptr = np.concatenate([[0], np.cumsum(np.bincount(q, minlength=units))]).astype(np.int64)
    return Adjacency(indptr, k, f)


def _step(adj: Adjacency, reach: np.ndarray, only_full: bool = False) -> np.ndarray:
    """R' = A . R on bit-packed rows: OR of the reach rows of every unit each unit reads from."""
    units, words = reach.shape
    indptr, indices = adj.indptr, adj.indices
    if only_full:
        keep = adj.full
        indices = indices[keep]
        owner = np.repeat(np.arange(units), np.diff(adj.indptr))
        counts = np.bincount(owner[keep], minlength=units)
        indptr = np.concatenate([[0], np.cumsum(counts)])
    out = np.zeros_like(reach)
    if indices.size == 0:
        return out
    if indices.size * words > 4 * GATHER_WORDS:  # dense: one boolean matrix product
        a = np.zeros((units, units), dtype=np.float32)
        rows = np.repeat(np.arange(units), np.diff(indptr))
        a[rows, indices] = 1.0
        dense = np.unpackbits(reach.view(np.uint8), axis=1, bitorder="little")[:, :units].astype(np.float32)
        prod = (a @ dense) > 0
        packed = np.packbits(prod, axis=1, bitorder="little")
        out.view(np.uint8)[:, : packed.shape[1]] = packed
        return out
    rows_per = max(1, GATHER_WORDS // max(1, words * max(1, indices.size // units)))
    for lo in range(0, units, rows_per):
        hi = min(units, lo + rows_per)
        a, b = indptr[lo], indptr[hi]
        if a == b:
            continue
        gathered = reach[indices[a:b]]
        starts = indptr[lo:hi] - a
        nonempty = np.diff(indptr[lo : hi + 1]) > 0
        block = out[lo:hi]
        block[nonempty] = np.bitwise_or.reduceat(gathered, starts[nonempty], axis=0)
    return out


def _target(units: int, causal: bool) -> np.ndarray:
    words = -(-units // 64)
    dense = np.tril(np.ones((units, units), dtype=bool)) if causal else np.ones((units, units), dtype=bool)
    packed = np.packbits(dense, axis=1, bitorder="little")
    out = np.zeros((units, words), dtype=np.uint64)
    out.view(np.uint8)[:, : packed.shape[1]] = packed
    return out


def _popcount(x: np.ndarray) -> int:
    return int(np.bitwise_count(x).sum())


def receptive_field(
    schedule: Sequence[ir.Body], n: int, causal: bool, max_depth: int | None = None, repeat: bool = True
) -> Reach:
    """Coverage per depth through `schedule` (repeated when `repeat`, for a single pattern)."""
    if n > TOKEN_LIMIT:
        exact = offset_reach(schedule, n, repeat, max_depth) or neighborhood_reach(schedule, n, repeat, max_depth)
        if exact is not None:
            return exact
    if n <= TOKEN_LIMIT:
        unit, granularity = 1, "token (exact)"
    else:
        unit = 1 << math.ceil(math.log2(n / BLOCK_UNITS))
        granularity = f"block of {unit} tokens (bounds)"
    units = -(-n // unit)
    cache: dict[ir.Body, Adjacency] = {}
    diagonal: dict[ir.Body, bool] = {}

    def sees_itself(body: ir.Body) -> bool:
        if body not in diagonal:
            diagonal[body] = _sees_itself(_body_predicate(body, n), n)
        return diagonal[body]

    def adj(body: ir.Body) -> Adjacency:
        if body not in cache:
            cache[body] = token_adjacency(body, n) if unit == 1 else block_adjacency(body, n, unit)
        return cache[body]

    limit = max_depth if max_depth is not None else (units + 1 if repeat else len(schedule))
    if not repeat:
        limit = min(limit, len(schedule))
    words = -(-units // 64)
    target = _target(units, causal)
    total = _popcount(target)
    ident = np.zeros((units, words), dtype=np.uint64)
    ident[np.arange(units), np.arange(units) // 64] = np.uint64(1) << (np.arange(units) % 64).astype(np.uint64)
    upper, lower = ident, ident
    out = Reach(granularity, unit, units, causal)
    if unit > 1:
        out.coverage_lower = []
    lower_settled = unit == 1
    work = 0
    for depth in range(1, limit + 1):
        body = schedule[(depth - 1) % len(schedule)]
        a = adj(body)
        work += a.indices.size * words * (1 if out.coverage_lower is None else 2)
        if work > REACH_WORK:
            out.stopped = f"work budget reached after {depth - 1} layers"
            break
        new_upper = _step(a, upper)
        out.coverage.append(_popcount(new_upper & target) / total)
        done = out.coverage[-1] >= 1.0
        if out.depth is None and done:
            out.depth = depth
        settled = repeat and len(schedule) == 1 and np.array_equal(new_upper, upper)
        upper = new_upper
        if out.coverage_lower is not None:
            new_lower = _step(a, lower, only_full=True)
            if sees_itself(body):  # a token that keeps its own state keeps what it reached
                new_lower |= lower
            lower_settled = repeat and len(schedule) == 1 and np.array_equal(new_lower, lower)
            lower = new_lower
            out.coverage_lower.append(_popcount(lower & target) / total)
            if out.depth_upper is None and out.coverage_lower[-1] >= 1.0:
                out.depth_upper = depth
        lower_done = out.coverage_lower is None or out.depth_upper is not None or lower_settled
        if (done or settled) and lower_done:
            out.stopped = "target covered" if done else "reach stopped changing"
            if unit > 1 and out.depth_upper is None:
                out.stopped = ("upper bound covers the target" if done else "upper bound stopped changing") + (
                    "; lower bound stopped changing"
                )
            break
    else:
        out.stopped = f"after {limit} layers" if repeat else "end of the model"
    if unit == 1:
        out.depth_upper = out.depth
    elif repeat and len(schedule) == 1 and out.depth_upper is None:
        _hub_bound(schedule[0], n, out)
    return out


def _sees_itself(pred: E.Expr, n: int) -> bool:
    """Every token may attend to itself (decided on the diagonal i = j; False when undecided in budget,
    which only weakens the lower bound that uses it)."""
    diag = E.substitute(pred, {"j": E.I})
    try:
        runs = runs_1d(diag, "i", 0, n - 1, Budget(), n)
    except OverBudget:
        if n > ARRAY_LIMIT or n * draw_width(pred) > DRAW_BITS:
            return False
        t = np.arange(n, dtype=np.int64)
        return bool(np.all(np.broadcast_to(eval_numpy(pred, t, t, n), (n,))))
    return runs.shape[0] == 1 and int(runs[0, 0]) == 0 and int(runs[0, 1]) == n - 1


def _hubs(body: ir.Body, pred: E.Expr, n: int) -> list[int]:
    """Tokens that see every key and are seen by every query: all of them (up to 8) where rows can be
    counted, else those among the first 8 tokens that interval reasoning proves so."""
    if n <= ARRAY_LIMIT and n * draw_width(pred) <= DRAW_BITS:
        try:
            budget = Budget(ARRAY_WORK)
            rows = row_stats(body, n, budget) if not isinstance(body, ir.Heads) else predicate_stats(pred, n, budget)
            everyone = np.arange(n, dtype=np.int64)
            return [
                h
                for h in np.flatnonzero(rows.counts == n)[:8].tolist()
                if np.broadcast_to(eval_numpy(pred, everyone, np.full(1, h, np.int64), n), (n,)).all()
            ]
        except OverBudget:
            pass
    out = []
    for h in range(min(8, n)):
        row = classify(pred, np.array([h]), np.array([h]), np.array([0]), np.array([n - 1]))
        col = classify(pred, np.array([0]), np.array([n - 1]), np.array([h]), np.array([h]))
        if int(row[0]) == ALL and int(col[0]) == ALL:
            out.append(h)
    return out


def _hub_bound(body: ir.Body, n: int, out: Reach) -> None:
    """A token h that sees every key and is seen by every query (a global token) joins any query to any
    key in two layers: the lower bound becomes exact from depth 2 on."""
    hubs = _hubs(body, _body_predicate(body, n), n)
    if not hubs:
        return
    assert out.coverage_lower is not None
    while len(out.coverage_lower) < 2:
        out.coverage_lower.append(out.coverage_lower[-1] if out.coverage_lower else 0.0)
    out.coverage_lower[1:] = [1.0] * (len(out.coverage_lower) - 1)
    out.depth_upper = 2 if (out.depth is None or out.depth >= 2) else out.depth
    if out.depth is None:
        out.depth = out.depth_upper  # depth 1 is not full (the upper bound says so) or it is
    out.stopped += f"; token {hubs[0]} sees every key and every query sees it, so depth <= 2"


# --- exact reach at any N through offset structure ---------------------------------------------------

RECORD_DEPTHS = 4096  # coverage is listed for at most this many depths
REACH_WORK = 1 << 30  # 64-bit words the layer-by-layer products may touch in all (a few seconds)
RUN_WORK = 1 << 31  # element operations allowed for the run-by-run sumsets


def _offset_runs(body: ir.Body, n: int) -> np.ndarray | None:
    """Runs [a, b] of allowed d = i - j in [-(n-1), n-1] when the body is a predicate of i - j alone
    (found by interval subdivision, in work that does not grow with N), else None."""
    form = E.offset_form(_body_predicate(body, n))
    if form is None:
        return None
    try:
        return runs_1d(form, "i", -(n - 1), n - 1, Budget(), n)
    except OverBudget:
        return None


def offset_reach(schedule: Sequence[ir.Body], n: int, repeat: bool, max_depth: int | None = None) -> Reach | None:
    """Exact token-level reach for schedules of offset patterns, at any N (None when it does not apply).

    Causal offset sets (every allowed d = i - j >= 0): a path from i only moves to earlier tokens and
    never leaves [0, i], so the offsets reachable in L layers are the L-fold sum of the layers' offset
    sets, the same for every query. Non-causal: only contiguous windows [-b, a] around 0, whose reach is
    [i - sum a, i + sum b] clipped to [0, N). Offset sets are runs, so windows cost nothing per token;
    sums of gapped sets are computed on a bit array of the reachable offsets (N <= ARRAY_LIMIT).
    """
    table = {}
    for body in dict.fromkeys(schedule):
        r = _offset_runs(body, n)
        if r is None:
            return None
        table[body] = r
    causal = all(r.shape[0] == 0 or r[0, 0] >= 0 for r in table.values())  # no d < 0
    limit = max_depth if max_depth is not None else (RECORD_DEPTHS if repeat else len(schedule))
    limit = min(limit, RECORD_DEPTHS) if repeat else min(limit, len(schedule))
    out = Reach("token (exact, through offset structure)", 1, n, causal)
    if causal:
        return _causal_sumsets(schedule, table, n, repeat, limit, out)
    windows = {}
    for body, runs in table.items():
        if runs.shape[0] != 1 or not runs[0, 0] <= 0 <= runs[0, 1]:
            return None  # a gap, or 0 outside: boundaries would matter
        windows[body] = (-int(runs[0, 0]), int(runs[0, 1]))  # (a, b): the reach is symmetric in them
    total = n * n
    back = fwd = 0
    for depth in range(1, limit + 1):
        a, b = windows[schedule[(depth - 1) % len(schedule)]]
        back, fwd = min(n, back + a), min(n, fwd + b)
        out.coverage.append(_window_pairs(n, back, fwd) / total)
        if out.depth is None and back >= n - 1 and fwd >= n - 1:
            out.depth = depth
            out.stopped = "target covered"
            break
        if a == 0 and b == 0 and len(windows) == 1:
            out.stopped = "reach stopped changing"
            break
    else:
        out.stopped = f"after {limit} layers" if repeat else "end of the model"
        if repeat and len(windows) == 1:
            a, b = next(iter(windows.values()))
            if a and b:
                out.depth = max(-(-(n - 1) // a), -(-(n - 1) // b))
                out.stopped = f"depth from the closed form; coverage listed for {limit} layers"
    out.depth_upper = out.depth
    return out


def _window_pairs(n: int, back: int, fwd: int) -> int:
    """Pairs (i, j) with i - back <= j <= i + fwd inside [0, n)^2."""
    k = max(0, n - fwd)
    s1 = k * (k - 1) // 2 + k * fwd + (n - k) * (n - 1)  # sum of min(n - 1, i + fwd)
    m = max(0, n - back)
    s2 = m * (m - 1) // 2  # sum of max(0, i - back)
    return s1 - s2 + n


def _causal_sumsets(
    schedule: Sequence[ir.Body], table: dict[ir.Body, np.ndarray], n: int, repeat: bool, limit: int, out: Reach
) -> Reach | None:
    g = 0  # the gcd of every allowed offset d > 0
    for runs in table.values():
        for a, b in runs.tolist():
            if b > max(a, 0) or a == 1:
                g = 1  # two consecutive positive offsets, or the offset 1
            elif b > 0:
                g = math.gcd(g, b)
    g = max(g, 1)
    m = (n - 1) // g + 1  # offsets 0, g, 2g, ... below n
    reduced = {}
    for body, runs in table.items():  # every allowed offset is a multiple of g: runs on the grid of g
        lo, hi = -(-runs[:, 0] // g), np.minimum(runs[:, 1] // g, m - 1)
        keep = lo <= hi
        reduced[body] = merge_runs(np.stack([lo[keep], hi[keep]], axis=1))
    total = n * (n + 1) // 2
    contiguous = all(r.shape[0] == 1 and r[0, 0] == 0 for r in reduced.values())
    if contiguous:  # every layer is [0, b]: the reach is [0, sum b]
        x = 0
        for depth in range(1, limit + 1):
            b = int(reduced[schedule[(depth - 1) % len(schedule)]][0, 1])
            x = min(m - 1, x + b)
            out.coverage.append(((x + 1) * n - g * x * (x + 1) // 2) / total)
            if g == 1 and x >= n - 1:
                out.depth, out.stopped = depth, "target covered"
                break
            if (b == 0 or x >= m - 1) and len(reduced) == 1:
                out.stopped = "reach stopped changing"
                break
        else:
            out.stopped = f"after {limit} layers" if repeat else "end of the model"
            b = int(next(iter(reduced.values()))[0, 1])
            if repeat and len(reduced) == 1 and b and g == 1:
                out.depth = -(-(n - 1) // b)
                out.stopped = f"depth from the closed form; coverage listed for {limit} layers"
        if g > 1 and out.depth is None:
            out.stopped += f"; every offset is a multiple of {g}, so never full"
        out.depth_upper = out.depth
        return out
    if m > ARRAY_LIMIT:
        return None  # gapped offset sets: the sumsets need a bit per offset
    weights = n - g * np.arange(m, dtype=np.int64)  # pairs at offset g*k
    reach = np.zeros(m, dtype=bool)
    reach[0] = True
    work = 0
    for depth in range(1, limit + 1):
        runs = reduced[schedule[(depth - 1) % len(schedule)]]
        work += m * (runs.shape[0] + 20 * int((runs[:, 1] > runs[:, 0]).sum()))
        if work > RUN_WORK:
            return None if depth == 1 else _truncated(out, "offset sumsets grew too costly")
        new = np.zeros(m, dtype=bool)
        prefix: np.ndarray | None = None
        for a, b in runs.tolist():
            if a == b:
                new[a:] |= reach[: m - a]
                continue
            if prefix is None:
                prefix = np.concatenate([[0], np.cumsum(reach, dtype=np.int64)])
            xs = np.arange(a, m, dtype=np.int64)  # x - b <= r <= x - a
            new[a:] |= (prefix[xs - a + 1] - prefix[np.maximum(0, xs - b)]) > 0
        settled = repeat and len(reduced) == 1 and np.array_equal(new, reach)
        reach = new
        out.coverage.append(float(weights[reach].sum()) / total)
        if g == 1 and reach.all():
            out.depth, out.stopped = depth, "target covered"
            break
        if settled:
            out.stopped = "reach stopped changing"
            break
    else:
        out.stopped = f"after {limit} layers" if repeat else "end of the model"
    out.depth_upper = out.depth
    return out


def _truncated(out: Reach, why: str) -> Reach:
    out.stopped = why
    out.depth_upper = out.depth
    return out


# --- exact reach for neighborhoods: a product over axes ------------------------------------------------


def neighborhood_reach(schedule: Sequence[ir.Body], n: int, repeat: bool, max_depth: int | None = None) -> Reach | None:
    """Non-causal neighborhoods on one grid: the adjacency is a Kronecker product over axes, so L-layer
    reach is the product of each axis's L-layer reach, computed exactly per axis (None otherwise)."""
    bodies = list(dict.fromkeys(schedule))
    if not all(isinstance(b, ir.Neighborhood) and not any(b.causal) and not b.layout.has_extra_tokens for b in bodies):
        return None
    grids = {b.layout.dims for b in bodies if isinstance(b, ir.Neighborhood)}
    if len(grids) != 1:
        return None
    (dims,) = grids
    if max(dims) > TOKEN_LIMIT:
        return None
    axes: list[dict[ir.Body, Adjacency]] = []
    for a, size in enumerate(dims):
        per: dict[ir.Body, Adjacency] = {}
        for b in bodies:
            assert isinstance(b, ir.Neighborhood)
            pred = E.bind_n(_neighborhood_axis(E.I, E.J, size, b.kernel[a], b.dilation[a], b.stride[a], False), size)
            t = np.arange(size, dtype=np.int64)
            m = np.broadcast_to(eval_numpy(pred, t[:, None], t[None, :], size), (size, size))
            indptr = np.concatenate([[0], np.cumsum(m.sum(axis=1))]).astype(np.int64)
            per[b] = Adjacency(indptr, np.nonzero(m)[1].astype(np.int64), np.ones(int(m.sum()), dtype=bool))
        axes.append(per)
    limit = max_depth if max_depth is not None else (RECORD_DEPTHS if repeat else len(schedule))
    limit = min(limit, RECORD_DEPTHS if repeat else len(schedule))
    reach = []
    for size in dims:
        words = -(-size // 64)
        r = np.zeros((size, words), dtype=np.uint64)
        r[np.arange(size), np.arange(size) // 64] = np.uint64(1) << (np.arange(size) % 64).astype(np.uint64)
        reach.append(r)
    targets = [_popcount(_target(size, False)) for size in dims]
    out = Reach("token (exact, product of per-axis reach)", 1, n, False)
    for depth in range(1, limit + 1):
        body = schedule[(depth - 1) % len(schedule)]
        new = [_step(axes[a][body], reach[a]) for a in range(len(dims))]
        settled = repeat and len(bodies) == 1 and all(np.array_equal(x, y) for x, y in zip(new, reach, strict=True))
        reach = new
        cov = 1.0
        for a in range(len(dims)):
            cov *= _popcount(reach[a]) / targets[a]
        out.coverage.append(cov)
        if cov >= 1.0:
            out.depth, out.stopped = depth, "target covered"
            break
        if settled:
            out.stopped = "reach stopped changing"
            break
    else:
        out.stopped = f"after {limit} layers" if repeat else "end of the model"
    out.depth_upper = out.depth
    return out
