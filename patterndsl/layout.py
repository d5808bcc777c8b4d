"""Token layouts: which tokens share a kernel tile.

A block-sparse kernel cuts the sequence into tiles of consecutive rows. For a window that is what a pattern
wants; for a dilated window, a stride or a 2-D/3-D neighborhood in row-major order it is not: the allowed
pairs scatter over many tiles and most of each visited tile is masked. A layout is a bijection between
*physical* rows (what the kernel tiles) and *logical* tokens (the caller's order). The kernel reads q, k,
v and writes the output at the logical token of each physical row (a gather by computed row offsets:
no permutation pass, the caller's tensors keep their order), and block tables are built over physical rows.

One layout family covers every case here. Each axis of a grid (a 1-D sequence is one axis of length N)
has a dilation `d` and tile factors `(f_1, ..., f_L)` (outermost first, product `T`). Coordinate `c` on
the axis is `g + d * p`: residue class (dilation group) `g = c % d`, position `p = c // d` in the group.
Physical rows are a mixed-radix number whose digits are, most significant first: the dilation groups of
every axis, the tile index of every axis (`ceil(ceil(n / d) / T)` tiles), then for each tile level the
digit of every axis. So tokens of one residue class are contiguous, and inside it every tile is a box of
`f_1 x ...` positions (levels let a query tile be made of smaller key tiles). Axes are padded up to whole
tiles; a padding row is invalid: never stored, never attended to.

Block tables are computed in layout space from the pattern's own predicate: `pred(L(r), L(s))` with the
index map substituted, then simplified by exact integer identities (`(a*m + b) // m = a + b // m`,
`(a*m + b) % m = b % m`, and `b // m = 0`, `b % m = b` where `0 <= b < m` holds for valid rows), so that
interval reasoning sees the layout's structure (a residue class is one constant per tile, a coordinate
one interval) instead of a wrapped-around modulus. The result is conjoined with both rows' validity, so
it equals the composed predicate at every pair of physical rows (`tests/compiler/test_layout.py` checks it
pair by pair). The kernel itself evaluates `semantics.predicate` on logical indices: a layout changes
speed, never meaning.

Which layout: `choose` reads the pattern's structure (a top-level `(i - j) % d == 0` conjunct asks for
residue classes; a neighborhood or grid `where` asks for tiles of its grid) and, for grids, scores tile
shapes by the tiles they visit (`tiling.tiling`, the kernels' own tile builder), keeping the plain order when nothing beats it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import expr as E
from . import ir
from .expr import Expr
from .semantics import predicate

__all__ = ["Axis", "Layout", "choose", "layout_predicate", "rows", "logical_index", "valid", "describe"]


@dataclass(frozen=True, slots=True)
class Axis:
    size: Expr  # logical length (a constant on a grid, N for a 1-D sequence)
    dilation: int
    factors: tuple[int, ...]  # tile factors in positions of a group, outermost first

    @property
    def tile(self) -> int:
        out = 1
        for f in self.factors:
            out *= f
        return out


@dataclass(frozen=True, slots=True)
class Layout:
    """The tiled axes, and the extra tokens of a grid with a prefix or suffix (text, registers): they keep
    their order and stay contiguous around the tiled cells, the prefix padded to whole tiles so no tile
    mixes extra tokens and cells."""

    axes: tuple[Axis, ...]
    prefix: int = 0
    suffix: int = 0

    @property
    def volume(self) -> int:
        out = 1
        for a in self.axes:
            out *= a.tile
        return out


def describe(layout: Layout | None) -> str:
    if layout is None:
        return "contiguous"
    parts = []
    dil = [a.dilation for a in layout.axes]
    if any(d > 1 for d in dil):
        parts.append("residue classes mod " + "x".join(map(str, dil)))
    extra = [f"{n} tokens {where}" for n, where in ((layout.prefix, "before"), (layout.suffix, "after")) if n]
    if extra:
        parts.append(" and ".join(extra) + " the grid")
    if len(layout.axes) > 1:
        levels = len(layout.axes[0].factors)
        shapes = []
        for lv in range(levels):
            inner = [functools.reduce(lambda x, y: x * y, a.factors[lv:], 1) for a in layout.axes]
            shapes.append("x".join(map(str, inner)))
        parts.append("tiles " + " of ".join(shapes))
    return ", ".join(parts) or "contiguous"


# --- the index map --------------------------------------------------------------------------------


def _prod(xs: list[Expr]) -> Expr:
    out: Expr = E.const(1)
    for x in xs:
        out = E.mul(out, x)
    return out


def _cdiv(a: Expr, b: int) -> Expr:
    return E.floordiv(E.add(a, E.const(b - 1)), E.const(b))


def _tiles(axis: Axis) -> Expr:
    """Tiles per dilation group on the axis."""
    return _cdiv(_cdiv(axis.size, axis.dilation), axis.tile)


def _digits(layout: Layout) -> list[tuple[str, int, int, Expr]]:
    """(kind, axis, level, radix) most significant first: groups, tiles, then each tile level."""
    k = len(layout.axes)
    levels = len(layout.axes[0].factors)
    out: list[tuple[str, int, int, Expr]] = [("g", a, 0, E.const(layout.axes[a].dilation)) for a in range(k)]
    out += [("t", a, 0, _tiles(layout.axes[a])) for a in range(k)]
    for lv in range(levels):
        out += [("f", a, lv, E.const(layout.axes[a].factors[lv])) for a in range(k)]
    return out


def rows(layout: Layout | None) -> Expr:
    """Physical rows (an expression over N): every axis padded to whole tiles of every group, and the
    extra tokens around them (the prefix padded to whole tiles)."""
    if layout is None:
        return E.N
    return E.add(E.add(_lead(layout), _grid_rows(layout)), E.const(layout.suffix))


def _grid_rows(layout: Layout) -> Expr:
    return _prod([radix for _, _, _, radix in _digits(layout)])


def _lead(layout: Layout) -> Expr:
    """Rows before the tiled cells: the prefix, padded to whole tiles."""
    return E.const(-(-layout.prefix // layout.volume) * layout.volume)


@dataclass(frozen=True, slots=True)
class _Region:
    """Physical rows holding one kind of token: `valid` says a row is one of them; `token` is its logical
    token, or None for the tiled cells (their tokens go through the digits of `row - lead`)."""

    valid: Expr
    token: Expr | None


def _regions(layout: Layout, r: Expr) -> list[_Region]:
    """The prefix's rows, the tiled cells' and the suffix's, in this order (the extra ones if any)."""
    lead = _lead(layout)
    out = [_Region(E.conj(E.cmp("<=", lead, r), _grid_valid(layout, E.sub(r, lead))), None)]
    if layout.prefix:
        out.insert(0, _Region(E.cmp("<", r, E.const(layout.prefix)), r))
    if layout.suffix:
        start = _suffix_start(layout)
        inside = E.conj(E.cmp("<=", start, r), E.cmp("<", r, E.add(start, E.const(layout.suffix))))
        out.append(_Region(inside, _suffix_token(layout, r)))
    return out


def _suffix_start(layout: Layout) -> Expr:
    return E.add(_lead(layout), _grid_rows(layout))


def _suffix_token(layout: Layout, r: Expr) -> Expr:
    cells = _prod([a.size for a in layout.axes])
    return E.add(E.sub(r, _suffix_start(layout)), E.add(E.const(layout.prefix), cells))


def _digit_exprs(layout: Layout, r: Expr) -> dict[tuple[str, int, int], Expr]:
    ds = _digits(layout)
    out: dict[tuple[str, int, int], Expr] = {}
    place: Expr = E.const(1)
    for pos in range(len(ds) - 1, -1, -1):
        kind, a, lv, radix = ds[pos]
        q = E.floordiv(r, place)
        out[(kind, a, lv)] = q if pos == 0 else E.mod(q, radix)
        place = E.mul(place, radix)
    return out


def _coordinate_from(layout: Layout, a: int, digit: Any) -> Expr:
    """c_a = g + d * (T * tile + sum_l digit_l * prod(inner factors))."""
    axis = layout.axes[a]
    p: Expr = E.mul(E.const(axis.tile), digit("t", a, 0))
    for lv, _f in enumerate(axis.factors):
        inner = functools.reduce(lambda x, y: x * y, axis.factors[lv + 1 :], 1)
        p = E.add(p, E.mul(E.const(inner), digit("f", a, lv)))
    return E.add(digit("g", a, 0), E.mul(E.const(axis.dilation), p))


def _strides(layout: Layout) -> list[Expr]:
    out: list[Expr] = []
    acc: Expr = E.const(1)
    for axis in reversed(layout.axes):
        out.append(acc)
        acc = E.mul(acc, axis.size)
    return out[::-1]


def logical_index(layout: Layout, r: Expr = E.I) -> Expr:
    """The logical token of physical row r (meaningful where `valid`)."""
    out = E.add(_grid_logical(layout, E.sub(r, _lead(layout))), E.const(layout.prefix))
    if layout.suffix:
        out = E.if_else(E.cmp(">=", r, _suffix_start(layout)), _suffix_token(layout, r), out)
    if layout.prefix:
        out = E.if_else(E.cmp("<", r, _lead(layout)), r, out)
    return out


def _grid_logical(layout: Layout, r: Expr) -> Expr:
    d = _digit_exprs(layout, r)
    coords = [_coordinate_from(layout, a, lambda kind, ax, lv: d[(kind, ax, lv)]) for a in range(len(layout.axes))]
    t: Expr = E.const(0)
    for c, s in zip(coords, _strides(layout), strict=True):
        t = E.add(t, E.mul(s, c))
    return t


def valid(layout: Layout, r: Expr = E.I) -> Expr:
    """Physical row r holds a token (it is not padding)."""
    if not (layout.prefix or layout.suffix):
        return _grid_valid(layout, r)
    return E.disj(*(region.valid for region in _regions(layout, r)))


def _grid_valid(layout: Layout, r: Expr) -> Expr:
    """Row r of the tiled cells (counted from their first row) holds a cell."""
    d = _digit_exprs(layout, r)
    inside = (
        E.cmp("<", _coordinate_from(layout, a, lambda kind, ax, lv: d[(kind, ax, lv)]), layout.axes[a].size)
        for a in range(len(layout.axes))
    )
    return E.conj(E.cmp("<", r, _grid_rows(layout)), *inside)


# --- the predicate in layout space ------------------------------------------------------------------


@dataclass
class _Lin:
    terms: dict[Expr, int]
    const: int


def _ph(side: str, kind: str, a: int, lv: int = 0) -> Expr:
    return E.Var(f"{side}{kind}{a}_{lv}")  # type: ignore[arg-type]  # placeholders, substituted away below


class _Simplifier:
    """Exact rewriting of `//` and `%` by positive constants over linear forms of bounded atoms."""

    def __init__(self, bounds: dict[Expr, tuple[int, int]]) -> None:
        self.bounds = bounds

    def lin(self, e: Expr) -> _Lin:
        match e:
            case E.Const(v) if not isinstance(v, bool):
                return _Lin({}, int(v))
            case E.Arith("+" | "-" as op, a, b):
                x, y = self.lin(a), self.lin(b)
                s = 1 if op == "+" else -1
                terms = dict(x.terms)
                for t, c in y.terms.items():
                    terms[t] = terms.get(t, 0) + s * c
                return _Lin({t: c for t, c in terms.items() if c}, x.const + s * y.const)
            case E.Arith("*", E.Const(k), b) | E.Arith("*", b, E.Const(k)):
                y = self.lin(b)
                return _Lin({t: c * int(k) for t, c in y.terms.items() if c * int(k)}, y.const * int(k))
        return _Lin({e: 1}, 0)

    @staticmethod
    def expr(x: _Lin) -> Expr:
        out: Expr = E.const(0)
        for t, c in x.terms.items():
            out = E.add(out, E.mul(E.const(c), t)) if c > 0 else E.sub(out, E.mul(E.const(-c), t))
        return E.add(out, E.const(x.const)) if x.const >= 0 else E.sub(out, E.const(-x.const))

    def range(self, x: _Lin) -> tuple[int, int] | None:
        lo = hi = x.const
        for t, c in x.terms.items():
            b = self.bounds.get(t)
            if b is None:
                return None
            lo += min(c * b[0], c * b[1])
            hi += max(c * b[0], c * b[1])
        return lo, hi

    def split(self, x: _Lin, m: int) -> tuple[_Lin, _Lin]:
        """x = m * quotient + rest, exactly; rest keeps the terms whose coefficients m does not divide."""
        q = {t: c // m for t, c in x.terms.items() if c % m == 0}
        rest = {t: c for t, c in x.terms.items() if c % m}
        return _Lin(q, x.const // m), _Lin(rest, x.const % m)

    def go(self, e: Expr) -> Expr:
        match e:
            case E.Arith("//" | "%" as op, a, E.Const(m)) if int(m) > 0:
                x = self.lin(self.go(a))
                q, rest = self.split(x, int(m))
                rng = self.range(rest)
                fits = rng is not None and 0 <= rng[0] and rng[1] < int(m)
                if op == "//":
                    extra = E.const(0) if fits else E.floordiv(self.expr(rest), E.const(int(m)))
                    return E.add(self.expr(q), extra)
                return self.expr(rest) if fits else E.mod(self.expr(rest), E.const(int(m)))
            case E.Arith(op, a, b):
                return E.arith(op, self.go(a), self.go(b))
            case E.Abs(a):
                return E.absolute(self.go(a))
            case E.Log2(a):
                return E.log2(self.go(a))
            case E.Cmp(op, a, b):
                return E.cmp(op, self.go(a), self.go(b))
            case E.And(args):
                return E.conj(*(self.go(x) for x in args))
            case E.Or(args):
                return E.disj(*(self.go(x) for x in args))
            case E.Not(a):
                return E.negate(self.go(a))
            case E.IfElse(c, t, o):
                return E.if_else(self.go(c), self.go(t), self.go(o))
            case E.IsPow(a, base):
                return E.IsPow(self.go(a), base)
        return e


def _const_size(axis: Axis) -> int | None:
    return int(axis.size.value) if isinstance(axis.size, E.Const) else None


def layout_predicate(pred: Expr, layout: Layout | None) -> Expr:
    """`valid(i) & valid(j) & pred(L(i), L(j))` over physical rows i, j, simplified for interval reasoning.

    Exact at every pair of physical rows (the rewrites are integer identities, the ones that need
    `0 <= c < n` only apply where validity holds, and validity is part of the result). With extra tokens
    it is a union over the (query region, key region) pairs, each simplified on its own: a tile lies in
    one region, so interval reasoning sees the cells' structure there and plain indices elsewhere."""
    if layout is None:
        return pred
    if not (layout.prefix or layout.suffix):
        return E.conj(valid(layout, E.I), valid(layout, E.J), _in_layout_space(pred, layout, None, None))
    parts = [
        E.conj(ri.valid, rj.valid, _in_layout_space(pred, layout, ri.token, rj.token))
        for ri in _regions(layout, E.I)
        for rj in _regions(layout, E.J)
    ]
    return E.disj(*parts)


def _in_layout_space(pred: Expr, layout: Layout, token_i: Expr | None, token_j: Expr | None) -> Expr:
    """pred with i and j replaced by the logical tokens of physical rows: `token_i` where given (an extra
    token's), else through the digits of the row within the tiled cells, simplified."""
    k = len(layout.axes)
    strides = _strides(layout)
    lead = _lead(layout)
    flat = {"i": token_i, "j": token_j}
    # step 1: tokens as sums of coordinates; coordinates of valid rows lie in [0, n)
    env1: dict[E.VarName, Expr] = {}
    bounds1: dict[Expr, tuple[int, int]] = {}
    for side, var in (("i", "i"), ("j", "j")):
        given = flat[side]
        if given is not None:
            env1[var] = given  # type: ignore[index]
            continue
        t: Expr = E.const(layout.prefix)
        for a in range(k):
            c = _ph(side, "c", a)
            size = _const_size(layout.axes[a])
            if size is not None:
                bounds1[c] = (0, size - 1)
            t = E.add(t, E.mul(strides[a], c))
        env1[var] = t  # type: ignore[index]
    step1 = _Simplifier(bounds1).go(E.substitute(pred, env1))
    # step 2: coordinates as digits (group, tile, tile levels), each in its radix
    env2: dict[Any, Expr] = {}
    bounds2: dict[Expr, tuple[int, int]] = {}
    for side in ("i", "j"):
        for a in range(k):
            axis = layout.axes[a]
            bounds2[_ph(side, "g", a)] = (0, axis.dilation - 1)
            for lv, f in enumerate(axis.factors):
                bounds2[_ph(side, "f", a, lv)] = (0, f - 1)
            env2[f"{side}c{a}_0"] = _coordinate_from(layout, a, lambda kind, ax, lv, s=side: _ph(s, kind, ax, lv))
    step2 = _Simplifier(bounds2).go(E.substitute(step1, env2))
    # step 3: digits as functions of the physical rows (counted from the first row of the cells)
    env3: dict[Any, Expr] = {}
    for side, row in (("i", E.I), ("j", E.J)):
        for (kind, a, lv), ex in _digit_exprs(layout, E.sub(row, lead)).items():
            env3[f"{side}{kind}{a}_{lv}"] = ex
    return E.substitute(step2, env3)


# --- choosing a layout ------------------------------------------------------------------------------


def _residue(pred: Expr) -> int | None:
    """d when a top-level conjunct says `(i - j) % d == 0` (or `(j - i) % d == 0`) with a constant d > 1."""
    conjuncts = pred.args if isinstance(pred, E.And) else (pred,)
    for c in conjuncts:
        match c:
            case E.Cmp(
                "==",
                E.Arith("%", E.Arith("-", E.Var("i"), E.Var("j")) | E.Arith("-", E.Var("j"), E.Var("i")), E.Const(d)),
                E.Const(0),
            ) if int(d) > 1:  # noqa: E501
                return int(d)
    return None


def _grid_of(p: ir.Pattern) -> tuple[ir.Grid, tuple[int, ...]] | None:
    """The grid a pattern works on and its per-axis dilation (from a neighborhood, else 1)."""
    found: tuple[ir.Grid, tuple[int, ...]] | None = None
    for x in ir.walk(p):
        match x:
            case ir.Neighborhood(layout, _, dilation):
                if found is None or found[1] == (1,) * len(found[0].dims):
                    found = (layout, dilation)
            case ir.Where(_, layout) if layout is not None and found is None:
                found = (layout, (1,) * len(layout.dims))
    return found


def _pow2_shapes(volume: int, caps: list[int]) -> list[tuple[int, ...]]:
    """Tuples of powers of two, each at most its cap, whose product is `volume`, in lexicographic order of
    their exponents (built axis by axis, so grids of many axes cost what they yield, not bits**axes)."""
    k = len(caps)
    bits = volume.bit_length() - 1
    limits = [max(0, c.bit_length() - 1) for c in caps]
    room = [sum(limits[a:]) for a in range(k)] + [0]  # the most the axes from a on can take
    out: list[tuple[int, ...]] = []

    def go(a: int, left: int, shape: tuple[int, ...]) -> None:
        if a == k:
            if left == 0:
                out.append(shape)
            return
        for s in range(min(left, limits[a]) + 1):
            if left - s <= room[a + 1]:
                go(a + 1, left - s, (*shape, 1 << s))

    go(0, bits, ())
    return out


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def candidates(grid: ir.Grid, dilation: tuple[int, ...], block_q: int, block_k: int) -> list[Layout]:
    """Tile shapes of `max(block_q, block_k)` tokens (whole query tiles made of key tiles, or the reverse)."""
    big, small = max(block_q, block_k), min(block_q, block_k)
    caps = [_next_pow2(-(-n // d)) for n, d in zip(grid.dims, dilation, strict=True)]
    out: list[Layout] = []
    for outer in _pow2_shapes(big, caps):
        inners = [s for s in _pow2_shapes(small, list(outer))] if small < big else [outer]
        for inner in inners:
            axes = tuple(
                Axis(E.const(n), d, (o // i, i) if small < big else (o,))
                for n, d, o, i in zip(grid.dims, dilation, outer, inner, strict=True)
            )
            out.append(Layout(axes, grid.prefix, grid.suffix))
    return out


def visited_tiles(pred: Expr, layout: Layout | None, n: int, block_q: int, block_k: int,
                  spend: Callable[[int, Expr], None] | None = None) -> int:
    """Tiles a kernel with this layout visits at length n (pred with N free or bound); `spend` as `tiling`'s."""
    from .analysis.limits import REFINE_PAIRS
    from .tiling import tiling

    bound = E.bind_n(layout_predicate(pred, layout), n)
    return tiling(bound, E.evaluate_int(rows(layout), n), block_q, block_k, spend=spend,
                  refine_pairs=REFINE_PAIRS).visited


_SCORED_AXIS = 1 << 13  # the longest axis whose neighborhood is scored per axis (an axis x axis mask)
_EXACT_WORK = 1 << 22  # rectangles the exact counts of one choice may classify before bands are counted
_BANDS = 8  # then: evenly spaced bands of query rows, each of _BAND_ROWS rows
_BAND_ROWS = 1 << 12


def _visit_scores(pred: Expr, layouts: list[Layout | None], n: int, block_q: int, block_k: int) -> list[int]:
    """The tiles a kernel visits under each layout, to rank them: exact within `_EXACT_WORK`, else all of them
    estimated from `_BANDS` bands of query rows spaced evenly through the rows (the exact counts' time and
    memory grow with the tiles listed: minutes and gigabytes for grids of millions of tokens)."""
    from .analysis.limits import Budget, OverBudget

    budget = Budget(_EXACT_WORK)
    try:
        return [visited_tiles(pred, lay, n, block_q, block_k, spend=lambda k, _: budget.spend(k)) for lay in layouts]
    except OverBudget:
        return [_band_visits(pred, lay, n, block_q, block_k) for lay in layouts]


def _band_visits(pred: Expr, layout: Layout | None, n: int, block_q: int, block_k: int) -> int:
    """Tiles visited in `_BANDS` bands of query tiles, each in the middle of an equal share of the rows,
    scaled to all the rows."""
    from .analysis.limits import REFINE_PAIRS
    from .tiling import tiling

    extent = E.evaluate_int(rows(layout), n)
    bound = E.bind_n(layout_predicate(pred, layout), n)
    tiles, band = -(-extent // block_q), -(-_BAND_ROWS // block_q)
    total = 0
    for b in range(_BANDS):
        start = tiles * (2 * b + 1) // (2 * _BANDS) * block_q
        rows_in = E.conj(bound, E.cmp(">=", E.I, E.const(start)), E.cmp("<", E.I, E.const(start + band * block_q)))
        total += tiling(rows_in, extent, block_q, block_k, refine_pairs=REFINE_PAIRS).visited
    return total * tiles // (_BANDS * band)


def _cdiv_int(a: int, b: int) -> int:
    return -(-a // b)


def _axis_visits(pred: Expr, n: int, dilation: int, tile: int, key: int) -> int:
    """(query interval, key interval) pairs with an allowed pair on one axis of a product predicate:
    query intervals are tiles of `tile` positions of a dilation group, key intervals `key` positions."""
    import numpy as np

    from .mask import eval_numpy

    c = np.arange(n, dtype=np.int64)
    ok = np.broadcast_to(eval_numpy(pred, c[:, None], c[None, :], n), (n, n))
    per_group = -(-_cdiv_int(n, dilation) // tile) * tile
    slot = (c % dilation) * per_group + c // dilation  # the axis's position in physical order
    q_of, k_of = slot // tile, slot // key
    hit = np.zeros((int(q_of.max()) + 1, int(k_of.max()) + 1), dtype=bool)
    ii, jj = np.nonzero(ok)
    hit[q_of[ii], k_of[jj]] = True
    return int(hit.sum())


def _neighborhood_score(p: ir.Neighborhood, lay: Layout) -> int:
    """Tiles visited by a bare neighborhood: a product over axes, so a product of per-axis counts."""
    total = 1
    for a, axis in enumerate(lay.axes):
        args = (p.layout.dims[a], p.kernel[a], p.dilation[a], p.stride[a], p.causal[a])
        total *= _neighborhood_axis_visits(*args, axis.dilation, axis.tile, axis.factors[-1])
    return total


@functools.lru_cache(maxsize=4096)  # candidates share axes: a 6-axis grid's thousand layouts use a few dozen
def _neighborhood_axis_visits(n: int, k: int, d: int, s: int, causal: bool, dilation: int, tile: int, key: int) -> int:
    from .semantics import _neighborhood_axis

    return _axis_visits(_neighborhood_axis(E.I, E.J, n, k, d, s, causal), n, dilation, tile, key)


def _cells_rule(p: ir.Pattern, grid: ir.Grid) -> ir.Neighborhood | None:
    """The neighborhood that decides which tiles of the cells are visited: the pattern itself, or on a grid
    with extra tokens its one neighborhood (terms on the extra tokens, `global(L.prefix)`, visit the same
    rows and columns whatever the tiling of the cells)."""
    if isinstance(p, ir.Neighborhood):
        return p
    if not grid.has_extra_tokens:
        return None
    found = [x for x in ir.walk(p) if isinstance(x, ir.Neighborhood) or isinstance(x, ir.Where) and x.layout]
    return found[0] if len(found) == 1 and isinstance(found[0], ir.Neighborhood) else None


@functools.lru_cache(maxsize=256)
def _choose(p: ir.Pattern, block_q: int, block_k: int) -> Layout | None:
    pred = predicate(p)
    d = _residue(pred)
    grid = _grid_of(p)
    if grid is None:
        if d is None:
            return None
        return Layout((Axis(E.N, d, (max(block_q, block_k),)),))
    g, dilation = grid
    if len(g.dims) == 1 and d is not None and dilation == (1,):
        dilation = (d,)
    n = g.size
    cands = candidates(g, dilation, block_q, block_k)
    cells = _cells_rule(p, g)
    if cells is not None and block_q >= block_k and max(g.dims) <= _SCORED_AXIS:
        # a product over axes: tiles visited = product of per-axis counts (exact, cheap); rank by it
        scored = sorted((_neighborhood_score(cells, lay), k) for k, lay in enumerate(cands))
        cands = [cands[k] for _, k in scored[:2]]
    else:
        cands = cands[:: max(1, len(cands) // 12)]
    layouts: list[Layout | None] = [None, *cands]
    scores = _visit_scores(pred, layouts, n, block_q, block_k)
    return layouts[min(range(len(layouts)), key=scores.__getitem__)]  # the first of the least: plain order on a tie


def choose(p: ir.Pattern, block_q: int = 128, block_k: int = 64) -> Layout | None:
    """The layout for a static pattern at these tile sizes (None: the plain, contiguous order)."""
    if block_q & (block_q - 1) or block_k & (block_k - 1):
        return None
    return _choose(p, block_q, block_k)
