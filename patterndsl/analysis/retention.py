"""What decoding may keep: whether a pattern is decode-consistent, and which cached keys stay reachable.

Decoding grows the sequence one step at a time, so a row computed when the sequence was n tokens long
must mean the same row at every later length. A pattern is *decode-consistent* when `allowed(i, j)`
does not depend on N (for i, j < N): no argument sized with N, no token set counted from the end, no
layout (it fixes N), no `random` (its draw depends on N), no `where` that reads N. The walk below
reads that off the IR, construct by construct, and names the first construct that reads N.

For such a pattern, after n tokens the next query is i = n, and a cached key j < n can still be read
iff some future query i >= n allows it. `retention` derives that set in closed form from each
construct's meaning, as a union of `Term`s: a fixed key range (sinks, `cols`), a tail that follows the
next query (windows: the keys j >= n - before * dilation, aligned to blocks under `blockwise`), and
how long a row condition (`rows`, `global`) still has a future query. Unions are exact, intersections
intersect the terms (exact when the two sides constrain different things, e.g. `causal & window`,
otherwise a superset), and anything else (`hops`, `stride`, `where`, complements, selectors) keeps
every key: a superset is always safe, since evicting less never changes an output. Nothing here grows
with n: the terms are built once, and evaluating them at n costs O(terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import expr as E
from .. import ir

# --- decode consistency --------------------------------------------------------------------------


def decode_consistent(x: ir.Body | ir.PatternDef | ir.Model) -> tuple[bool, str | None]:
    """(True, None) when every row's allowed keys are the same at every length N, else (False, why):
    `why` is one sentence naming the construct that reads N."""
    why = _body_reads_n(x)
    return why is None, why


def inconsistent_patterns(program: ir.Program) -> list[tuple[str, str]]:
    """(name, why) for each pattern and model of a program that is not decode-consistent."""
    out = []
    items: tuple[ir.PatternDef | ir.Model, ...] = (*program.patterns, *program.models)
    for item in items:
        why = _body_reads_n(item)
        if why is not None:
            out.append((item.name, why))
    return out


def _body_reads_n(x: ir.Body | ir.PatternDef | ir.Model) -> str | None:
    match x:
        case ir.PatternDef(_, body):
            return _body_reads_n(body)
        case ir.Model(_, schedule):
            for layer, body in enumerate(schedule):
                why = _body_reads_n(body)
                if why is not None:
                    return f"layer {layer}: {why}"
            return None
        case ir.Heads(ranges):
            for r in ranges:
                why = pattern_reads_n(r.pattern)
                if why is not None:
                    return f"heads {r.start}:{r.stop}: {why}"
            return None
    return pattern_reads_n(x)


def pattern_reads_n(p: ir.Pattern) -> str | None:
    """Why `allowed(i, j)` of p depends on N, or None when it does not (the sentence the runtime's decode
    refuses with: compiled modules carry it per head pattern, `PatternSpec.decode`)."""
    from .analyze import _pattern_text

    def sized(*args: E.Expr) -> str | None:
        if any("N" in E.free_vars(a) for a in args):
            return f"{_pattern_text(p)} is sized with N, so its rows change as the sequence grows"
        return None

    match p:
        case ir.Window(before, after, dilation):
            return sized(before, after, dilation)
        case ir.Stride(step):
            return sized(step)
        case ir.Sink(count):
            return sized(count)
        case ir.Global(tokens) | ir.Rows(tokens) | ir.Cols(tokens):
            if _tokens_read_n(tokens):
                return (
                    f"{_pattern_text(p)} names tokens counted from the end or sized with N, "
                    "so its tokens move as the sequence grows"
                )
            return None
        case ir.Random():
            return f"{_pattern_text(p)} draws each row's keys from N, so a longer sequence draws other keys"
        case ir.Neighborhood(layout) | ir.Where(_, layout) if layout is not None:
            return (
                f"{_pattern_text(p)} uses layout {layout.name}, which fixes N = {layout.size}, "
                "so a shorter prefix is not a sequence it describes"
            )
        case ir.Where(cond):
            if "N" in E.free_vars(cond):
                return f"{_pattern_text(p)} reads N, so its rows change as the sequence grows"
            return None
        case ir.Blockwise(block, inner):
            return sized(block) or pattern_reads_n(inner)
        case ir.Union(a, b) | ir.Inter(a, b):
            return pattern_reads_n(a) or pattern_reads_n(b)
        case ir.Complement(a):
            return pattern_reads_n(a)
    return None  # full, none, causal, hops, topk, threshold: nothing of N


def _tokens_read_n(tokens: ir.TokenSet) -> bool:
    """A token set reads N when a bound mentions N or is negative (counted from the end); nonnegative
    constant bounds only clip at N, which changes nothing for tokens below N."""
    match tokens:
        case ir.TokenSlice(start, stop, step):
            bounds = [b for b in (start, stop) if b is not None]
            return "N" in E.free_vars(step) or any(_from_end(b) for b in bounds)
        case ir.TokenList(items):
            return any(_from_end(x) for x in items)
    return True


def _from_end(x: E.Expr) -> bool:
    return not isinstance(x, E.Const) or int(x.value) < 0


# --- retention -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tail:
    """Keys j >= align * (m // align) - width, where m is the next query: a window behind the next query,
    on a grid of `align` tokens under blockwise."""

    width: int
    align: int = 1

    def bound(self, m: int) -> int:
        return self.align * (m // self.align) - self.width


@dataclass(frozen=True, slots=True)
class Term:
    """Keys j with lo <= j < hi (hi None: no end) above every tail's bound, while the next query m is at
    most `until` (None: always). `Term()` is every key."""

    lo: int = 0
    hi: int | None = None
    tails: tuple[Tail, ...] = ()
    until: int | None = None

    def interval(self, m: int, n: int) -> tuple[int, int]:
        """The term's keys among [0, n) when the next query is m, as [a, b) (empty when a >= b)."""
        if self.until is not None and m > self.until:
            return 0, 0
        a = max([0, self.lo, *(t.bound(m) for t in self.tails)])
        b = n if self.hi is None else min(n, self.hi)
        return a, b

    def span(self) -> int | None:
        """At most this many consecutive positions are ever in the term (None: unbounded)."""
        spans = [t.width + t.align - 1 for t in self.tails]
        ends = [e for e in (self.hi, self.until) if e is not None]
        if ends:
            spans.append(min(ends) - self.lo)
        return max(0, min(spans)) if spans else None

    def text(self) -> str:
        parts = []
        if self.hi is not None and self.hi - self.lo == 1:
            parts.append(f"key {self.lo}")
        elif self.hi is not None:
            parts.append(f"keys {self.lo}..{self.hi - 1}" if self.lo else f"the first {self.hi}")
        elif self.lo:
            parts.append(f"keys from {self.lo}")
        for t in self.tails:
            if t.align == 1:
                parts.append(f"the last {t.width}")
            else:
                parts.append(f"the current block of {t.align} and the {t.width} keys before it")
        if not parts:
            parts.append("all")
        text = " and ".join(parts) + (f" while the next query is <= {self.until}" if self.until is not None else "")
        return text


EVERYTHING = (Term(),)


@dataclass(frozen=True, slots=True)
class Retention:
    """The cached keys a future query can still reach, as a union of terms (a superset where not exact)."""

    terms: tuple[Term, ...]
    why_all: str | None = field(default=None, compare=False)

    @property
    def keeps_all(self) -> bool:
        return any(t == Term() for t in self.terms)

    def intervals(self, n: int) -> list[tuple[int, int]]:
        """After n tokens (the next query is n): the retained keys of [0, n), as sorted disjoint [a, b)."""
        return merge_intervals([t.interval(n, n) for t in self.terms])

    def count(self, n: int) -> int:
        return sum(b - a for a, b in self.intervals(n))

    def pages(self, n: int, page_size: int) -> list[tuple[int, int]]:
        """The pages of `page_size` tokens holding a retained key after n tokens, as [first, stop)."""
        return merge_intervals([(a // page_size, -(-b // page_size)) for a, b in self.intervals(n)])

    def max_pages(self, page_size: int, append: int) -> int | None:
        """How many pages a cache may hold at once (the retained keys of every length plus an append of
        up to `append` tokens), or None when that grows with the context."""
        total = -(-append // page_size) + 1
        for t in self.terms:
            span = t.span()
            if span is None:
                return None
            ends = [e for e in (t.hi, t.until) if e is not None]
            if not t.tails and ends:  # a fixed range: exactly the pages it covers
                total += max(0, -(-min(ends) // page_size) - t.lo // page_size)
            elif span:  # a range that moves: it may straddle one page more
                total += -(-span // page_size) + 1
        return total

    def alignment(self) -> int:
        """The block grid the retained keys follow (1 without blockwise)."""
        return math.lcm(1, *(tail.align for t in self.terms for tail in t.tails))

    def page_size(self, near: int = 64) -> int:
        """A cache page's default size: whole blocks of the pattern's grid (blockwise), about `near` tokens,
        so a page is retained or evicted with its block (PatternKVCache's pages, `--decode`'s figures)."""
        a = self.alignment()
        return a * max(1, near // a)

    def text(self) -> str:
        if not self.terms:
            return "nothing"
        if self.keeps_all:
            return "all keys" + (f" ({self.why_all})" if self.why_all else "")
        return "; ".join(t.text() for t in sorted(self.terms, key=lambda t: (t.hi is None, t.lo)))


def retention(body: ir.Body) -> Retention:
    """The retained-key set of a decode-consistent pattern (a heads body: the union over its heads)."""
    why = _body_reads_n(body)
    if why is not None:
        raise ValueError(f"no retention for a pattern that is not decode-consistent: {why}")
    terms: tuple[Term, ...] = ()
    for p in ir.body_patterns(body):
        terms = _union(terms, _reach(p))
    reason = None
    if any(t == Term() for t in terms):
        reason = _why_all(body)
    return Retention(terms, reason)


def _why_all(body: ir.Body) -> str | None:
    from .analyze import _pattern_text

    for p in ir.body_patterns(body):
        for node in ir.walk(p):
            if isinstance(node, ir.Hops | ir.Stride):
                return f"{_pattern_text(node)} reaches every key again from a later query"
    return None


def _reach(p: ir.Pattern) -> tuple[Term, ...]:
    """Keys j (any j, in units of p's own grid) that a query i >= m allows, for every m at once."""
    match p:
        case ir.Empty():
            return ()
        case ir.Window(before, after, dilation):
            a, b, d = (E.evaluate_int(x) for x in (before, after, dilation))
            if -b * d > a * d:
                return ()
            return (Term(tails=(Tail(a * d),)),)  # i - j can reach a * d: every j >= m - a * d
        case ir.Sink(count):
            c = E.evaluate_int(count)
            return (Term(hi=c),) if c > 0 else ()
        case ir.Cols(tokens):
            return _key_terms(tokens)
        case ir.Rows(tokens):
            return _row_terms(tokens)
        case ir.Global(tokens):
            return _union(_row_terms(tokens), _key_terms(tokens))
        case ir.Blockwise(block, inner):
            b = E.evaluate_int(block)
            return tuple(_scale(t, b) for t in _reach(inner))
        case ir.Union(a, c):
            return _union(_reach(a), _reach(c))
        case ir.Inter(a, c):
            return _union(*((_intersect(x, y),) for x in _reach(a) for y in _reach(c)))
    # full, causal, stride, hops (a query far enough ahead reaches any key), where, complements and
    # selectors (the data may pick any block): every key.
    return EVERYTHING


def _key_terms(tokens: ir.TokenSet) -> tuple[Term, ...]:
    match tokens:
        case ir.TokenList(items):
            return tuple(Term(lo=v, hi=v + 1) for v in sorted({E.evaluate_int(x) for x in items}))
        case ir.TokenSlice(start, stop, _):
            lo = 0 if start is None else E.evaluate_int(start)
            hi = None if stop is None else E.evaluate_int(stop)
            return () if hi is not None and hi <= lo else (Term(lo=lo, hi=hi),)
    return EVERYTHING


def _row_terms(tokens: ir.TokenSet) -> tuple[Term, ...]:
    """A row condition reaches every key while one of its rows is still ahead: until its last row."""
    match tokens:
        case ir.TokenList(items):
            return (Term(until=max(E.evaluate_int(x) for x in items)),) if items else ()
        case ir.TokenSlice(start, stop, step):
            if stop is None:
                return EVERYTHING
            lo = 0 if start is None else E.evaluate_int(start)
            hi, c = E.evaluate_int(stop), E.evaluate_int(step)
            return (Term(until=lo + (hi - 1 - lo) // c * c),) if hi > lo else ()
    return EVERYTHING


def _scale(t: Term, b: int) -> Term:
    """A term on block indices as a term on tokens: block J holds tokens b*J .. b*J + b - 1, and the next
    query m lies in block m // b, so a block tail bound becomes a token bound on a grid of b."""
    return Term(
        lo=b * t.lo,
        hi=None if t.hi is None else b * t.hi,
        tails=tuple(Tail(b * x.width, b * x.align) for x in t.tails),
        until=None if t.until is None else b * t.until + b - 1,
    )


def _intersect(x: Term, y: Term) -> Term:
    tails: dict[int, int] = {}
    for t in (*x.tails, *y.tails):
        tails[t.align] = min(tails.get(t.align, t.width), t.width)
    his = [h for h in (x.hi, y.hi) if h is not None]
    untils = [u for u in (x.until, y.until) if u is not None]
    return Term(
        lo=max(x.lo, y.lo),
        hi=min(his) if his else None,
        tails=tuple(Tail(w, a) for a, w in sorted(tails.items())),
        until=min(untils) if untils else None,
    )


def _union(*parts: tuple[Term, ...]) -> tuple[Term, ...]:
    out: dict[Term, None] = {}
    for part in parts:
        for t in part:
            if t == Term():
                return EVERYTHING
            if (t.hi is not None and t.hi <= max(t.lo, 0)) or (t.until is not None and t.until < 0):
                continue  # holds no key
            out[t] = None
    return tuple(out)


def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint [a, b) covering the same integers (empty intervals dropped)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(x for x in intervals if x[0] < x[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
