"""Reference semantics: the dense boolean mask of a static pattern, evaluated from its predicate.

This is the one place that builds an N x N array, and only because the user asked for one (`patc mask`,
`patc show`, tests). Rows are evaluated in chunks, terms that depend on one index stay one-dimensional
([rows, 1] or [1, N]) and only the operations that mix i and j broadcast, so N = 16384 stays well under
1 GiB beyond the result itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import check, ir
from . import expr as E
from .expr import Expr
from .runtime.evaluate import evaluate
from .semantics import predicate
from .source import PatternError

__all__ = ["dense_mask", "eval_numpy", "evaluate_mask", "index_dtype", "magnitude_bound", "cell_density"]

eval_numpy = evaluate  # the one evaluator (runtime/evaluate.py), on numpy arrays here

CHUNK_ELEMENTS = 1 << 22
MAX_DENSE_BYTES = 1 << 40  # 1 TiB: no machine we run on has it, so refuse before allocating
MAX_DRAWN_PAIRS = 1 << 36  # a picture evaluates every pair: beyond this it would take minutes


def dense_mask(body: ir.Body, n: int, heads: int | None = None) -> np.ndarray:
    """[n, n] bool for a pattern; [heads, n, n] for a `heads` body (heads must match its ranges)."""
    count = body.count if isinstance(body, ir.Heads) else 1
    too_big = PatternError(
        f"a dense mask at N = {n} needs {count * n * n / 2**30:.1f} GiB, more than this machine can give",
        None,
        "dense masks are for checking and pictures; use a smaller N",
    )
    if count * n * n > MAX_DENSE_BYTES:
        raise too_big  # refused up front: with memory overcommit numpy's allocation might not fail
    try:
        return _dense_mask(body, n, heads)
    except MemoryError:
        raise too_big from None
    except RecursionError:
        raise PatternError("the pattern is nested too deeply to evaluate", None, "flatten chains of 'let'") from None


def _dense_mask(body: ir.Body, n: int, heads: int | None) -> np.ndarray:
    if isinstance(body, ir.Heads):
        if heads is not None and heads != body.count:
            raise PatternError(f"this pattern defines {body.count} heads, but {heads} were asked for")
        out = np.empty((body.count, n, n), dtype=bool)
        cache: dict[ir.Pattern, np.ndarray] = {}
        for h in range(body.count):
            p = body.pattern_for(h)
            if p not in cache:
                cache[p] = _dense_mask(p, n, None)
            out[h] = cache[p]
        return out
    return evaluate_mask(_static_predicate(body, n), n)


def cell_density(p: ir.Pattern, n: int, rows: int, cols: int) -> np.ndarray:
    """Fraction of allowed pairs in each cell of a rows x cols grid over the [n, n] mask, built a chunk of
    queries at a time: pictures of any N without holding the mask (cells as in `draw.downsample`)."""
    if n * n > MAX_DRAWN_PAIRS:
        raise PatternError(f"N = {n} has too many pairs to draw ({n * n:.2e})", None, "draw at a smaller N")
    try:
        pred = _static_predicate(p, n)
    except RecursionError:
        raise PatternError("the pattern is nested too deeply to evaluate", None, "flatten chains of 'let'") from None
    ri = (np.arange(n) * rows) // n
    ci = (np.arange(n) * cols) // n
    starts = np.searchsorted(ci, np.arange(cols), side="left")
    ends = np.searchsorted(ci, np.arange(cols), side="right")
    counts = np.zeros((rows, cols))
    step = max(1, CHUNK_ELEMENTS // n)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = evaluate_mask(pred, n, slice(lo, hi))
        csum = np.zeros((hi - lo, n + 1), dtype=np.int32 if n < 1 << 31 else np.int64)
        np.cumsum(block, axis=1, out=csum[:, 1:])
        np.add.at(counts, ri[lo:hi], csum[:, ends] - csum[:, starts])
    sizes = np.bincount(ri, minlength=rows)[:, None] * (ends - starts)[None, :]
    fraction: np.ndarray = counts / np.maximum(sizes, 1)
    return fraction


def _static_predicate(p: ir.Pattern, n: int) -> Expr:
    if n < 1:
        raise PatternError(f"N must be at least 1, got {n}")
    if ir.is_dynamic(p):
        raise PatternError("this pattern holds a dynamic selector (topk, threshold, vertical, slash): its mask depends on q and k")
    check.validate(p, n)
    return E.bind_n(predicate(p), n)


def evaluate_mask(pred: Expr, n: int, rows: slice | None = None) -> np.ndarray:
    """Evaluate a predicate (N already bound) for rows `rows` (default all) and every key."""
    start, stop = (0, n) if rows is None else (rows.start or 0, rows.stop if rows.stop is not None else n)
    out = np.empty((stop - start, n), dtype=bool)
    step = max(1, CHUNK_ELEMENTS // max(1, n))
    dtype = index_dtype(pred, n)
    j = np.arange(n, dtype=dtype)[None, :]
    for lo in range(start, stop, step):
        hi = min(stop, lo + step)
        i = np.arange(lo, hi, dtype=dtype)[:, None]
        try:
            value = eval_numpy(pred, i, j, n)
        except ZeroDivisionError as e:
            raise PatternError(str(e)) from None
        out[lo - start : hi - start] = np.broadcast_to(value, (hi - lo, n))
    return out


def index_dtype(pred: Expr, n: int) -> type[np.signedinteger[Any]]:
    """int32 when no intermediate value can leave its range, else int64; an error past int64.

    numpy integers wrap silently, so the bound is proved up front from the expression (|i|, |j| < N)
    instead of trusted: a pattern like `where(q * 2**40 < k)` must not quietly mean something else.
    """
    bound = magnitude_bound(pred, n)
    if bound < 1 << 31:
        return np.int32
    if bound < 1 << 63:
        return np.int64
    raise PatternError(
        f"the pattern's integer arithmetic leaves the 64-bit range at N = {n}",
        None,
        "keep the values in where(...) and in arguments below 2**62",
    )


_HUGE = 1 << 80  # "does not fit", kept small so bounds of towers of ** stay cheap


def magnitude_bound(e: Expr, n: int) -> int:
    """An upper bound on |value| over every node of `e` for 0 <= i, j < n (capped at _HUGE)."""
    worst = 0

    def go(x: Expr) -> int:
        nonlocal worst
        match x:
            case E.Const(v):
                b = abs(int(v))
            case E.Var("N"):
                b = n
            case E.Var():
                b = max(0, n - 1)
            case E.Arith(op, a, c):
                ba, bc = go(a), go(c)
                match op:
                    case "+" | "-":
                        b = ba + bc
                    case "*":
                        b = ba * bc
                    case "//" | "min" | "max":
                        b = max(ba, bc)
                    case "%":
                        b = max(ba, bc)
                    case _:  # "**": the exponent is a constant (the checker insists)
                        b = _HUGE if ba >= 2 and (ba.bit_length() * bc) > 81 else ba**bc
            case E.Abs(a) | E.Log2(a) | E.Not(a) | E.IsPow(a, _):
                b = go(a)
            case E.Cmp(_, a, c):
                b = max(go(a), go(c))
            case E.And(args) | E.Or(args):
                b = max(go(a) for a in args)
            case E.IfElse(c, t, o):
                b = max(go(c), go(t), go(o))
            case E.RandomMember(row, col):
                b = max(go(row), go(col))  # n and r are plain Python ints by now, never arrays
            case _:
                raise TypeError(f"not an index expression: {x!r}")
        b = min(b, _HUGE)
        worst = max(worst, b)
        return b

    go(e)
    return worst
