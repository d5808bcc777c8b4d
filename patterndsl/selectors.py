"""Dynamic selectors (`topk`, `threshold`) split into the static patterns that surround them.

LANGUAGE.md: a selector picks key blocks of `b` tokens per query block from the data; inside an
intersection `A & sel` it picks only among key blocks where `A` allows at least one pair, and `A` still
applies token by token. A pattern may hold any number of selectors combined by the set algebra like any
other term (`|`, `&`, `-`, `~`). Once the data has been seen, each selector `S_m` is a block mask, so a
pattern with selectors `S_1 .. S_k` of one block size `b` means, by Shannon's expansion,

    allowed(i, j) = P_v(i, j),  v = the set of selectors that picked block (i // b, j // b)

with `P_v` the pattern where the selectors in `v` are `full` and the others `none`. `P_0` (nothing picked)
is the static part. A kernel tile lies inside one block, so it is classified with the `P_v` of its block:
the tables hold the static part's tiles where no selector picked the block and `P_v`'s where some did.

The candidates a selector picks among are the key blocks where its context allows at least one pair: the
intersection of every static operand on the way from the root down to the selector (`A` of `A & ...`, `~B`
of `... - B`, `A` of `A - ...`; `full` when there is none). A selector used twice is one selection; its
candidates are the union of its contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ir

__all__ = ["Split", "TokenSplit", "split", "static_part", "token_split", "variant"]

MAX_SELECTORS = 6  # 2**6 - 1 selection cases per tile, each a predicate of the generated module


@dataclass(frozen=True, slots=True)
class Split:
    selectors: tuple[ir.TopK | ir.Threshold, ...]  # in source order, each once
    static: ir.Pattern  # P_0: every selector none
    variants: tuple[ir.Pattern, ...]  # P_v for v = 1 .. 2**k - 1 (bit m of v: selector m full)
    contexts: tuple[ir.Pattern, ...]  # where each selector may pick

    @property
    def selector(self) -> ir.TopK | ir.Threshold:
        return self.selectors[0]

    @property
    def block(self) -> int:
        return self.selectors[0].block

    @property
    def key_block(self) -> int:
        return self.selectors[0].key_block or self.selectors[0].block

    @property
    def selected(self) -> ir.Pattern:
        """P with every selector full."""
        return self.variants[-1]

    @property
    def context(self) -> ir.Pattern:
        return self.contexts[0]


def variant(p: ir.Pattern, picked: frozenset[ir.Pattern]) -> ir.Pattern:
    """The pattern where the selectors in `picked` are full and every other selector none."""
    match p:
        case ir.TopK() | ir.Threshold() | ir.Vertical() | ir.Slash():
            return ir.Full() if p in picked else ir.Empty()
        case ir.Union(a, b):
            return _simplify(ir.Union(variant(a, picked), variant(b, picked)))
        case ir.Inter(a, b):
            return _simplify(ir.Inter(variant(a, picked), variant(b, picked)))
        case ir.Complement(a):
            return _simplify(ir.Complement(variant(a, picked)))
    return p  # blockwise holds no selector (the checker refuses it there)


def _simplify(p: ir.Pattern) -> ir.Pattern:
    match p:
        case ir.Union(ir.Empty(), x) | ir.Union(x, ir.Empty()) | ir.Inter(ir.Full(), x) | ir.Inter(x, ir.Full()):
            return x
        case ir.Union(ir.Full(), _) | ir.Union(_, ir.Full()):
            return ir.Full()
        case ir.Inter(ir.Empty(), _) | ir.Inter(_, ir.Empty()):
            return ir.Empty()
        case ir.Complement(ir.Full()):
            return ir.Empty()
        case ir.Complement(ir.Empty()):
            return ir.Full()
    return p


def _contexts(p: ir.Pattern, acc: ir.Pattern, out: dict[ir.Pattern, ir.Pattern]) -> None:
    """Each selector's context: `acc` is the conjunction of the static operands above `p`."""
    match p:
        case ir.TopK() | ir.Threshold() | ir.Vertical() | ir.Slash():
            out[p] = acc if p not in out else _simplify(ir.Union(out[p], acc))
        case ir.Union(a, b):
            _contexts(a, acc, out)
            _contexts(b, acc, out)
        case ir.Inter(a, b):
            _contexts(a, acc if ir.is_dynamic(b) else _simplify(ir.Inter(acc, b)), out)
            _contexts(b, acc if ir.is_dynamic(a) else _simplify(ir.Inter(acc, a)), out)
        case ir.Complement(a):
            _contexts(a, acc, out)


def split(p: ir.Pattern, name: str = "pattern") -> Split:
    """The selectors of a dynamic pattern, its static part, its selection cases and the selectors' contexts."""
    sels = tuple(dict.fromkeys(n for n in ir.walk(p) if isinstance(n, ir.TopK | ir.Threshold)))
    if not sels:
        raise ValueError("not a dynamic pattern")
    ctx: dict[ir.Pattern, ir.Pattern] = {}
    _contexts(p, ir.Full(), ctx)
    cases = tuple(
        variant(p, frozenset(s for m, s in enumerate(sels) if v >> m & 1)) for v in range(1, 1 << len(sels))
    )
    return Split(sels, variant(p, frozenset()), cases, tuple(ctx[s] for s in sels))


@dataclass(frozen=True, slots=True)
class TokenSplit:
    """A pattern with token-level selectors (at most one `vertical` and one `slash`, no block selector).

    Once the data is seen, `vertical` is the key set V and `slash` the offset set S, so by Shannon's
    expansion `allowed(i, j) = P_v(i, j)` with `v = [j in V] + 2 [i - j in S]`: `cases[v]` is P_v (P_0
    the static part, a selector absent from the pattern never holds). Scores are taken where the selector's
    context allows the pair (the same rule as for block selectors)."""

    vertical: ir.Vertical | None
    slash: ir.Slash | None
    cases: tuple[ir.Pattern, ir.Pattern, ir.Pattern, ir.Pattern]
    contexts: tuple[ir.Pattern, ir.Pattern]  # vertical's, slash's (full where absent)

    @property
    def static(self) -> ir.Pattern:
        return self.cases[0]


def token_split(p: ir.Pattern) -> TokenSplit:
    """The static cases P_0 .. P_3 and the contexts of a pattern's vertical and slash selectors."""
    sels = ir.token_selectors(p)
    vert = next((s for s in sels if isinstance(s, ir.Vertical)), None)
    slash = next((s for s in sels if isinstance(s, ir.Slash)), None)
    if vert is None and slash is None:
        raise ValueError("no vertical or slash selector")
    ctx: dict[ir.Pattern, ir.Pattern] = {}
    _contexts(p, ir.Full(), ctx)
    on = (vert, slash)
    cases = tuple(variant(p, frozenset(s for m, s in enumerate(on) if v >> m & 1 and s is not None)) for v in range(4))
    return TokenSplit(vert, slash, cases, tuple(ctx.get(s, ir.Full()) if s is not None else ir.Full() for s in on))  # type: ignore[arg-type]


def static_part(p: ir.Pattern) -> ir.Pattern:
    """What a pattern allows whatever its selectors pick (every selector none); a static pattern itself."""
    if ir.token_selectors(p):
        return token_split(p).static
    return split(p).static if ir.is_dynamic(p) else p
