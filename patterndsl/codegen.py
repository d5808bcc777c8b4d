"""Code generation: a predicate rendered as the body of a `@triton.jit` function.

Triton takes a pattern only as code, so this is the one renderer: the predicate over tiles (`i`
[BLOCK_M, 1], `j` [1, BLOCK_N], `N` a run-time scalar) from the same `semantics.predicate` tree the reference
mask, the block tables and the CPU path read as data. Triton's `//` and `%` truncate toward zero, so floor
semantics are rendered (`fdiv`, `fmod` from `runtime.index`) wherever the dividend may be negative.

Only integers produced by `int()` and names matching `[A-Za-z_][A-Za-z0-9_]*` ever enter generated source;
text (the pattern's source) enters only through `repr()` or an escaped docstring.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeGuard

from . import expr as E
from .expr import Expr

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
INT32_MAX = (1 << 31) - 1


class CodegenError(ValueError):
    """Something that cannot be rendered (a bug or an unsupported construct), never user text."""


def safe_name(name: str) -> str:
    """A name allowed into generated source, or ValueError."""
    if not isinstance(name, str) or not _NAME.match(name) or name.isascii() is False:
        raise ValueError(f"not a valid identifier for generated code: {name!r}")
    return name


def safe_int(v: object) -> str:
    """An integer literal for generated source (bools are ints, anything else is refused)."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if not isinstance(v, int):
        raise ValueError(f"not an integer: {v!r}")
    return str(int(v))


def doc_text(text: str) -> str:
    """Text made safe inside a triple-quoted (non-raw) docstring: it reads back exactly as `text`."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n" or (ch.isprintable() and ch not in "\r\x0b\x0c"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


_CMP_OPS = frozenset({"==", "!=", "<", "<=", ">", ">="})


def _op(op: str) -> str:
    if op not in _CMP_OPS:
        raise CodegenError(f"not a comparison: {op!r}")
    return op


def nonneg(e: Expr) -> bool:
    """Provably >= 0 for every i, j in [0, N) (a sign analysis; sound, not complete)."""
    match e:
        case E.Const(v):
            return int(v) >= 0
        case E.Var():
            return True
        case E.Arith("+" | "*" | "//" | "%" | "min", a, b):
            return nonneg(a) and nonneg(b)
        case E.Arith("max", a, b):
            return nonneg(a) or nonneg(b)
        case E.Arith("**", a, E.Const(k)):
            return nonneg(a) or int(k) % 2 == 0
        case E.Abs():
            return True
        case E.IfElse(_, t, o):
            return nonneg(t) and nonneg(o)
    return False


class _Emitter:
    """SSA lines `tK = ...`, one per distinct subexpression (a window's `i - j` is computed once)."""

    def __init__(self, prefix: str = "t") -> None:
        self.lines: list[str] = []
        self.memo: dict[Expr, str] = {}
        self.prefix = prefix

    def emit(self, text: str) -> str:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {text}")
        return name

    def visit(self, e: Expr, render: Callable[[Expr], str]) -> str:
        hit = self.memo.get(e)
        if hit is None:
            hit = render(e)
            self.memo[e] = hit
        return hit


def _powers(base: int, limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= base
    return out


def _pow2(e: Expr) -> TypeGuard[E.Const]:
    """A constant power of two: `x // 2**k` and `x % 2**k` of a non-negative x are a shift and a mask."""
    return isinstance(e, E.Const) and not isinstance(e.value, bool) and int(e.value) > 0 and int(e.value) & (int(e.value) - 1) == 0


def _known_nonneg(pred: Expr) -> frozenset[Expr]:
    """Differences known >= 0 wherever the predicate can be true: a top-level conjunct `j <= i` (causal)
    makes `i - j` non-negative in every other conjunct (where it is false, the whole AND is false)."""
    conjuncts = pred.args if isinstance(pred, E.And) else (pred,)
    out: set[Expr] = set()
    for c in conjuncts:
        match c:
            case E.Cmp("<=", b, a) | E.Cmp(">=", a, b) if isinstance(a, E.Var) and isinstance(b, E.Var):
                out.add(E.Arith("-", a, b))
    return frozenset(out)


RANDOM_UNROLL_MAX = 16


def _random_count(r: Expr) -> str:
    if not isinstance(r, E.Const) or isinstance(r.value, bool):
        raise CodegenError("random(r, ...) compiles only when r is a number once params are set, not a function of N")
    return safe_int(r.value)


def _render_random_triton(em: _Emitter, row: str, col: str, n: str, r: str, seed: int) -> str:
    """Floyd's sampling unrolled: keys k_0 .. k_{r-1} of each row, redrawn from the counter hash, then
    `col == k_c` for some c. Rows are a [BLOCK_M, 1] vector, so the draw costs r hashes per row, not per pair;
    the membership test is r compares per pair."""
    count = int(r)
    if count > RANDOM_UNROLL_MAX:
        raise CodegenError(
            f"random({count}, ...) draws more than {RANDOM_UNROLL_MAX} keys per row; the kernel unrolls the draw"
        )
    if count == 0:
        return em.emit("(i < 0)")
    seedg = (int(seed) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    key = em.emit(f"rkey({n}, {safe_int(seedg)})")
    keys: list[tuple[str, str]] = []
    for c in range(count):
        t = em.emit(f"{n} - {count - c}")
        v = em.emit(f"rdraw({key}, {row}, {t})")
        taken = " | ".join(f"(({t_prev} >= 0) & ({k_prev} == {v}))" for k_prev, t_prev in keys)
        k = em.emit(f"tl.where({taken}, {t}.to(tl.int64), {v})" if taken else v)
        keys.append((k, t))
    return em.emit(" | ".join(f"(({t} >= 0) & ({col} == {k}))" for k, t in keys))


def _render_log2(em: _Emitter, x: str, idx_max: int) -> str:
    """`expr.ilog2` as a binary search by shifts (no float rounding, no libdevice): each step adds s to
    the result and shifts the value right by s when it is at least 2**s; -1 where x <= 0."""
    v = em.emit(f"tl.maximum({x}, 0)")
    steps = []
    for s in (32, 16, 8, 4, 2, 1):
        if s < idx_max.bit_length():  # values stay below 2**bit_length, so larger steps never fire
            steps.append(em.emit(f"tl.where({v} >= {1 << s}, {s}, 0)"))
            if s > 1:  # the last step's shifted value is not needed
                v = em.emit(f"{v} >> {steps[-1]}")
    return em.emit(f"tl.where({x} > 0, {' + '.join(steps) or '0'}, -1)")


def render_triton(pred: Expr, idx_max: int = INT32_MAX) -> tuple[list[str], str]:
    """SSA lines and the result name of the predicate over a tile, for a `@triton.jit` function of
    `(i, j, N)`. `idx_max` bounds every intermediate value (powers for hops(base) stop there)."""
    em = _Emitter()
    known = _known_nonneg(pred)

    def pos(a: Expr) -> bool:
        return a in known or nonneg(a)

    def always(c: Expr) -> bool:
        """`x >= c` with x provably >= 0 and c <= 0 (a window's lower side under causal): always true."""
        match c:
            case E.Cmp(">=", a, E.Const(v)) | E.Cmp("<=", E.Const(v), a) if not isinstance(v, bool):
                return int(v) <= 0 and pos(a)
        return False

    def go(e: Expr) -> str:
        return em.visit(e, render)

    def render(e: Expr) -> str:
        match e:
            case E.Const(v) if isinstance(v, bool):
                return em.emit("(i >= 0)" if v else "(i < 0)")
            case E.Const(v):
                return safe_int(v)
            case E.Var(name):
                return {"i": "i", "j": "j", "N": "N"}[name]
            case E.Arith(op, a, b):
                x, y = go(a), go(b)
                match op:
                    case "+" | "-" | "*":
                        return em.emit(f"{x} {op} {y}")
                    case "//":
                        plain = pos(a) and nonneg(b)
                        if plain and _pow2(b):
                            return em.emit(f"{x} >> {int(b.value).bit_length() - 1}")
                        return em.emit(f"{x} // {y}" if plain else f"fdiv({x}, {y})")
                    case "%":
                        if pos(a) and _pow2(b):
                            return em.emit(f"{x} & {int(b.value) - 1}")  # a bit mask, no division
                        if pos(a) and nonneg(b):
                            return em.emit(f"{x} % {y}")
                        if isinstance(b, E.Const) and int(b.value) > 0:
                            r = em.emit(f"{x} % {y}")  # truncated; shift negatives into [0, b)
                            return em.emit(f"{r} + tl.where({r} < 0, {y}, 0)")
                        return em.emit(f"fmod({x}, {y})")
                    case "min":
                        return em.emit(f"tl.minimum({x}, {y})")
                    case "max":
                        return em.emit(f"tl.maximum({x}, {y})")
                    case "**":
                        if not isinstance(b, E.Const):
                            raise CodegenError("a power's exponent must be a constant")
                        k = int(b.value)
                        return em.emit(" * ".join([x] * k) if k > 0 else "1")
            case E.Abs(a):
                return em.emit(f"tl.abs({go(a)})")
            case E.Log2(a):
                return _render_log2(em, go(a), idx_max)
            case E.Cmp(op, a, b):
                return em.emit(f"{go(a)} {_op(op)} {go(b)}")
            case E.And(args):
                needed = [a for a in args if not always(a)] or [E.Const(True)]
                return em.emit(" & ".join(go(a) for a in needed))
            case E.Or(args):
                return em.emit(" | ".join(go(a) for a in args))
            case E.Not(a):
                return em.emit(f"{go(a)} == 0")
            case E.IfElse(c, t, o):
                return em.emit(f"tl.where({go(c)}, {go(t)}, {go(o)})")
            case E.IsPow(a, base):
                x = go(a)
                if base == 2:
                    return em.emit(f"({x} > 0) & (({x} & ({x} - 1)) == 0)")
                terms = " | ".join(f"({x} == {p})" for p in _powers(int(base), idx_max))
                return em.emit(terms or "(i < 0)")
            case E.RandomMember(row, col, n, r, seed):
                return _render_random_triton(em, go(row), go(col), go(n), _random_count(r), seed)
        raise CodegenError(f"cannot render {e!r}")

    result = go(pred)
    return em.lines, result


def indent(lines: list[str], spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in lines)
