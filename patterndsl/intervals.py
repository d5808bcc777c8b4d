"""Interval reasoning on predicates: is a rectangle of (i, j) pairs all allowed, none, or some?

Block tables and the analyser never build an N x N mask: they ask this module about rectangles
`[i_lo, i_hi] x [j_lo, j_hi]` (inclusive), many at a time, and subdivide only where the answer is
"some". The answer is sound: ALL and NONE are never wrong; imprecision only turns them into SOME, which
costs speed (a PARTIAL block evaluates the predicate per pair), never correctness.

Works on numpy arrays or torch tensors alike (`xp` is the array module), so tables can be built on the
device the tensors live on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import expr as E
from .expr import Expr
from .runtime.draw import random_keys

NONE, SOME, ALL = 0, 1, 2

# Row ranges up to this wide are enumerated for `random`; wider ones answer SOME.
RANDOM_ROWS_ENUMERATED = 64


@dataclass(frozen=True, slots=True)
class Interval:
    lo: Any
    hi: Any


@dataclass(frozen=True, slots=True)
class Truth:
    """may_true / may_false per rectangle: ALL = not may_false, NONE = not may_true."""

    may_true: Any
    may_false: Any


def classify(pred: Expr, i_lo: Any, i_hi: Any, j_lo: Any, j_hi: Any, xp: Any = np, n: Any = None) -> Any:
    """NONE / SOME / ALL (as int8) for each rectangle. `n`: the sequence length (an int, or per rectangle an
    array like the bounds: packed documents), or None when `pred` has N bound already."""
    t = truth(pred, i_lo, i_hi, j_lo, j_hi, xp, n)
    if xp is np:
        shape = np.broadcast_shapes(*(np.shape(a) for a in (i_lo, i_hi, j_lo, j_hi)))
        may_true = np.broadcast_to(t.may_true, shape)
        may_false = np.broadcast_to(t.may_false, shape)
        return np.where(may_true, np.where(may_false, SOME, ALL), NONE).astype(np.int8)
    torch = _torch()
    shape = torch.broadcast_shapes(*(a.shape for a in (i_lo, i_hi, j_lo, j_hi)))
    device = i_lo.device
    may_true = torch.as_tensor(t.may_true, device=device).expand(shape)
    may_false = torch.as_tensor(t.may_false, device=device).expand(shape)
    return torch.where(may_true, torch.where(may_false, SOME, ALL), NONE).to(torch.int8)


def truth(pred: Expr, i_lo: Any, i_hi: Any, j_lo: Any, j_hi: Any, xp: Any = np, n: Any = None) -> Truth:
    env = {"i": Interval(i_lo, i_hi), "j": Interval(j_lo, j_hi)}
    if n is not None:
        env["N"] = Interval(n, n)
    return _truth(pred, env, xp)


def _torch() -> Any:
    import torch

    return torch


def _const_interval(v: int) -> Interval:
    return Interval(v, v)


def _interval(e: Expr, env: dict[str, Interval], xp: Any) -> Interval:
    match e:
        case E.Const(v):
            return _const_interval(int(v))
        case E.Var("N") if "N" not in env:
            raise ValueError("bind N before interval reasoning")
        case E.Var(name):
            return env[name]
        case E.Arith(op, a, b):
            return _arith(op, _interval(a, env, xp), _interval(b, env, xp), xp)
        case E.Abs(a):
            iv = _interval(a, env, xp)
            lo = _where(_cmpv("<=", 0, iv.lo), iv.lo, _where(_cmpv("<=", iv.hi, 0), -iv.hi, 0, xp), xp)
            return Interval(lo, _max(-iv.lo, iv.hi, xp))
        case E.Log2(a):
            iv = _interval(a, env, xp)  # log2 is non-decreasing: its bounds are its values at the ends
            return Interval(E.ilog2_of(iv.lo), E.ilog2_of(iv.hi))
        case E.IfElse(c, t, o):
            ct = _truth(c, env, xp)
            at, ao = _interval(t, env, xp), _interval(o, env, xp)
            only_t = _not(ct.may_false, xp)
            only_o = _not(ct.may_true, xp)
            lo = _where(only_t, at.lo, _where(only_o, ao.lo, _min(at.lo, ao.lo, xp), xp), xp)
            hi = _where(only_t, at.hi, _where(only_o, ao.hi, _max(at.hi, ao.hi, xp), xp), xp)
            return Interval(lo, hi)
    raise TypeError(f"not an integer expression: {e!r}")


def _scalar(x: Any) -> bool:
    return isinstance(x, int | np.integer)


def _min(a: Any, b: Any, xp: Any) -> Any:
    return min(a, b) if _scalar(a) and _scalar(b) else xp.minimum(_as_array(a, b, xp), _as_array(b, a, xp))


def _max(a: Any, b: Any, xp: Any) -> Any:
    return max(a, b) if _scalar(a) and _scalar(b) else xp.maximum(_as_array(a, b, xp), _as_array(b, a, xp))


def _as_array(a: Any, other: Any, xp: Any) -> Any:
    if not _scalar(a) or xp is np:
        return a
    return _torch().full_like(other, int(a))


def _where(c: Any, a: Any, b: Any, xp: Any) -> Any:
    if isinstance(c, bool):
        return a if c else b
    if xp is np:
        return np.where(c, a, b)
    torch = _torch()
    a = a if torch.is_tensor(a) else torch.full_like(c, int(a), dtype=torch.int64)
    b = b if torch.is_tensor(b) else torch.full_like(c, int(b), dtype=torch.int64)
    return torch.where(c, a, b)


def _not(x: Any, xp: Any) -> Any:
    return (not x) if isinstance(x, bool) else ~x


def _and(a: Any, b: Any) -> Any:
    if isinstance(a, bool):
        return b if a else False
    if isinstance(b, bool):
        return a if b else False
    return a & b


def _or(a: Any, b: Any) -> Any:
    if isinstance(a, bool):
        return True if a else b
    if isinstance(b, bool):
        return True if b else a
    return a | b


def _cmpv(op: str, a: Any, b: Any) -> Any:
    match op:
        case "<=":
            r = a <= b
        case "<":
            r = a < b
        case "==":
            r = a == b
        case _:
            raise ValueError(op)
    return bool(r) if _scalar(a) and _scalar(b) else r


def _arith(op: str, x: Interval, y: Interval, xp: Any) -> Interval:
    match op:
        case "+":
            return Interval(x.lo + y.lo, x.hi + y.hi)
        case "-":
            return Interval(x.lo - y.hi, x.hi - y.lo)
        case "*":
            c = [x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi]
            lo, hi = c[0], c[0]
            for v in c[1:]:
                lo, hi = _min(lo, v, xp), _max(hi, v, xp)
            return Interval(lo, hi)
        case "//":
            # Divisors never depend on i or j (the checker guarantees it), so once N is bound y is one
            # positive constant and floor division is monotone in x.
            return Interval(x.lo // y.lo, x.hi // y.lo)
        case "%":
            # Exact when the range does not wrap around a multiple of the (single) divisor.
            d = y.lo
            same_period = _cmpv("==", x.lo // d, x.hi // d)
            return Interval(_where(same_period, x.lo % d, 0, xp), _where(same_period, x.hi % d, d - 1, xp))
        case "**":
            k = int(y.lo)
            a, b = x.lo**k, x.hi**k
            lo, hi = _min(a, b, xp), _max(a, b, xp)
            if k % 2 == 0:
                straddles = _and(_cmpv("<", x.lo, 0), _cmpv("<", 0, x.hi + 1))
                lo = _where(straddles, 0, lo, xp)
            return Interval(lo, hi)
        case "min":
            return Interval(_min(x.lo, y.lo, xp), _min(x.hi, y.hi, xp))
        case "max":
            return Interval(_max(x.lo, y.lo, xp), _max(x.hi, y.hi, xp))
    raise ValueError(op)


def _truth(e: Expr, env: dict[str, Interval], xp: Any) -> Truth:
    match e:
        case E.Const(v):
            return Truth(bool(v), not bool(v))
        case E.Cmp(op, a, b):
            x, y = _interval(a, env, xp), _interval(b, env, xp)
            return _compare(op, x, y)
        case E.And(args):
            ts = [_truth(a, env, xp) for a in args]
            may_true: Any = True
            may_false: Any = False
            for t in ts:
                may_true = _and(may_true, t.may_true)
                may_false = _or(may_false, t.may_false)
            return Truth(may_true, may_false)
        case E.Or(args):
            ts = [_truth(a, env, xp) for a in args]
            may_true, may_false = False, True
            for t in ts:
                may_true = _or(may_true, t.may_true)
                may_false = _and(may_false, t.may_false)
            return Truth(may_true, may_false)
        case E.Not(a):
            t = _truth(a, env, xp)
            return Truth(t.may_false, t.may_true)
        case E.IsPow(a, base):
            return _is_pow(_interval(a, env, xp), base, xp)
        case E.RandomMember(row, col, n, r, seed):
            rows, cols, count = _interval(row, env, xp), _interval(col, env, xp), _interval(n, env, xp).lo
            if _scalar(count):
                return _random(rows, cols, int(count), E.evaluate_int(r), seed, xp)
            return _random_per_length(rows, cols, count, E.evaluate_int(r), seed, xp)
    raise TypeError(f"not a boolean expression: {e!r}")


def _compare(op: str, x: Interval, y: Interval) -> Truth:
    match op:
        case "<=":
            return Truth(_cmpv("<=", x.lo, y.hi), _not(_cmpv("<=", x.hi, y.lo), None))
        case "<":
            return Truth(_cmpv("<", x.lo, y.hi), _not(_cmpv("<", x.hi, y.lo), None))
        case ">=":
            return _compare("<=", y, x)
        case ">":
            return _compare("<", y, x)
        case "==":
            overlap = _and(_cmpv("<=", x.lo, y.hi), _cmpv("<=", y.lo, x.hi))
            single = _and(_and(_cmpv("==", x.lo, x.hi), _cmpv("==", y.lo, y.hi)), _cmpv("==", x.lo, y.lo))
            return Truth(overlap, _not(single, None))
        case "!=":
            t = _compare("==", x, y)
            return Truth(t.may_false, t.may_true)
    raise ValueError(op)


def _is_pow(x: Interval, base: int, xp: Any) -> Truth:
    lo = _max(x.lo, 1, xp)
    hit: Any = False
    exact: Any = False
    p = 1
    top = int(x.hi) if _scalar(x.hi) else (int(x.hi.max()) if int(np.prod(tuple(x.hi.shape))) > 0 else 0)
    while p <= top:
        hit = _or(hit, _and(_cmpv("<=", lo, p), _cmpv("<=", p, x.hi)))
        exact = _or(exact, _and(_cmpv("==", x.lo, p), _cmpv("==", x.hi, p)))
        p *= base
    return Truth(hit, _not(exact, None))


def _random_per_length(row: Interval, col: Interval, n: Any, r: int, seed: int, xp: Any) -> Truth:
    """`_random` where each rectangle has its own sequence length (packed documents): one draw per length."""
    torch = _torch()
    shape = torch.broadcast_shapes(*(torch.as_tensor(a).shape for a in (row.lo, row.hi, col.lo, col.hi, n)))
    flat = [torch.broadcast_to(torch.as_tensor(a, device=n.device), shape).reshape(-1)
            for a in (row.lo, row.hi, col.lo, col.hi, n)]
    may_true = torch.empty(flat[4].shape, dtype=torch.bool, device=n.device)
    may_false = torch.empty_like(may_true)
    for value in torch.unique(flat[4]).tolist():
        sel = torch.nonzero(flat[4] == value).reshape(-1)
        t = _random(Interval(flat[0][sel], flat[1][sel]), Interval(flat[2][sel], flat[3][sel]), int(value), r, seed, xp)
        may_true[sel], may_false[sel] = t.may_true, t.may_false
    return Truth(may_true.reshape(shape), may_false.reshape(shape))


def _random(row: Interval, col: Interval, n: int, r: int, seed: int, xp: Any) -> Truth:
    """Enumerate the draws of narrow row ranges; count keys inside each column range."""
    to_np = (lambda a: np.asarray(a)) if xp is np else (lambda a: a.detach().cpu().numpy())
    rlo, rhi = np.atleast_1d(to_np(row.lo)), np.atleast_1d(to_np(row.hi))
    clo, chi = np.atleast_1d(to_np(col.lo)), np.atleast_1d(to_np(col.hi))
    shape = np.broadcast_shapes(rlo.shape, rhi.shape, clo.shape, chi.shape)
    rlo, rhi, clo, chi = (np.broadcast_to(a, shape).reshape(-1) for a in (rlo, rhi, clo, chi))
    may_true = np.ones(rlo.shape, dtype=bool)
    may_false = np.ones(rlo.shape, dtype=bool)
    width = rhi - rlo
    narrow = width < RANDOM_ROWS_ENUMERATED
    if narrow.any() and r > 0:
        idx = np.nonzero(narrow)[0]
        any_hit = np.zeros(idx.size, dtype=bool)
        any_gap = np.zeros(idx.size, dtype=bool)
        for off in range(int(width[idx].max()) + 1):
            live = off <= width[idx]
            rows = np.minimum(rlo[idx] + off, n - 1)
            rows_u, inv = np.unique(rows, return_inverse=True)
            keys = random_keys(rows_u, n, r, seed)[inv]  # [k, r]
            inside = ((keys >= clo[idx, None]) & (keys <= chi[idx, None])).sum(axis=1)
            any_hit |= live & (inside > 0)
            any_gap |= live & (inside < (chi[idx] - clo[idx] + 1))
        may_true[idx] = any_hit
        may_false[idx] = any_gap
    elif r == 0:
        may_true[:] = False
    out_t, out_f = may_true.reshape(shape), may_false.reshape(shape)
    if xp is not np:
        torch = _torch()
        dev = row.lo.device if torch.is_tensor(row.lo) else col.lo.device
        return Truth(torch.from_numpy(out_t).to(dev), torch.from_numpy(out_f).to(dev))
    return Truth(out_t, out_f)


# --- runs of a condition on one variable ------------------------------------------------------------

LEAF_1D = 64  # intervals this narrow are evaluated point by point


def runs(pred: Expr, var: str, lo: int, hi: int, n: int, spend: Callable[[int], None] | None = None,
         cost: int = 1, per_point: int = 1) -> np.ndarray:
    """Maximal runs [a, b] (inclusive, an [R, 2] int64 array, ascending) of x in [lo, hi] where `pred`, a
    condition on the one variable `var` ("i" or "j"; N bound to n), holds. Intervals the classifier answers
    for are taken whole; the rest are halved until narrow, then evaluated point by point, so a condition
    with few boundaries costs work logarithmic in the range. `spend(units)`, where given, is charged `cost`
    per interval classified and `per_point` per point evaluated (it may raise to stop the search)."""
    from .runtime.evaluate import evaluate

    found: list[np.ndarray] = []
    cur_lo = np.array([lo], dtype=np.int64)
    cur_hi = np.array([hi], dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    while cur_lo.size and lo <= hi:
        if spend is not None:
            spend(int(cur_lo.size) * cost)
        if var == "i":
            verdict = classify(pred, cur_lo, cur_hi, zero, zero, n=n)
        else:
            verdict = classify(pred, zero, zero, cur_lo, cur_hi, n=n)
        every = verdict == ALL
        found.append(np.stack([cur_lo[every], cur_hi[every]], axis=1))
        some = verdict == SOME
        s_lo, s_hi = cur_lo[some], cur_hi[some]
        narrow = s_hi - s_lo < LEAF_1D
        if narrow.any():
            a, b = s_lo[narrow], s_hi[narrow]
            sizes = b - a + 1
            if spend is not None:
                spend(int(sizes.sum()) * per_point)
            pts = np.repeat(a, sizes) + (np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes))
            vals = evaluate(pred, pts, zero, n) if var == "i" else evaluate(pred, zero, pts, n)
            hit = pts[np.broadcast_to(np.asarray(vals, dtype=bool), pts.shape)]
            found.append(np.stack([hit, hit], axis=1))
        wide_lo, wide_hi = s_lo[~narrow], s_hi[~narrow]
        mid = wide_lo + (wide_hi - wide_lo) // 2
        cur_lo = np.concatenate([wide_lo, mid + 1])
        cur_hi = np.concatenate([mid, wide_hi])
    return merge_runs(np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64))


def merge_runs(r: np.ndarray) -> np.ndarray:
    """Sort inclusive intervals and merge those that overlap or touch."""
    if r.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    r = r[np.argsort(r[:, 0], kind="stable")]
    reach = np.maximum.accumulate(r[:, 1])
    start = np.ones(r.shape[0], dtype=bool)
    start[1:] = r[1:, 0] > reach[:-1] + 1
    idx = np.flatnonzero(start)
    ends = np.concatenate([idx[1:] - 1, [r.shape[0] - 1]])
    return np.stack([r[idx, 0], reach[ends]], axis=1).astype(np.int64)
