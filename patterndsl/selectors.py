"""Dynamic selectors (`topk`, `threshold`) split into the static patterns that surround them.

LANGUAGE.md: a selector picks key blocks of `b` tokens per query block from the data; inside an
intersection `A & sel` it picks only among key blocks where `A` allows at least one pair, and `A` still
applies token by token. Selectors never sit under a complement (the checker refuses it), so a pattern is
monotone in its selector, and Shannon's expansion gives its exact meaning with one selector `S`:

    allowed(i, j) = P0(i, j) or (S[i // b, j // b] and P1(i, j))

with `P0` the pattern where the selector is `none` (the static part: what holds whatever is picked) and
`P1` the pattern where it is `full`. The candidates the selector picks among are the key blocks where the
context `C` allows at least one pair; `C` is the intersection of every static operand `A` of an `A & ...`
on the way from the root down to the selector (`full` when there is none). `P0` is a subset of `P1`, so a
selected block's allowed pairs are exactly `P1`'s there: the kernel classifies them with `P1`'s tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ir
from .source import PatternError

__all__ = ["Split", "split"]


@dataclass(frozen=True, slots=True)
class Split:
    selector: ir.TopK | ir.Threshold
    static: ir.Pattern  # P0: the selector replaced by none
    selected: ir.Pattern  # P1: the selector replaced by full
    context: ir.Pattern  # C: where the selector may pick

    @property
    def block(self) -> int:
        return self.selector.block


def _replace(p: ir.Pattern, by: ir.Pattern) -> ir.Pattern:
    match p:
        case ir.TopK() | ir.Threshold():
            return by
        case ir.Union(a, b):
            return _simplify(ir.Union(_replace(a, by), _replace(b, by)))
        case ir.Inter(a, b):
            return _simplify(ir.Inter(_replace(a, by), _replace(b, by)))
    return p  # complements and blockwise hold no selector (the checker refuses them there)


def _simplify(p: ir.Pattern) -> ir.Pattern:
    match p:
        case ir.Union(ir.Empty(), x) | ir.Union(x, ir.Empty()) | ir.Inter(ir.Full(), x) | ir.Inter(x, ir.Full()):
            return x
        case ir.Union(ir.Full(), _) | ir.Union(_, ir.Full()):
            return ir.Full()
        case ir.Inter(ir.Empty(), _) | ir.Inter(_, ir.Empty()):
            return ir.Empty()
    return p


def _context(p: ir.Pattern) -> ir.Pattern | None:
    """The conjunction of the static operands of the intersections above the selector (None: no selector)."""
    match p:
        case ir.TopK() | ir.Threshold():
            return ir.Full()
        case ir.Union(a, b):
            return _context(a) if ir.is_dynamic(a) else _context(b) if ir.is_dynamic(b) else None
        case ir.Inter(a, b):
            inner, other = (a, b) if ir.is_dynamic(a) else (b, a)
            c = _context(inner)
            return None if c is None else _simplify(ir.Inter(other, c))
    return None


def split(p: ir.Pattern, name: str = "pattern") -> Split:
    """The selector of a dynamic pattern and its static parts; one selector per pattern is compiled."""
    sels = [n for n in ir.walk(p) if isinstance(n, ir.TopK | ir.Threshold)]
    if not sels:
        raise ValueError("not a dynamic pattern")
    if len(sels) > 1:
        raise PatternError(
            f"'{name}' holds {len(sels)} selectors; a compiled pattern may hold one",
            sels[1].span,
            "give different heads different selectors with heads { ... }",
        )
    ctx = _context(p)
    assert ctx is not None
    return Split(sels[0], _replace(p, ir.Empty()), _replace(p, ir.Full()), ctx)
