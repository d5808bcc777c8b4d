"""Index expressions: the one language in which every pattern's meaning is written.

Each primitive of LANGUAGE.md lowers (in `semantics.py`) to a predicate over the query index `i`,
the key index `j` and the sequence length `N`. Every backend reads these trees and nothing else: the
reference mask evaluates them with numpy, the block classifier with interval arithmetic, the Triton
code generator renders them as source, the analyser counts them. So the backends cannot drift apart.

Integers are Python's: `//` and `%` floor. Divisors never mention `i` or `j` (the checker enforces
it), so a backend only has to guard against a zero or negative divisor that depends on `N`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

ArithOp: TypeAlias = Literal["+", "-", "*", "//", "%", "**", "min", "max"]
CmpOp: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]
VarName: TypeAlias = Literal["i", "j", "N"]


@dataclass(frozen=True, slots=True)
class Const:
    value: int | bool


@dataclass(frozen=True, slots=True)
class Var:
    name: VarName


@dataclass(frozen=True, slots=True)
class Arith:
    op: ArithOp
    a: Expr
    b: Expr


@dataclass(frozen=True, slots=True)
class Abs:
    a: Expr


@dataclass(frozen=True, slots=True)
class Log2:
    """`log2(a)`: the floor of the base-2 logarithm of a positive `a`, and -1 for `a <= 0`.

    Total and non-decreasing over all integers, so no input is an error at run time and interval
    bounds are the values at the ends; `ilog2` is its one definition on Python integers."""

    a: Expr


@dataclass(frozen=True, slots=True)
class Cmp:
    op: CmpOp
    a: Expr
    b: Expr


@dataclass(frozen=True, slots=True)
class And:
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    a: Expr


@dataclass(frozen=True, slots=True)
class IfElse:
    """Integer selection; needed for Python-style negative slice bounds that depend on N."""

    cond: Expr
    then: Expr
    other: Expr


@dataclass(frozen=True, slots=True)
class IsPow:
    """`a` is `base**m` for some m >= 0 (hops). A node of its own: no finite arithmetic form."""

    a: Expr
    base: int


@dataclass(frozen=True, slots=True)
class RandomMember:
    """`col` is one of the keys that `random(r, seed)` draws for `row` in a sequence of `n`.

    The draw itself is `semantics.random_keys`: a counter hash of (seed, n, row), so any backend can redraw
    one row's keys where it needs them (the Triton kernel does, per query row, without a table).
    """

    row: Expr
    col: Expr
    n: Expr
    r: Expr
    seed: int


Expr: TypeAlias = Const | Var | Arith | Abs | Log2 | Cmp | And | Or | Not | IfElse | IsPow | RandomMember

TRUE = Const(True)
FALSE = Const(False)
I = Var("i")  # noqa: E741 (the query index, as in the papers)
J = Var("j")
N = Var("N")


def const(value: int) -> Const:
    return Const(int(value))


def _fold_arith(op: ArithOp, a: int, b: int) -> int | None:
    match op:
        case "+":
            return a + b
        case "-":
            return a - b
        case "*":
            return a * b
        case "//":
            return a // b if b != 0 else None
        case "%":
            return a % b if b != 0 else None
        case "**":
            return a**b if b >= 0 else None
        case "min":
            return min(a, b)
        case "max":
            return max(a, b)


def arith(op: ArithOp, a: Expr, b: Expr) -> Expr:
    """Build `a op b`, folding constants and identities so rendered code stays small."""
    if isinstance(a, Const) and isinstance(b, Const):
        folded = _fold_arith(op, int(a.value), int(b.value))
        if folded is not None:
            return Const(folded)
    match op, a, b:
        case ("+", Const(0), _):
            return b
        case ("+" | "-", _, Const(0)):
            return a
        case ("*", Const(1), _):
            return b
        case ("*" | "//", _, Const(1)):
            return a
        case ("%", _, Const(1)):
            return Const(0)
        case ("**", _, Const(1)):
            return a
    return Arith(op, a, b)


def add(a: Expr, b: Expr) -> Expr:
    return arith("+", a, b)


def sub(a: Expr, b: Expr) -> Expr:
    return arith("-", a, b)


def mul(a: Expr, b: Expr) -> Expr:
    return arith("*", a, b)


def floordiv(a: Expr, b: Expr) -> Expr:
    return arith("//", a, b)


def mod(a: Expr, b: Expr) -> Expr:
    return arith("%", a, b)


def minimum(a: Expr, b: Expr) -> Expr:
    return a if a == b else arith("min", a, b)


def maximum(a: Expr, b: Expr) -> Expr:
    return a if a == b else arith("max", a, b)


def absolute(a: Expr) -> Expr:
    if isinstance(a, Const):
        return Const(abs(int(a.value)))
    return Abs(a)


def ilog2(x: int) -> int:
    """floor(log2(x)) for x >= 1 and -1 for x <= 0 (the meaning of `log2` in the language)."""
    return x.bit_length() - 1 if x > 0 else -1


def ilog2_of(x: Any) -> Any:
    """`ilog2` element by element on an integer, a numpy array or a torch tensor: a binary search by
    shifts, exact at any width (a float log2 rounds up just below large powers of two)."""
    if isinstance(x, int):
        return ilog2(x)
    bits = 8 * int(x.itemsize)
    v = x * (x > 0)
    out = v * 0
    for s in (32, 16, 8, 4, 2, 1):
        if s <= bits - 2:  # 1 << s must fit the dtype
            big = (v >= (1 << s)) * s
            out = out + big
            v = v >> big
    return out - (x <= 0) * 1


def log2(a: Expr) -> Expr:
    if isinstance(a, Const):
        return Const(ilog2(int(a.value)))
    return Log2(a)


def cmp(op: CmpOp, a: Expr, b: Expr) -> Expr:
    if isinstance(a, Const) and isinstance(b, Const):
        x, y = int(a.value), int(b.value)
        result = {
            "==": x == y,
            "!=": x != y,
            "<": x < y,
            "<=": x <= y,
            ">": x > y,
            ">=": x >= y,
        }[op]
        return Const(result)
    return Cmp(op, a, b)


def conj(*args: Expr) -> Expr:
    """Conjunction, flattened, with TRUE dropped and FALSE absorbing."""
    flat: dict[Expr, None] = {}  # an ordered set: chains of a thousand terms stay linear
    for arg in args:
        match arg:
            case Const(False):
                return FALSE
            case Const(True):
                continue
            case And(inner):
                flat.update(dict.fromkeys(inner))
            case _:
                flat[arg] = None
    if not flat:
        return TRUE
    return next(iter(flat)) if len(flat) == 1 else And(tuple(flat))


def disj(*args: Expr) -> Expr:
    """Disjunction, flattened, with FALSE dropped and TRUE absorbing."""
    flat: dict[Expr, None] = {}  # an ordered set: chains of a thousand terms stay linear
    for arg in args:
        match arg:
            case Const(True):
                return TRUE
            case Const(False):
                continue
            case Or(inner):
                flat.update(dict.fromkeys(inner))
            case _:
                flat[arg] = None
    if not flat:
        return FALSE
    return next(iter(flat)) if len(flat) == 1 else Or(tuple(flat))


def negate(a: Expr) -> Expr:
    match a:
        case Const(value):
            return Const(not value)
        case Not(inner):
            return inner
        case Cmp(op, x, y):
            flipped: dict[CmpOp, CmpOp] = {
                "==": "!=",
                "!=": "==",
                "<": ">=",
                "<=": ">",
                ">": "<=",
                ">=": "<",
            }
            return Cmp(flipped[op], x, y)
    return Not(a)


def if_else(cond: Expr, then: Expr, other: Expr) -> Expr:
    match cond:
        case Const(True):
            return then
        case Const(False):
            return other
    return then if then == other else IfElse(cond, then, other)


def substitute(e: Expr, env: dict[VarName, Expr]) -> Expr:
    """Replace variables, re-folding on the way up (blockwise maps i -> i // b and so on)."""

    def go(x: Expr) -> Expr:
        match x:
            case Const():
                return x
            case Var(name):
                return env.get(name, x)
            case Arith(op, a, b):
                return arith(op, go(a), go(b))
            case Abs(a):
                return absolute(go(a))
            case Log2(a):
                return log2(go(a))
            case Cmp(op, a, b):
                return cmp(op, go(a), go(b))
            case And(args):
                return conj(*(go(a) for a in args))
            case Or(args):
                return disj(*(go(a) for a in args))
            case Not(a):
                return negate(go(a))
            case IfElse(c, t, o):
                return if_else(go(c), go(t), go(o))
            case IsPow(a, base):
                return IsPow(go(a), base)
            case RandomMember(row, col, n, r, seed):
                return RandomMember(go(row), go(col), go(n), go(r), seed)
        raise TypeError(f"not an index expression: {x!r}")

    return go(e)


def free_vars(e: Expr) -> frozenset[VarName]:
    match e:
        case Const():
            return frozenset()
        case Var(name):
            return frozenset({name})
        case Arith(_, a, b) | Cmp(_, a, b):
            return free_vars(a) | free_vars(b)
        case Abs(a) | Log2(a) | Not(a) | IsPow(a, _):
            return free_vars(a)
        case And(args) | Or(args):
            return frozenset().union(*(free_vars(a) for a in args))
        case IfElse(c, t, o):
            return free_vars(c) | free_vars(t) | free_vars(o)
        case RandomMember(row, col, n, r, _):
            return free_vars(row) | free_vars(col) | free_vars(n) | free_vars(r)
    raise TypeError(f"not an index expression: {e!r}")


def children(e: Expr) -> tuple[Expr, ...]:
    """The direct subexpressions of a node (the one generic traversal step every walker uses)."""
    match e:
        case Arith(_, a, b) | Cmp(_, a, b):
            return (a, b)
        case Abs(a) | Log2(a) | Not(a) | IsPow(a, _):
            return (a,)
        case And(args) | Or(args):
            return args
        case IfElse(c, t, o):
            return (c, t, o)
        case RandomMember(row, col, n, r, _):
            return (row, col, n, r)
    return ()


def bind_n(e: Expr, n: int) -> Expr:
    """Fix the sequence length, folding everything that only depended on it."""
    return substitute(e, {"N": Const(n)})


def evaluate_int(e: Expr, n: int | None = None) -> int:
    """Value of an expression over N alone (an argument like `window(N // 4)`)."""
    folded = bind_n(e, n) if n is not None else e
    if not isinstance(folded, Const):
        raise ValueError(f"expression still depends on {sorted(free_vars(folded))}")
    return int(folded.value)


_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 6, "-": 6, "*": 7, "//": 7, "%": 7, "**": 9}


def to_source(e: Expr) -> str:
    """Readable Python-like text of an expression: for messages, docstrings and debugging."""

    def go(x: Expr, outer: int) -> str:
        match x:
            case Const(value):
                return str(value).lower() if isinstance(value, bool) else str(value)
            case Var(name):
                return name
            case Arith("min" | "max" as op, a, b):
                return f"{op}({go(a, 0)}, {go(b, 0)})"
            case Arith(op, a, b):
                p = _PRECEDENCE[op]
                right = p + 1 if op != "**" else p
                left = p if op != "**" else p + 1
                text = f"{go(a, left)} {op} {go(b, right)}"
                return f"({text})" if p < outer else text
            case Abs(a):
                return f"abs({go(a, 0)})"
            case Log2(a):
                return f"log2({go(a, 0)})"
            case Cmp(op, a, b):
                text = f"{go(a, 5)} {op} {go(b, 5)}"
                return f"({text})" if _PRECEDENCE["cmp"] < outer else text
            case And(args) | Or(args):
                word = "and" if isinstance(x, And) else "or"
                text = f" {word} ".join(go(a, _PRECEDENCE[word] + 1) for a in args)
                return f"({text})" if _PRECEDENCE[word] < outer else text
            case Not(a):
                text = f"not {go(a, _PRECEDENCE['not'])}"
                return f"({text})" if _PRECEDENCE["not"] < outer else text
            case IfElse(c, t, o):
                return f"({go(t, 0)} if {go(c, 0)} else {go(o, 0)})"
            case IsPow(a, base):
                return f"is_power({go(a, 0)}, {base})"
            case RandomMember(row, col, n, r, seed):
                return f"random_member({go(row, 0)}, {go(col, 0)}, n={go(n, 0)}, r={go(r, 0)}, seed={seed})"
        raise TypeError(f"not an index expression: {x!r}")

    return go(e, 0)


# --- offset form: predicates of d = i - j --------------------------------------------------------


_D = I  # in an offset form, the variable i stands for d = i - j


def offset_form(e: Expr) -> Expr | None:
    """The predicate rewritten over d = i - j alone (as the variable i), or None when it is not."""
    match e:
        case Const() | Var("N"):
            return e
        case Var():
            return None
        case Arith("-", Var("i"), Var("j")):
            return _D
        case Arith("-", Var("j"), Var("i")):
            return sub(const(0), _D)
        case Cmp(op, Var("j"), Var("i")):
            return cmp(op, const(0), _D)
        case Cmp(op, Var("i"), Var("j")):
            return cmp(op, _D, const(0))
        case Arith(op, a, b):
            x, y = offset_form(a), offset_form(b)
            return None if x is None or y is None else Arith(op, x, y)
        case Cmp(op, a, b):
            x, y = offset_form(a), offset_form(b)
            return None if x is None or y is None else Cmp(op, x, y)
        case Abs(a) | Log2(a) | Not(a) | IsPow(a, _):
            x = offset_form(a)
            if x is None:
                return None
            if isinstance(e, Abs | Log2):
                return type(e)(x)
            return Not(x) if isinstance(e, Not) else IsPow(x, e.base)
        case And(args) | Or(args):
            xs = [offset_form(a) for a in args]
            if any(x is None for x in xs):
                return None
            return And(tuple(xs)) if isinstance(e, And) else Or(tuple(xs))  # type: ignore[arg-type]
        case IfElse(c, t, o):
            xs3 = [offset_form(a) for a in (c, t, o)]
            return None if any(x is None for x in xs3) else IfElse(*xs3)  # type: ignore[arg-type]
    return None
