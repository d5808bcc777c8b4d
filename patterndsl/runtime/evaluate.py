"""Index expressions evaluated on arrays: numpy (the reference mask, the analysis) or torch (the CPU path).

One evaluator for both, so the reference mask and the run-time CPU path cannot disagree. Python's integer
semantics hold on both: `//` and `%` floor (numpy's and torch's operators do), a power-of-two divisor
of an integer array becomes a shift or a mask, and a subexpression that occurs several times (a window's
`i - j`) is computed once per call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import expr as E
from ..expr import Expr
from .draw import random_keys


def _torch() -> Any:
    import torch

    return torch


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def evaluate(e: Expr, i: Any, j: Any, n: int) -> Any:
    """The value of `e` at query indices `i` and key indices `j` (broadcasting arrays, numpy or torch)."""
    repeated = _repeated(e)
    memo: dict[int, Any] = {}
    torch_mode = _is_torch(i) or _is_torch(j)

    def go(x: Expr) -> Any:
        slot = repeated.get(id(x))
        if slot is None:
            return compute(x)
        if slot not in memo:
            memo[slot] = compute(x)
        return memo[slot]

    def compute(x: Expr) -> Any:
        match x:
            case E.Const(v):
                return v
            case E.Var("i"):
                return i
            case E.Var("j"):
                return j
            case E.Var("N"):
                return n
            case E.Arith(op, a, b):
                return _arith(op, go(a), go(b), torch_mode)
            case E.Abs(a):
                return abs(go(a))
            case E.Log2(a):
                return E.ilog2_of(go(a))
            case E.Cmp(op, a, b):
                return _compare(op, go(a), go(b))
            case E.And(args):
                out = go(args[0])
                for a in args[1:]:
                    out = _both(out, go(a))
                return out
            case E.Or(args):
                out = go(args[0])
                for a in args[1:]:
                    out = _either(out, go(a))
                return out
            case E.Not(a):
                v = go(a)
                return (not v) if isinstance(v, bool | np.bool_) else ~v
            case E.IfElse(c, t, o):
                return _where(go(c), go(t), go(o), torch_mode)
            case E.IsPow(a, base):
                return is_power(go(a), base)
            case E.RandomMember(row, col, nn, r, seed):
                return random_member(go(row), go(col), int(go(nn)), int(go(r)), seed)
        raise TypeError(f"cannot evaluate {x!r}")

    try:
        return go(e)
    finally:
        memo.clear()  # go and compute form a reference cycle: free the arrays now, not at the next GC


def _scalar(x: Any) -> bool:
    return isinstance(x, int | np.integer | bool | np.bool_)


def _both(a: Any, b: Any) -> Any:
    if _scalar(a) and _scalar(b):
        return bool(a) and bool(b)
    return a & b


def _either(a: Any, b: Any) -> Any:
    if _scalar(a) and _scalar(b):
        return bool(a) or bool(b)
    return a | b


def _where(c: Any, a: Any, b: Any, torch_mode: bool) -> Any:
    if _scalar(c):
        return a if c else b
    if torch_mode:
        torch = _torch()
        return torch.where(c, torch.as_tensor(a, device=c.device), torch.as_tensor(b, device=c.device))
    return np.where(c, a, b)


def _minmax(op: str, a: Any, b: Any, torch_mode: bool) -> Any:
    if _scalar(a) and _scalar(b):
        return min(a, b) if op == "min" else max(a, b)
    if torch_mode:
        torch = _torch()
        like = a if torch.is_tensor(a) else b
        a, b = (torch.as_tensor(x, device=like.device) for x in (a, b))
        return torch.minimum(a, b) if op == "min" else torch.maximum(a, b)
    return np.minimum(a, b) if op == "min" else np.maximum(a, b)


def _arith(op: str, a: Any, b: Any, torch_mode: bool) -> Any:
    match op:
        case "+":
            return a + b
        case "-":
            return a - b
        case "*":
            return a * b
        case "//" | "%":
            _positive(b)
            if _pow2_divisor(a, b):  # a shift or a mask: floor semantics in two's complement, several times faster
                return a >> (int(b).bit_length() - 1) if op == "//" else a & (int(b) - 1)
            return a // b if op == "//" else a % b
        case "**":
            return a**b
        case "min" | "max":
            return _minmax(op, a, b, torch_mode)
    raise ValueError(op)


def _pow2_divisor(a: Any, b: Any) -> bool:
    """A power-of-two constant divisor of an integer array."""
    if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b & (b - 1):
        return False
    if isinstance(a, np.ndarray):
        kind: str = a.dtype.kind
        return kind == "i"
    return _is_torch(a) and not a.is_floating_point() and a.dtype != _torch().bool


def _positive(b: Any) -> None:
    bad = (b <= 0) if _scalar(b) else bool((b <= 0).any())
    if bad:
        raise ZeroDivisionError("a divisor in the pattern is zero or negative for this N")


def _compare(op: str, a: Any, b: Any) -> Any:
    match op:
        case "==":
            return a == b
        case "!=":
            return a != b
        case "<":
            return a < b
        case "<=":
            return a <= b
        case ">":
            return a > b
        case ">=":
            return a >= b
    raise ValueError(op)


def is_power(d: Any, base: int) -> Any:
    """d == base**m for some m >= 0 (False for d < 1): a Python int, a numpy array or a torch tensor."""
    if _scalar(d):
        p = 1
        while p < d:
            p *= base
        return bool(d >= 1 and p == d)
    if base == 2:
        return (d >= 1) & ((d & (d - 1)) == 0)
    out = d < 0  # all False, of d's kind and shape
    size = d.size if isinstance(d, np.ndarray) else d.numel()
    top = int(d.max()) if size else 0
    p = 1
    while p <= top:
        out = out | (d == p)
        p *= base
    return out


def random_member(row: Any, col: Any, n: int, r: int, seed: int) -> Any:
    """col in random_keys(row): each distinct row drawn once (blockwise repeats them), its keys set in a
    [rows, n] bitmap and the answer gathered, so the cost is one pass over the output whatever r.
    Tensors go through the host and come back on their device."""
    torch_mode = _is_torch(row) or _is_torch(col)
    device = None
    if torch_mode:
        device = row.device if _is_torch(row) else col.device
        row = row.cpu().numpy() if _is_torch(row) else row
        col = col.cpu().numpy() if _is_torch(col) else col
    row, col = np.asarray(row), np.asarray(col)
    shape = np.broadcast_shapes(row.shape, col.shape)
    if min(r, n) <= 0:
        hit = np.zeros(shape, dtype=bool)
    else:
        unique_rows, inverse = np.unique(row, return_inverse=True)  # on row's own (small) shape
        keys = random_keys(unique_rows, n, r, seed)  # [U, min(r, n)]
        member = np.zeros((unique_rows.shape[0], n), dtype=bool)
        member[np.arange(unique_rows.shape[0])[:, None], keys] = True
        inside = (col >= 0) & (col < n)
        hit = np.broadcast_to(member[inverse.reshape(row.shape), np.clip(col, 0, n - 1)] & inside, shape)
    if torch_mode:
        return _torch().from_numpy(np.array(hit)).to(device)  # a writable copy (a broadcast view is read-only)
    return hit if shape else bool(hit)


def _repeated(e: Expr) -> dict[int, int]:
    """id(node) -> a shared slot, for the compound nodes that occur more than once (by value) in e."""
    slots: dict[Expr, int] = {}
    ids: dict[int, int] = {}
    count: dict[int, int] = {}

    def visit(x: Expr) -> None:
        if isinstance(x, E.Const | E.Var):
            return
        slot = slots.setdefault(x, len(slots))
        ids[id(x)] = slot
        count[slot] = count.get(slot, 0) + 1
        for child in E.children(x):
            visit(child)

    visit(e)
    return {k: slot for k, slot in ids.items() if count[slot] > 1}
