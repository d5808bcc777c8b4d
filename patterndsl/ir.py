"""The checked intermediate representation: what a pattern is, with names resolved and params folded.

Integer arguments are index expressions (`expr.Expr`) over `N` alone, because a pattern may say
`window(N // 8)`; everything else is already a plain value. Spans ride along for errors that can only
be found once N is known and never take part in equality, so `parse(fmt(x)) == parse(x)` compares
meaning, not layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from .expr import Expr
from .source import Span

_span = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Full:
    pass


@dataclass(frozen=True, slots=True)
class Empty:
    """`none` in the language."""


@dataclass(frozen=True, slots=True)
class Causal:
    pass


@dataclass(frozen=True, slots=True)
class Window:
    before: Expr
    after: Expr
    dilation: Expr
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class Stride:
    step: Expr
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class Sink:
    count: Expr
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class TokenSlice:
    """`a:b:c`; a missing bound is None, negative bounds count from N, all clipped to [0, N)."""

    start: Expr | None
    stop: Expr | None
    step: Expr
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class TokenList:
    items: tuple[Expr, ...]
    span: Span | None = _span


TokenSet: TypeAlias = TokenSlice | TokenList


@dataclass(frozen=True, slots=True)
class Global:
    tokens: TokenSet


@dataclass(frozen=True, slots=True)
class Rows:
    tokens: TokenSet


@dataclass(frozen=True, slots=True)
class Cols:
    tokens: TokenSet


@dataclass(frozen=True, slots=True)
class Hops:
    base: int


@dataclass(frozen=True, slots=True)
class Random:
    count: Expr
    seed: int
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class Grid:
    """`layout name = grid(n1, ..., nk, prefix=p, suffix=s)`: `prefix` extra tokens (text, registers), then
    the grid's cells in row-major order (last axis fastest), then `suffix` extra tokens. Layout patterns
    hold between cells only; the extra tokens are the token sets `name.prefix` and `name.suffix`."""

    name: str
    dims: tuple[int, ...]
    span: Span | None = _span
    prefix: int = 0
    suffix: int = 0

    @property
    def cells(self) -> int:
        size = 1
        for d in self.dims:
            size *= d
        return size

    @property
    def size(self) -> int:
        """Every token of the layout: the sequence length N it describes."""
        return self.prefix + self.cells + self.suffix

    @property
    def has_extra_tokens(self) -> bool:
        return self.prefix > 0 or self.suffix > 0

    def describe(self) -> str:
        """`grid(16, 32, 32, prefix=226)` as written (for messages)."""
        extra = "".join(f", {k}={v}" for k, v in (("prefix", self.prefix), ("suffix", self.suffix)) if v)
        return f"grid({', '.join(map(str, self.dims))}{extra})"

    @property
    def strides(self) -> tuple[int, ...]:
        out, acc = [], 1
        for d in reversed(self.dims):
            out.append(acc)
            acc *= d
        return tuple(reversed(out))


@dataclass(frozen=True, slots=True)
class Neighborhood:
    layout: Grid
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class Where:
    """A user predicate, already an index expression over i (= q), j (= k) and N."""

    cond: Expr
    layout: Grid | None = None
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class Blockwise:
    block: Expr
    inner: Pattern
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class TopK:
    count: int | Expr  # an Expr only when it depends on N
    block: int
    given: bool = False
    span: Span | None = _span
    fraction: float | None = None  # keep ceil(fraction * candidates) blocks instead of `count`
    score: str = "mean"  # the scoring rule: mean, max, quest or compressed (given: the caller's)
    share: bool = False  # share=kv: one selection per KV head, from its query heads' summed scores
    key_block: int | None = None  # block=(queries, keys): key blocks of their own size (None: `block`)


@dataclass(frozen=True, slots=True)
class Threshold:
    mass: float
    block: int
    span: Span | None = _span
    key_block: int | None = None  # block=(queries, keys): key blocks of their own size (None: `block`)


@dataclass(frozen=True, slots=True)
class Vertical:
    """`vertical(n, last=r)`: the n key columns of highest column score, one choice per (batch, head) for
    every query (MInference's vertical lines). The score and the tie rule: docs/language.md."""

    count: int
    last: int
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class Slash:
    """`slash(n, last=r)`: the n diagonals (offsets i - j in [0, N)) of highest slash score, one choice per
    (batch, head) for every query (MInference's slash lines)."""

    count: int
    last: int
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class Union:
    a: Pattern
    b: Pattern


@dataclass(frozen=True, slots=True)
class Inter:
    a: Pattern
    b: Pattern


@dataclass(frozen=True, slots=True)
class Complement:
    a: Pattern


Pattern: TypeAlias = (
    Full
    | Empty
    | Causal
    | Window
    | Stride
    | Sink
    | Global
    | Rows
    | Cols
    | Hops
    | Random
    | Neighborhood
    | Where
    | Blockwise
    | TopK
    | Threshold
    | Vertical
    | Slash
    | Union
    | Inter
    | Complement
)

Selector: TypeAlias = TopK | Threshold
TokenSelector: TypeAlias = Vertical | Slash  # token-level: key columns and diagonals, not blocks


@dataclass(frozen=True, slots=True)
class HeadRange:
    start: int
    stop: int
    pattern: Pattern


@dataclass(frozen=True, slots=True)
class Heads:
    """MoA-style: head h uses the pattern of the one range that holds it; ranges tile [0, count)."""

    ranges: tuple[HeadRange, ...]

    @property
    def count(self) -> int:
        return self.ranges[-1].stop

    def pattern_for(self, head: int) -> Pattern:
        for r in self.ranges:
            if r.start <= head < r.stop:
                return r.pattern
        raise IndexError(head)


Body: TypeAlias = Pattern | Heads


@dataclass(frozen=True, slots=True)
class Permute:
    """`permute(P, segment=s, by=given)`: the caller passes a permutation of each segment of `s` tokens at run
    time and the body is the pattern in the permuted order (docs/language.md, permuted tokens)."""

    segment: int
    span: Span | None = _span


@dataclass(frozen=True, slots=True)
class PatternDef:
    name: str
    body: Body
    span: Span | None = _span
    permute: Permute | None = None  # the body applies to tokens permuted within segments at run time


@dataclass(frozen=True, slots=True)
class Model:
    """A layer schedule, resolved: `schedule[l]` is the body layer l runs."""

    name: str
    schedule: tuple[Body, ...]
    span: Span | None = _span

    @property
    def layers(self) -> int:
        return len(self.schedule)

    def distinct(self) -> tuple[Body, ...]:
        """Distinct bodies in first-use order: a model compiles to one kernel per entry here."""
        seen: list[Body] = []
        for body in self.schedule:
            if body not in seen:
                seen.append(body)
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class Program:
    """One checked `.pat` file."""

    path: str
    params: tuple[tuple[str, int | float], ...]
    layouts: tuple[Grid, ...]
    patterns: tuple[PatternDef, ...]
    models: tuple[Model, ...]

    def names(self) -> list[str]:
        return [p.name for p in self.patterns] + [m.name for m in self.models]

    def get(self, name: str) -> PatternDef | Model | None:
        items: tuple[PatternDef | Model, ...] = (*self.patterns, *self.models)
        for item in items:
            if item.name == name:
                return item
        return None


def children(p: Pattern) -> tuple[Pattern, ...]:
    match p:
        case Union(a, b) | Inter(a, b):
            return (a, b)
        case Complement(a) | Blockwise(_, a):
            return (a,)
    return ()


def walk(p: Pattern) -> list[Pattern]:
    """Every node of a pattern, parents first."""
    out = [p]
    for c in children(p):
        out.extend(walk(c))
    return out


def is_pattern(x: object) -> bool:
    """x is a pattern node (as `patterndsl.pattern()` returns), not a heads body, a program or text."""
    return isinstance(
        x,
        Full | Empty | Causal | Window | Stride | Sink | Global | Rows | Cols | Hops | Random | Neighborhood | Where
        | Blockwise | TopK | Threshold | Vertical | Slash | Union | Inter | Complement,
    )


def is_dynamic(p: Pattern) -> bool:
    """True when the pattern needs q and k at run time (it holds a selector)."""
    return any(isinstance(n, TopK | Threshold | Vertical | Slash) for n in walk(p))


def token_selectors(p: Pattern) -> tuple[TokenSelector, ...]:
    """The pattern's token-level selectors (vertical, slash) in source order, each once."""
    return tuple(dict.fromkeys(n for n in walk(p) if isinstance(n, Vertical | Slash)))


def body_patterns(body: Body) -> tuple[Pattern, ...]:
    return tuple(r.pattern for r in body.ranges) if isinstance(body, Heads) else (body,)
