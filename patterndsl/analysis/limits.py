"""What the analyser serves: the largest N, the work it may spend, and the integer range it computes in.

Every figure of `patc analyze` is computed in time and memory that do not grow with N wherever the
pattern's structure allows it (see `pieces.py`, `tiles.py`); only the fallbacks that enumerate rows
(`count.py`) grow with N, and they run only up to ARRAY_LIMIT. Past that, or past a work budget, a
figure is given as bounds (`Bound`) with the reason. The limits:

- N <= MAX_N = 2**60: the analysis computes with 64-bit integers (numpy) and offsets, tile corners and
  sums of two indices must stay below 2**63;
- every integer the pattern's own arithmetic reaches for 0 <= q, k < N (e.g. `q * k`) must stay below
  2**62 (ARITH_LIMIT), for the same reason; the error names the largest N this pattern allows;
- per-row arrays (the exact counts that enumerate rows) only for N <= ARRAY_LIMIT, and within
  ARRAY_WORK: a predicate interval reasoning cannot split costs O(N^2) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import expr as E
from ..expr import Expr
from ..source import PatternError

MAX_N = 1 << 60
ARRAY_LIMIT = 1 << 22
ARITH_LIMIT = 1 << 62
WORK = 1 << 21  # interval classifications and point evaluations one structural analysis may spend
ARRAY_WORK = 1 << 24  # the same for one enumeration of rows or tiles (about ten seconds on one core)
REFINE_PAIRS = 1 << 23  # pairs of PARTIAL tiles one tiling settles (`tiling.refine`); the rest stay PARTIAL


class OverBudget(Exception):
    """An exact method would need more work than its budget at this N: the caller falls back."""


@dataclass
class Budget:
    """Work left to one analysis; `spend` raises OverBudget once it runs out."""

    left: int = WORK

    def spend(self, amount: int) -> None:
        self.left -= amount
        if self.left < 0:
            raise OverBudget


def check_n(n: int) -> None:
    """Refuse a sequence length the analysis cannot serve, in one sentence."""
    if n < 1:
        raise PatternError(f"N must be at least 1, got {n}")
    if n > MAX_N:
        raise PatternError(
            f"N = {n} is past the largest sequence length the analysis serves, 2**60 = {MAX_N:,}",
            None,
            "the analysis computes in 64-bit integers; use a smaller N",
        )


def check_arithmetic(pred: Expr, n: int) -> None:
    """Refuse N where the predicate's own integer arithmetic (N free in `pred`) would leave ARITH_LIMIT."""
    worst = _worst(E.bind_n(pred, n), n)
    if worst is None:
        return
    sub, value = worst
    lo, hi = 1, n - 1
    while lo < hi:  # the largest N whose arithmetic fits (every magnitude grows with N)
        mid = (lo + hi + 1) // 2
        if _worst(E.bind_n(pred, mid), mid) is None:
            lo = mid
        else:
            hi = mid - 1
    raise PatternError(
        f"at N = {n:,} the pattern's `{E.to_source(sub)}` reaches about {float(value):.3g}, past the 64-bit "
        "integers the analysis computes in",
        None,
        f"this pattern can be analysed up to N = {lo:,}",
    )


def _worst(pred: Expr, n: int) -> tuple[Expr, int] | None:
    """An integer subexpression whose value range over 0 <= i, j < n reaches ARITH_LIMIT, if any.

    Interval arithmetic over the whole square bounds every value any sub-rectangle or single pair can
    produce (it is inclusion-monotone), so this one pass covers all later computations.
    """
    from ..intervals import Interval, _interval

    env = {"i": Interval(0, n - 1), "j": Interval(0, n - 1)}
    stack = [pred]
    while stack:
        e = stack.pop()
        match e:
            case E.Arith(_, a, b) | E.Cmp(_, a, b):
                stack += [a, b]
            case E.Abs(a) | E.Log2(a) | E.IsPow(a, _) | E.Not(a):
                stack.append(a)
            case E.And(args) | E.Or(args):
                stack += list(args)
            case E.IfElse(c, t, o):
                stack += [c, t, o]
            case E.RandomMember(row, col, _, _, _):
                stack += [row, col]
        if not isinstance(e, E.Arith | E.Abs | E.IfElse):
            continue
        iv = _interval(e, env, None)
        value = max(abs(int(iv.lo)), abs(int(iv.hi)))
        if value >= ARITH_LIMIT:
            return e, value
    return None
