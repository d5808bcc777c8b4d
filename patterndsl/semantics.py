"""The meaning of every construct, written once: a pattern lowers to a predicate `allowed(i, j)`.

This module transcribes LANGUAGE.md's table. The reference mask, the block classifier, the Triton
predicate and the analyser all start from `predicate(pattern)`; none of them knows what a window is.
`random` is the one primitive that is a draw rather than arithmetic: `random_keys` is its definition
and `expr.RandomMember` refers to it.
"""

from __future__ import annotations

from . import expr as E
from . import ir
from .expr import Expr
from .runtime.draw import counter_hash, random_keys
from .source import PatternError

__all__ = ["predicate", "coordinate", "on_grid", "in_token_set", "counter_hash", "random_keys"]


def predicate(p: ir.Pattern) -> Expr:
    """`allowed(i, j)` of a static pattern, over the variables i, j and N."""
    match p:
        case ir.Full():
            return E.TRUE
        case ir.Empty():
            return E.FALSE
        case ir.Causal():
            return E.cmp("<=", E.J, E.I)
        case ir.Window(before, after, dilation):
            d = E.sub(E.I, E.J)
            return E.conj(
                E.cmp(">=", d, E.mul(E.sub(E.const(0), after), dilation)),
                E.cmp("<=", d, E.mul(before, dilation)),
                E.cmp("==", E.mod(d, dilation), E.const(0)),
            )
        case ir.Stride(step):
            return E.cmp("==", E.mod(E.sub(E.I, E.J), step), E.const(0))
        case ir.Sink(count):
            return E.cmp("<", E.J, count)
        case ir.Global(tokens):
            return E.disj(in_token_set(E.I, tokens), in_token_set(E.J, tokens))
        case ir.Rows(tokens):
            return in_token_set(E.I, tokens)
        case ir.Cols(tokens):
            return in_token_set(E.J, tokens)
        case ir.Hops(base):
            d = E.absolute(E.sub(E.I, E.J))
            return E.disj(E.cmp("==", d, E.const(0)), E.IsPow(d, base))
        case ir.Random(count, seed):
            return E.RandomMember(E.I, E.J, E.N, count, seed)
        case ir.Where(cond, layout):
            return cond if layout is None else E.conj(on_grid(E.I, layout), on_grid(E.J, layout), cond)
        case ir.Blockwise(block, inner):
            blocks = E.floordiv(E.add(E.N, E.sub(block, E.const(1))), block)
            env: dict[E.VarName, Expr] = {
                "i": E.floordiv(E.I, block),
                "j": E.floordiv(E.J, block),
                "N": blocks,
            }
            return E.substitute(predicate(inner), env)
        case ir.Neighborhood(layout, kernel, dilation, stride, causal):
            axes = [
                _neighborhood_axis(
                    coordinate(E.I, layout, a),
                    coordinate(E.J, layout, a),
                    layout.dims[a],
                    kernel[a],
                    dilation[a],
                    stride[a],
                    causal[a],
                )
                for a in range(len(layout.dims))
            ]
            return E.conj(on_grid(E.I, layout), on_grid(E.J, layout), *axes)
        case ir.Union(a, b):
            return E.disj(predicate(a), predicate(b))
        case ir.Inter(a, b):
            return E.conj(predicate(a), predicate(b))
        case ir.Complement(a):
            return E.negate(predicate(a))
        case ir.TopK() | ir.Threshold() | ir.Vertical() | ir.Slash():
            raise PatternError(
                "a dynamic selector has no static predicate: what it keeps is chosen from q and k at run time",
                getattr(p, "span", None),
            )
    raise TypeError(f"not a pattern: {p!r}")


def coordinate(t: Expr, layout: ir.Grid, axis: int) -> Expr:
    """Coordinate `axis` of token t on a row-major grid after the layout's prefix (meaningful where
    `on_grid`; the first axis needs no modulo there)."""
    c = E.floordiv(E.sub(t, E.const(layout.prefix)), E.const(layout.strides[axis]))
    return c if axis == 0 else E.mod(c, E.const(layout.dims[axis]))


def on_grid(t: Expr, layout: ir.Grid) -> Expr:
    """Token t is one of the grid's cells, not an extra token: a layout pattern holds between cells only.
    TRUE for a grid without extra tokens (N is the cell count there, so every token is a cell)."""
    if not layout.has_extra_tokens:
        return E.TRUE
    return E.conj(E.cmp(">=", t, E.const(layout.prefix)), E.cmp("<", t, E.const(layout.prefix + layout.cells)))


def _neighborhood_axis(x: Expr, y: Expr, n: int, k: int, d: int, s: int, causal: bool) -> Expr:
    """NATTEN's 1-D neighborhood on one axis, exactly as LANGUAGE.md states it.

    A stride group shares one window, placed by the group's leader: its centre query (the right-hand
    one for even `s`) on a non-causal axis; on a causal axis its last query fixes where the window
    starts, while each query's own position still ends it, so no query sees its future.
    """
    dd = E.const(d)
    g = E.mod(x, dd)
    p = E.floordiv(x, dd)
    m = E.floordiv(E.add(E.sub(E.const(n), g), E.const(d - 1)), dd)
    same_group = E.cmp("==", E.mod(y, dd), g)
    q = E.floordiv(y, dd)
    leader = p
    if s > 1:
        group_start = E.mul(E.const(s), E.floordiv(p, E.const(s)))
        leader = E.minimum(E.add(group_start, E.const(s - 1 if causal else s // 2)), E.sub(m, E.const(1)))
    if causal:
        lo = E.maximum(E.const(0), E.sub(leader, E.const(k - 1)))
        return E.conj(same_group, E.cmp("<=", lo, q), E.cmp("<=", q, p))
    start = E.maximum(E.const(0), E.minimum(E.sub(leader, E.const(k // 2)), E.sub(m, E.const(k))))
    return E.conj(same_group, E.cmp("<=", start, q), E.cmp("<", q, E.add(start, E.const(k))))


def in_token_set(t: Expr, tokens: ir.TokenSet) -> Expr:
    """`t in S` for a token set, with Python slice semantics for negative and missing bounds."""
    match tokens:
        case ir.TokenList(items):
            return E.disj(*(E.cmp("==", t, _from_end(x)) for x in items))
        case ir.TokenSlice(start, stop, step):
            lo = E.const(0) if start is None else _clip(_from_end(start))
            hi = E.N if stop is None else _clip(_from_end(stop))
            on_step = E.cmp("==", E.mod(E.sub(t, lo), step), E.const(0))
            return E.conj(E.cmp(">=", t, lo), E.cmp("<", t, hi), on_step)
    raise TypeError(f"not a token set: {tokens!r}")


def _from_end(x: Expr) -> Expr:
    return E.if_else(E.cmp("<", x, E.const(0)), E.add(x, E.N), x)


def _clip(x: Expr) -> Expr:
    return E.maximum(E.const(0), E.minimum(x, E.N))
