"""Symbolic pair counts nnz(N) with sympy, and the range of N where each holds.

Patterns built from `full`, `none`, `causal`, `window` (any before/after/dilation), `sink`, `global`,
`rows` and `cols` with fixed arguments, combined by any of `| & - ~`, are counted exactly by one
decomposition: every such pattern is a boolean function of the offset d = i - j (through sets of the
form "a union of the half-lines d < 0, d = 0, d > 0, with finitely many offsets flipped") and of the
membership of i and of j in finite token sets U_r and U_c. Splitting the pairs by whether i is in U_r
and j in U_c leaves four parts, each a sum of offset-set counts, all polynomial in N once N exceeds the
largest offset and token involved. `hops`, `stride` (alone or with `causal`), `blockwise` of a countable
pattern (N a multiple of the block) and `neighborhood` (a product over axes) have closed forms of their
own. Everything else says plainly that it has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import sympy  # type: ignore[import-untyped]

from .. import expr as E
from .. import ir

NSYM = sympy.Symbol("N", integer=True, positive=True)
_FAR = 1 << 62  # an offset farther than any flipped one: d = +-_FAR reads the half-lines


@dataclass(frozen=True, slots=True)
class Closed:
    """nnz as a sympy expression of N, valid for N >= valid_from (and `condition`, when not empty)."""

    expr: Any  # sympy.Expr
    valid_from: int
    condition: str = ""
    derivation: str = ""
    fixed: tuple[tuple[Any, int], ...] = ()  # symbols other than N and their values (a grid's axis lengths)

    def text(self) -> str:
        cond = f"N >= {self.valid_from}" + (f", {self.condition}" if self.condition else "")
        return f"{sympy.sstr(self.expr)}  ({cond})"

    def at(self, n: int) -> int:
        return int(self.expr.subs({NSYM: n, **dict(self.fixed)}))


@dataclass(frozen=True, slots=True)
class NoClosed:
    reason: str

    def text(self) -> str:
        return f"no closed form ({self.reason})"


Symbolic = Closed | NoClosed


class _Unsupported(Exception):
    pass


def nnz(p: ir.Pattern) -> Symbolic:
    """The symbolic pair count of a pattern, or why there is none."""
    try:
        return _special(p) or _offset_rows_cols(p)
    except _Unsupported as e:
        return NoClosed(str(e))


def _int(e: E.Expr, what: str) -> int:
    if E.free_vars(e):
        raise _Unsupported(f"{what} depends on N")
    return E.evaluate_int(e)


# --- the offset / rows / cols class --------------------------------------------------------------

Member = Callable[[int | None, int | None, int], bool]  # (i or None, j or None, d) -> allowed


@dataclass
class _Parts:
    rows: set[int]
    cols: set[int]
    offsets: set[int]  # every flipped offset of any offset atom


_MAX_EXPANDED = 1 << 22  # offsets or tokens one term may list; wider terms have no closed form here


def _span(start: int, stop: int, step: int, what: str) -> range:
    """range(start, stop, step), refused before it is listed when it holds more than `_MAX_EXPANDED` values
    (a window of 2**40 must not be enumerated to be counted)."""
    r = range(start, stop, step)
    if len(r) > _MAX_EXPANDED:
        raise _Unsupported(f"{what} spans {len(r)} values, too many to expand")
    return r


def _tokens(t: ir.TokenSet) -> frozenset[int]:
    match t:
        case ir.TokenSlice(start, stop, step):
            if stop is None:
                raise _Unsupported("a token slice without an end grows with N")
            a = 0 if start is None else _int(start, "a token slice bound")
            b = _int(stop, "a token slice bound")
            s = _int(step, "a token slice step")
            if a < 0 or b < 0:
                raise _Unsupported("a negative token bound counts from N")
            return frozenset(_span(a, b, s, "a token slice"))
        case ir.TokenList(items):
            vals = [_int(x, "a token") for x in items]
            if any(v < 0 for v in vals):
                raise _Unsupported("a negative token counts from N")
            return frozenset(vals)
    raise _Unsupported("unknown token set")


def _build(p: ir.Pattern, parts: _Parts) -> Member:
    match p:
        case ir.Full():
            return lambda i, j, d: True
        case ir.Empty():
            return lambda i, j, d: False
        case ir.Causal():
            return lambda i, j, d: d >= 0
        case ir.Window(before, after, dilation):
            a, b, s = _int(before, "window"), _int(after, "window"), _int(dilation, "dilation")
            offs = frozenset(_span(-b * s, a * s + 1, s, "the window"))
            parts.offsets |= offs
            return lambda i, j, d: d in offs
        case ir.Sink(count):
            c = frozenset(_span(0, _int(count, "sink"), 1, "the sink"))
            parts.cols |= c
            return lambda i, j, d: j is not None and j in c
        case ir.Global(tokens):
            t = _tokens(tokens)
            parts.rows |= t
            parts.cols |= t
            return lambda i, j, d: (i is not None and i in t) or (j is not None and j in t)
        case ir.Rows(tokens):
            t = _tokens(tokens)
            parts.rows |= t
            return lambda i, j, d: i is not None and i in t
        case ir.Cols(tokens):
            t = _tokens(tokens)
            parts.cols |= t
            return lambda i, j, d: j is not None and j in t
        case ir.Union(a, b):
            fa, fb = _build(a, parts), _build(b, parts)
            return lambda i, j, d: fa(i, j, d) or fb(i, j, d)
        case ir.Inter(a, b):
            fa, fb = _build(a, parts), _build(b, parts)
            return lambda i, j, d: fa(i, j, d) and fb(i, j, d)
        case ir.Complement(a):
            fa = _build(a, parts)
            return lambda i, j, d: not fa(i, j, d)
        case ir.Random():
            raise _Unsupported("random(r) overlaps the other terms by an amount that depends on the draw")
        case ir.Hops() | ir.Stride():
            raise _Unsupported(f"{type(p).__name__.lower()} has a closed form alone or with causal, not combined so")
    raise _Unsupported(f"{type(p).__name__.lower()} is outside the countable class")


Poly = tuple[Fraction, Fraction, Fraction]  # c2*N**2 + c1*N + c0, summed with plain integers (fast)


def _poly(c2: float | Fraction = 0, c1: float | Fraction = 0, c0: float | Fraction = 0) -> Poly:
    return (Fraction(c2), Fraction(c1), Fraction(c0))


def _add(*ps: Poly) -> Poly:
    return (
        sum((p[0] for p in ps), Fraction(0)),
        sum((p[1] for p in ps), Fraction(0)),
        sum((p[2] for p in ps), Fraction(0)),
    )


def _neg(p: Poly) -> Poly:
    return (-p[0], -p[1], -p[2])


@dataclass(frozen=True)
class _OffsetSet:
    """{d : member(d)} as half-line bits (d < 0, d = 0, d > 0) and the offsets where it differs."""

    neg: bool
    zero: bool
    pos: bool
    flips: dict[int, bool]  # offset -> True when added to the half-lines, False when removed

    def has(self, d: int) -> bool:
        return self.flips.get(d, self.neg if d < 0 else self.pos if d > 0 else self.zero)

    def count(self) -> Poly:
        half = Fraction(int(self.neg) + int(self.pos), 2)  # each half-line holds N(N-1)/2 pairs
        c1 = -half + int(self.zero)
        c0 = Fraction(0)
        for d, added in self.flips.items():  # offset d holds N - |d| pairs
            sign = 1 if added else -1
            c1 += sign
            c0 -= sign * abs(d)
        return (half, c1, c0)

    def row(self, i: int) -> Poly:
        """Keys of fixed query i: d = i - j runs over [i - N + 1, i]."""
        flips = sum((1 if a else -1) for d, a in self.flips.items() if d <= i)
        return _poly(0, int(self.neg), int(self.pos) * i + int(self.zero) - int(self.neg) * (1 + i) + flips)

    def col(self, j: int) -> Poly:
        """Queries of fixed key j: d runs over [-j, N - 1 - j]."""
        flips = sum((1 if a else -1) for d, a in self.flips.items() if d >= -j)
        return _poly(0, int(self.pos), int(self.neg) * j + int(self.zero) - int(self.pos) * (1 + j) + flips)


def _offset_set(f: Callable[[int], bool], offsets: set[int]) -> _OffsetSet:
    neg, zero, pos = f(-_FAR), f(0), f(_FAR)
    flips = {}
    for d in offsets:
        if d == 0:
            continue
        if f(d) != (neg if d < 0 else pos):
            flips[d] = f(d)
    return _OffsetSet(neg, zero, pos, flips)


def _offset_rows_cols(p: ir.Pattern) -> Closed:
    parts = _Parts(set(), set(), set())
    member = _build(p, parts)
    ur, uc = sorted(parts.rows), sorted(parts.cols)
    if len(ur) * len(uc) > 1 << 20 or len(parts.offsets) * (1 + len(ur) + len(uc)) > 1 << 22:
        raise _Unsupported("too many token and offset terms to expand")
    g0 = _offset_set(lambda d: member(None, None, d), parts.offsets)
    terms = [g0.count(), *(_neg(g0.row(i)) for i in ur), *(_neg(g0.col(j)) for j in uc)]
    terms.append(_poly(0, 0, sum(int(g0.has(i - j)) for i in ur for j in uc)))
    for i in ur:
        gi = _offset_set(lambda d, i=i: member(i, None, d), parts.offsets)  # type: ignore[misc]
        terms += [gi.row(i), _poly(0, 0, -sum(int(gi.has(i - j)) for j in uc))]
    for j in uc:
        gj = _offset_set(lambda d, j=j: member(None, j, d), parts.offsets)  # type: ignore[misc]
        terms += [gj.col(j), _poly(0, 0, -sum(int(gj.has(i - j)) for i in ur))]
    terms.append(_poly(0, 0, sum(int(member(i, j, i - j)) for i in ur for j in uc)))
    c2, c1, c0 = _add(*terms)
    total = sympy.Rational(c2.numerator, c2.denominator) * NSYM**2
    total += sympy.Rational(c1.numerator, c1.denominator) * NSYM + sympy.Rational(c0.numerator, c0.denominator)
    dmax = max((abs(d) for d in parts.offsets), default=0)
    umax = max([*ur, *uc], default=-1)
    valid = max(1, dmax, umax + 1 + (dmax + 1 if umax >= 0 else 0))
    how = "offset sets split by membership of i and j in the finite token sets (inclusion-exclusion)"
    return Closed(sympy.expand(total), valid, "", how)


# --- primitives with closed forms of their own -------------------------------------------------------


def _special(p: ir.Pattern) -> Closed | None:
    n = NSYM
    causal = False
    core = p
    match p:
        case ir.Inter(ir.Causal(), x) | ir.Inter(x, ir.Causal()) if isinstance(x, ir.Hops | ir.Stride):
            causal, core = True, x
    match core:
        case ir.Hops(base):
            m = sympy.floor(sympy.log(n - 1, base))
            far = (m + 1) * n - (sympy.Integer(base) ** (m + 1) - 1) / (base - 1)
            expr = n + far if causal else n + 2 * far
            return Closed(expr, 2, "", "offset 0 and the offsets +-base**m < N, each on N - |d| pairs")
        case ir.Stride(step):
            s = _int(step, "stride")
            q = sympy.floor((n - 1) / s)
            far = q * n - s * q * (q + 1) / 2
            expr = n + far if causal else n + 2 * far
            return Closed(expr, 1, "", "offsets k*s, |k| <= (N-1)//s, each on N - |d| pairs")
        case ir.Random(count):
            r = _int(count, "random")
            return Closed(r * n, r, "", "exactly r keys per query")
        case ir.Blockwise(block, inner):
            b = _int(block, "block")
            f = nnz(inner)
            if isinstance(f, NoClosed):
                raise _Unsupported(f"inside blockwise: {f.reason}")
            expr = sympy.expand(b * b * f.expr.subs(n, n / b))
            return Closed(expr, b * f.valid_from, f"N a multiple of {b}", f"block count {b}**2 * nnz_blocks(N/{b})")
        case ir.Neighborhood() if not core.layout.has_extra_tokens:
            return _neighborhood(core)
    return None


def _neighborhood(p: ir.Neighborhood) -> Closed:
    """Product over axes of the per-axis counts (axis lengths as symbols n0, n1, ...)."""
    total: Any = sympy.Integer(1)
    conds = []
    subs = {}
    for a, size in enumerate(p.layout.dims):
        k, d, s, c = p.kernel[a], p.dilation[a], p.stride[a], p.causal[a]
        na = sympy.Symbol(f"n{a}", integer=True, positive=True)
        subs[na] = size
        if c and s > 1:
            raise _Unsupported("a causal axis with a stride")
        axis = na * k - (d * k * (k - 1) // 2 if c else 0)  # k (k - 1) is even: the count stays an integer
        conds.append(f"n{a} >= {k * d}")  # every dilation group holds a whole kernel
        if size < k * d:
            raise _Unsupported(f"axis {a} holds fewer than kernel*dilation = {k * d} tokens")
        total *= axis
    expr = sympy.expand(total)
    if not any(p.causal):
        expr = NSYM * sympy.Integer(int(total / sympy.Mul(*subs)))
    return Closed(
        expr,
        p.layout.size,
        f"N fixed by the grid {'x'.join(map(str, p.layout.dims))}; " + ", ".join(conds),
        f"per axis: n*K{' - d*K*(K-1)/2 on causal axes' if any(p.causal) else ''}; multiplied over axes"
        + ("" if not any(p.causal) else f"; in axis lengths: {sympy.sstr(sympy.expand(total))}"),
        tuple(subs.items()),
    )
