"""Hypothesis strategies shared by the test modules: source text the language accepts, and packed-document
lengths.

`expressions` draws static set expressions valid at every N in 1..MAX_N (the language, block-table, kernel
and varlen tests draw from it); `neighborhoods` and `layout_wheres` draw programs over a grid layout;
`analysis_patterns` draws the nested patterns the analyser's exact counts are held to; `document_splits`
draws the lengths of packed documents; `token_picks` draws a token-selector pattern's columns and offsets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

MAX_N = 48
lengths = st.integers(min_value=1, max_value=MAX_N)
small = st.integers(min_value=0, max_value=12)
positive = st.integers(min_value=1, max_value=6)
signed = st.integers(min_value=-MAX_N - 8, max_value=MAX_N + 8)


# --- strategies: source text of static patterns, valid at every N in 1..MAX_N -------------------


def _window() -> st.SearchStrategy[str]:
    return st.one_of(
        small.map(lambda r: f"window({r})"),
        st.tuples(small, small).map(lambda ab: f"window({ab[0]}, {ab[1]})"),
        st.tuples(small, small).map(lambda ab: f"window(before={ab[0]}, after={ab[1]})"),
        st.tuples(small, positive).map(lambda rd: f"window({rd[0]}, dilation={rd[1]})"),
        st.tuples(small, small, positive).map(lambda t: f"window({t[0]}, {t[1]}, dilation={t[2]})"),
        st.just("window(N // 4)"),
        st.just("window(N // 8, 1, dilation=N // 16 + 1)"),
    )


def _token_set() -> st.SearchStrategy[str]:
    bound = st.one_of(st.none(), signed.map(str), st.sampled_from(["N // 2", "-N // 3", "N - 1"]))
    slices = st.tuples(bound, bound, st.one_of(st.none(), positive)).map(
        lambda t: f"{t[0] or ''}:{t[1] or ''}" + ("" if t[2] is None else f":{t[2]}")
    )
    lists = st.lists(signed, min_size=0, max_size=5).map(lambda xs: "[" + ", ".join(map(str, xs)) + "]")
    return st.one_of(slices, lists, signed.map(str))


def conditions() -> st.SearchStrategy[str]:
    """A where(...) condition over q, k, N."""
    leaves = st.one_of(st.sampled_from(["q", "k", "N"]), st.integers(-10, 40).map(str))
    terms = st.recursive(
        leaves,
        lambda t: st.one_of(
            st.tuples(t, st.sampled_from(["+", "-"]), t).map(lambda x: f"({x[0]} {x[1]} {x[2]})"),
            st.tuples(t, st.integers(-3, 3)).map(lambda x: f"({x[0]} * {x[1]})"),
            st.tuples(t, st.sampled_from(["//", "%"]), st.sampled_from(["1", "2", "3", "7", "(N // 4 + 1)"])).map(
                lambda x: f"({x[0]} {x[1]} {x[2]})"
            ),
            t.map(lambda x: f"abs({x})"),
            t.map(lambda x: f"log2({x})"),
            st.tuples(st.sampled_from(["min", "max"]), t, t).map(lambda x: f"{x[0]}({x[1]}, {x[2]})"),
        ),
        max_leaves=4,
    )
    ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
    comparisons = st.one_of(
        st.tuples(terms, ops, terms).map(lambda x: f"{x[0]} {x[1]} {x[2]}"),
        st.tuples(terms, ops, terms, ops, terms).map(lambda x: " ".join(x)),  # chained, as in Python
    )
    return st.recursive(
        comparisons,
        lambda c: st.one_of(
            st.tuples(c, st.sampled_from(["and", "or"]), c).map(lambda x: f"({x[0]}) {x[1]} ({x[2]})"),
            c.map(lambda x: f"not ({x})"),
        ),
        max_leaves=3,
    )


PRIMITIVES: dict[str, st.SearchStrategy[str]] = {
    "full": st.just("full"),
    "none": st.just("none"),
    "causal": st.just("causal"),
    "window": _window(),
    "stride": st.one_of(positive.map(lambda s: f"stride({s})"), st.just("stride(N // 5 + 1)")),
    "sink": st.one_of(small.map(lambda s: f"sink({s})"), st.just("sink(N // 2)")),
    "global": _token_set().map(lambda s: f"global({s})"),
    "rows": _token_set().map(lambda s: f"rows({s})"),
    "cols": _token_set().map(lambda s: f"cols({s})"),
    "hops": st.one_of(
        st.just("hops()"),
        st.integers(2, 4).map(lambda b: f"hops({b})"),
        st.integers(2, 4).map(lambda b: f"hops(base={b})"),
    ),  # fmt: skip
    "where": conditions().map(lambda c: f"where({c})"),
    "random": st.one_of(
        st.tuples(small, st.integers(0, 5)).map(lambda t: f"random({t[0]}, seed={t[1]})"),
        small.map(lambda r: f"random({r})"),
        st.just("random(N // 3, seed=2)"),
    ),
}
_FLAT = st.one_of(*PRIMITIVES.values())
PRIMITIVES["blockwise"] = st.tuples(
    st.one_of(positive, st.just("N // 8 + 1")),
    st.recursive(_FLAT, lambda p: st.tuples(p, st.sampled_from(["|", "&", "-"]), p).map(lambda x: f"({x[0]}) {x[1]} ({x[2]})"),
                 max_leaves=3),
).map(lambda t: f"blockwise({t[0]}, {t[1]})")  # fmt: skip
ATOMS = st.one_of(*PRIMITIVES.values())


# Expression trees: ("atom", text) | ("~", tree) | (op, tree, tree). Rendered with the fewest
# parentheses Python's precedence allows (or, at random, more), evaluated by numpy on reference masks.
_PREC = {"|": 1, "&": 2, "-": 3, "~": 4, "atom": 5}


def trees(atoms: st.SearchStrategy[str] = ATOMS, max_leaves: int = 6) -> st.SearchStrategy[Any]:
    return st.recursive(
        atoms.map(lambda a: ("atom", a)),
        lambda t: st.one_of(t.map(lambda x: ("~", x)), st.tuples(st.sampled_from(["|", "&", "-"]), t, t)),
        max_leaves=max_leaves,
    )


def render(tree: Any, extra_parens: bool = False) -> str:
    def go(t: Any, need: int, right: bool) -> str:
        match t:
            case ("atom", text):
                prec, s = 5, text
            case ("~", x):
                prec, s = 4, "~" + go(x, 4, False)
            case (op, a, b):
                prec = _PREC[op]
                s = f"{go(a, prec, False)} {op} {go(b, prec, True)}"
        tight = prec > need or (prec == need and not right and prec != 4)
        return s if tight and not (extra_parens and prec < 5) else f"({s})"

    return go(tree, 0, False)


def expressions(max_leaves: int = 4) -> st.SearchStrategy[str]:
    return st.tuples(trees(max_leaves=max_leaves), st.booleans()).map(lambda t: render(*t))


# --- layouts: neighborhoods and where over coordinates -------------------------------------------


@st.composite
def grids(draw: st.DrawFn) -> tuple[int, ...]:
    ndim = draw(st.integers(1, 3))
    top = {1: 40, 2: 7, 3: 4}[ndim]
    return tuple(draw(st.integers(1, top)) for _ in range(ndim))


@st.composite
def layout_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int]:
    """(dims, prefix, suffix): a grid of 1-3 axes or a tile-major one of 4-6 short axes, with extra tokens
    before and after it half of the time."""
    dims = draw(st.one_of(grids(), st.lists(st.integers(1, 2), min_size=4, max_size=6).map(tuple)))
    prefix, suffix = draw(st.sampled_from([(0, 0), (0, 0), (3, 0), (0, 2), (1, 4)]))
    return dims, prefix, suffix


def layout_statement(dims: tuple[int, ...], prefix: int, suffix: int) -> str:
    extra = (f", prefix={prefix}" if prefix else "") + (f", suffix={suffix}" if suffix else "")
    return f"layout g = grid({', '.join(map(str, dims))}{extra})"


def axis_values(values: list[Any], draw: st.DrawFn) -> str:
    def lit(v: Any) -> str:
        return str(v).lower()

    if len(set(values)) == 1 and draw(st.booleans()):
        return lit(values[0])
    return "(" + ", ".join(lit(v) for v in values) + ("," if len(values) == 1 else "") + ")"


@st.composite
def neighborhoods(draw: st.DrawFn) -> tuple[str, int]:
    dims, prefix, suffix = draw(layout_shapes())
    dil, ker, strd, caus = [], [], [], []
    for n in dims:
        d = draw(st.integers(1, max(1, min(n, 4))))
        c = draw(st.booleans())
        k = draw(st.integers(1, 6)) if c else draw(st.integers(1, max(1, n // d)))
        dil.append(d), ker.append(k), strd.append(draw(st.integers(1, 4))), caus.append(c)
    src = f"neighborhood(g, kernel={axis_values(ker, draw)}"
    if draw(st.booleans()) or any(d > 1 for d in dil):
        src += f", dilation={axis_values(dil, draw)}"
    if draw(st.booleans()) or any(s > 1 for s in strd):
        src += f", stride={axis_values(strd, draw)}"
    if draw(st.booleans()) or any(caus):
        src += f", causal={axis_values(caus, draw)}"
    src += ")"
    if prefix or suffix:
        src += draw(st.sampled_from(["", " | global(g.prefix)", " | cols(g.suffix)", " | rows(g.prefix) - causal"]))
    return f"{layout_statement(dims, prefix, suffix)}\npattern p = {src}\n", int(np.prod(dims)) + prefix + suffix


@st.composite
def layout_wheres(draw: st.DrawFn) -> tuple[str, int]:
    dims, prefix, suffix = draw(layout_shapes())
    names = [f"{side}c{a}" for a in range(len(dims)) for side in "qk"] + ["q", "k"]
    term = st.one_of(st.sampled_from(names), st.integers(0, 5).map(str))
    diff = st.tuples(term, term).map(lambda t: f"abs({t[0]} - {t[1]})")
    cmp = st.tuples(st.one_of(term, diff), st.sampled_from(["<=", "==", ">", "!="]), st.integers(0, 4)).map(
        lambda t: f"{t[0]} {t[1]} {t[2]}"
    )
    cond = draw(st.lists(cmp, min_size=1, max_size=3).map(lambda cs: " and ".join(cs)))
    extra = draw(st.sampled_from(["", " | causal", " & window(3)", " - sink(2)"]))
    n = int(np.prod(dims)) + prefix + suffix
    return f"{layout_statement(dims, prefix, suffix)}\npattern p = where(g, {cond}){extra}\n", n


# --- patterns for the analyser's counts: nested set operations and blockwise over a fixed set of atoms --------

ANALYSIS_ATOMS = st.sampled_from(
    [
        "full", "none", "causal", "window(2)", "window(1, 3)", "window(2, dilation=3)", "window(0, 2, dilation=2)",
        "stride(3)", "sink(2)", "global(0:2)", "global([1, -1])", "rows(1:7:3)", "cols(-3:)", "hops(2)", "hops(3)",
        "random(2, seed=1)", "where(q // 3 == k // 2)", "where((q + k) % 4 == 0)",
    ]
)  # fmt: skip


@st.composite
def analysis_patterns(draw: st.DrawFn, depth: int = 2) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(ANALYSIS_ATOMS)
    kind = draw(st.sampled_from(["|", "&", "-", "~", "blockwise"]))
    a = draw(analysis_patterns(depth - 1))
    if kind == "~":
        return f"~({a})"
    if kind == "blockwise":
        return f"blockwise({draw(st.integers(2, 5))}, {a})"
    return f"({a}) {kind} ({draw(analysis_patterns(depth - 1))})"


# --- packed documents: lengths of 1 to 6 documents (empty and one-token documents included), 1 to 110 tokens ---

document_splits = st.lists(st.one_of(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=6).filter(
    lambda xs: 0 < sum(xs) <= 110
)


# --- decoding: patterns whose retained keys (analysis.retention) are exact -----------------------------------

_reach = st.integers(0, 6)
_EXACT_RETENTION_ATOMS = st.one_of(
    st.tuples(_reach, _reach, st.integers(1, 2)).map(lambda t: f"window({t[0]}, {t[1]}, dilation={t[2]})"),
    _reach.map(lambda r: f"window({r})"),
    small.map(lambda s: f"sink({s})"),
    st.tuples(small, st.integers(1, 6)).map(lambda t: f"cols({t[0]}:{t[0] + t[1]})"),
    st.tuples(small, st.integers(1, 6)).map(lambda t: f"global({t[0]}:{t[0] + t[1]})"),
    st.lists(small, min_size=1, max_size=3).map(lambda xs: f"rows([{', '.join(map(str, xs))}])"),
    st.just("causal"),
)


@st.composite
def exact_retention_patterns(draw: st.DrawFn) -> str:
    """Decode-consistent patterns whose retained-key closed form is exact: unions of windows, sinks, key and
    row ranges under `causal &`, and blockwise of those."""
    terms = draw(st.lists(_EXACT_RETENTION_ATOMS.filter(lambda a: a != "causal"), min_size=1, max_size=3))
    body = " | ".join(terms)
    src = f"causal & ({body})" if draw(st.booleans()) else body
    if draw(st.integers(0, 3)) == 0:
        src = f"blockwise({draw(st.integers(2, 3))}, {src})"
    return src


@st.composite
def decode_steps(draw: st.DrawFn, patterns: list[str], longest: int, pages: list[int | None]) -> dict[str, Any]:
    """One decode step's arguments: a pattern, Nq rows (of which n_new are appended first), per-sequence
    final lengths of at least Nq, KV heads, a GQA group, a page size (None: contiguous) and a seed."""
    nq = draw(st.integers(1, 4 if longest < 48 else 5))
    return dict(src=draw(st.sampled_from(patterns)), nq=nq, n_new=draw(st.integers(0, nq)),
                lengths=draw(st.lists(st.integers(nq, longest), min_size=1, max_size=3 if longest < 48 else 2)),
                hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 3])),
                page=draw(st.sampled_from(pages)), seed=draw(st.integers(0, 2**16)))


@st.composite
def token_picks(draw: st.DrawFn, max_n: int = 200, heads: int = 2) -> tuple[int, list[list[int]], list[list[int]]]:
    """(n, columns, offsets): per head an ascending set of key columns and one of diagonal offsets in
    [0, n), as many per head (a token-selector pattern's picks, here arbitrary rather than scored)."""
    n = draw(st.integers(1, max_n))

    def sets() -> list[list[int]]:
        count = draw(st.integers(0, min(n, 12)))
        one = st.lists(st.integers(0, n - 1), min_size=count, max_size=count, unique=True).map(sorted)
        return [draw(one) for _ in range(heads)]

    return n, sets(), sets()
