"""A figure known only between two values, and arithmetic that carries it through costs and totals.

Where an exact figure would need more work than the analyser spends at this N (see `limits.py`), it
reports the lower and upper bound interval reasoning proves. Costs are monotone in pairs and tiles, so
interval arithmetic on non-negative quantities keeps every derived figure (FLOPs, bytes, efficiency,
totals) bounded too. In JSON a bound is written {"lower": x, "upper": y}; exact figures stay numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Number = int | float


@dataclass(frozen=True, slots=True)
class Bound:
    """lo <= value <= hi, both known (for non-negative quantities in arithmetic)."""

    lo: Number
    hi: Number

    def __add__(self, other: Any) -> Bound:
        o = _as_bound(other)
        return Bound(self.lo + o.lo, self.hi + o.hi)

    __radd__ = __add__

    def __mul__(self, other: Any) -> Bound:
        o = _as_bound(other)
        return Bound(self.lo * o.lo, self.hi * o.hi)  # non-negative factors

    __rmul__ = __mul__

    def __sub__(self, other: Any) -> Bound:
        o = _as_bound(other)
        return Bound(self.lo - o.hi, self.hi - o.lo)

    def __rsub__(self, other: Any) -> Bound:
        return _as_bound(other) - self


def _as_bound(x: Any) -> Bound:
    return x if isinstance(x, Bound) else Bound(x, x)


Value = int | float | Bound


def exact(x: Value) -> bool:
    return not isinstance(x, Bound)


def make(lo: Number, hi: Number) -> Value:
    """The value itself when both bounds meet."""
    return lo if lo == hi else Bound(lo, hi)


def ratio(a: Value, b: Value, empty: float = 1.0, cap: float = float("inf")) -> Value:
    """a / b for non-negative a and b: `empty` when b is surely 0, never above `cap`."""
    x, y = _as_bound(a), _as_bound(b)
    if y.hi == 0:
        return empty
    lo = min(cap, x.lo / y.hi)
    hi = min(cap, x.hi / y.lo) if y.lo else cap
    return make(lo, hi)


def upper(x: Value) -> Number:
    return x.hi if isinstance(x, Bound) else x


def lower(x: Value) -> Number:
    return x.lo if isinstance(x, Bound) else x


def jsonable(x: Any) -> Any:
    """The result with every Bound written as {"lower": .., "upper": ..}."""
    if isinstance(x, Bound):
        return {"lower": x.lo, "upper": x.hi}
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x
