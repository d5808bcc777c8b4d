"""What a compiled pattern hands the runtime: its predicates, token layouts, selectors and tile tables.

A generated module builds one `PatternSpec` from literals and hands it to `runtime.Attention`; nothing in
it is code except the `@triton.jit` functions (the only form in which Triton takes a predicate). The index
expressions beside them are the same predicates as data: the block tables classify tiles with them
(`patterndsl.intervals`), the CPU path evaluates them (`runtime.evaluate`), and the argument checks read
the pattern's requirements from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..expr import Expr

# (largest padded head_dim, value) tables: the row of the first head_dim at least as wide applies
Configs = tuple[tuple[int, tuple[int, ...]], ...]
TuneConfigs = tuple[tuple[int, tuple[tuple[int, ...], ...]], ...]


@dataclass(frozen=True)
class Predicate:
    """One `allowed(i, j)`: as an index expression over i, j, N and as its Triton rendering."""

    expr: Expr
    kernel: Any  # a @triton.jit function (i, j, N) -> bool tile

    @property
    def n_free(self) -> bool:
        """It does not read N: packed documents of every length share one block table."""
        from ..expr import free_vars

        return "N" not in free_vars(self.expr)


@dataclass(frozen=True)
class TokenLayout:
    """A pattern's token order in the kernel (patterndsl.layout): physical rows -> tokens."""

    description: str
    rows: Expr  # physical rows the kernel tiles, an expression of N
    predicate: Expr  # the pattern's predicate over physical rows (intervals classify tiles with it)
    kernel: Any  # a @triton.jit function (rows, N) -> (tokens, row holds a token)


class Selector(NamedTuple):
    """A dynamic pattern's selector: `kind` ('topk', 'fraction' or 'threshold'), its count (an int, or an
    expression of N), fraction of the candidates or mass, its block, whether
    the caller gives the scores, and which predicates mask the selected blocks (`selected`) and bound the
    candidates (`context`), as indices into `PatternSpec.predicates`.

    A pattern with several selectors lists the others in `more` (their `selected` is -1) and, in
    `variants`, the predicate of each selection case v = 1 .. 2**k - 1 (bit m: selector m picked the
    block; -1: the case allows nothing). Where the cases' predicates differ, `dispatch` is the
    @triton.jit `(i, j, N, var)` that applies the one of rank `var` among them (ascending index)."""

    kind: str
    param: int | float | Expr
    block: int
    given: bool
    selected: int
    context: int
    more: tuple[Selector, ...] = ()
    variants: tuple[int, ...] = ()
    dispatch: Any = None
    score: str = "mean"  # the scoring rule (topk): mean, max, quest or compressed
    share: bool = False  # one selection per KV head, from the summed scores of its query heads
    key_block: int = 0  # key blocks of their own size (block=(queries, keys)); 0: `block`

    @property
    def kblock(self) -> int:
        """The key block's size (`block` is the query block's)."""
        return self.key_block or self.block

    @property
    def all(self) -> tuple[Selector, ...]:
        """The pattern's selectors, this one first."""
        return (self, *self.more)

    @property
    def cases(self) -> tuple[int, ...]:
        """Per selection case v = 1 .. 2**k - 1, the predicate index of P_v (-1: allows nothing)."""
        return self.variants or (self.selected,)


class TokenSelection(NamedTuple):
    """A pattern's token-level selectors (patterndsl.selectors.TokenSplit): `vertical` keeps that many key
    columns and `slash` that many diagonals (0: absent), each scored from its last `last_*` query rows
    where its context (a predicate index) allows the pair. `cases[v]` is the predicate index of P_v,
    v = [j in V] + 2 [i - j in S] (cases[0] is the pattern's own: the static part; -1 allows nothing), and
    `dispatch` the @triton.jit `(i, j, N, v)` that applies P_v with v a tile of cases."""

    vertical: int
    slash: int
    last_vertical: int
    last_slash: int
    cases: tuple[int, int, int, int]
    contexts: tuple[int, int]
    dispatch: Any


class Requirement(NamedTuple):
    """`value(N) >= minimum` (or `== minimum` when `exact`) must hold for the pattern to run at N."""

    value: Expr
    minimum: int
    message: str
    exact: bool = False


@dataclass(frozen=True)
class PatternSpec:
    """Everything pattern-dependent. Predicates 0 .. patterns - 1 are the head patterns' (static parts);
    the rest serve selectors. `key` names the spec in caches, the autotuning file and the custom op's
    registry: a hash of the generated module's content."""

    name: str
    kind: str  # "pattern" or "model"
    key: str
    source: str
    predicates: tuple[Predicate, ...]
    patterns: int
    head_pattern: tuple[int, ...] | None
    model_layers: tuple[int | tuple[int, ...], ...] | None
    layouts: tuple[TokenLayout | None, ...]
    selectors: tuple[Selector | None, ...]
    requirements: tuple[Requirement, ...]
    decode: tuple[str | None, ...]  # per head pattern: None when decode-consistent, else why not
    max_n: int
    idx64: bool
    configs: Configs
    tune_configs: TuneConfigs
    bwd_configs: Configs
    bwd_tma_configs: Configs
    bwd_tune_configs: TuneConfigs
    autotune: bool = True
    bwd_autotune: bool = True
    permute: int | None = None  # permute(..., segment=s, by=given): s; each call passes the permutation
    tokens: tuple[TokenSelection | None, ...] = ()  # per head pattern: its vertical/slash selection, if any

    def token_selection(self, pat: int) -> TokenSelection | None:
        """Pattern `pat`'s vertical/slash selection (None: it has none)."""
        return self.tokens[pat] if pat < len(self.tokens) else None

    @property
    def n_free(self) -> tuple[bool, ...]:
        return tuple(p.n_free for p in self.predicates)

    @property
    def heads(self) -> int | None:
        """The head count a `heads { }` pattern requires (None: any)."""
        return None if self.head_pattern is None else len(self.head_pattern)
