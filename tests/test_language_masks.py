"""The reference masks (`patterndsl.mask.dense_mask`) against an independent brute-force reading of
LANGUAGE.md (`tests/reference.py`), for every static primitive and for random set expressions; the set
algebra's laws; the row counts the spec implies; and `random`'s determinism.

Hypothesis draws pattern *source text*, so the parser, checker, semantics and mask are all under test.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask

import patterndsl as P
from patterndsl.mask import dense_mask
from patterndsl.semantics import random_keys

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


def _cond() -> st.SearchStrategy[str]:
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
    "where": _cond().map(lambda c: f"where({c})"),
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


def leaves(tree: Any) -> list[str]:
    match tree:
        case ("atom", text):
            return [text]
        case ("~", x):
            return leaves(x)
        case (_, a, b):
            return leaves(a) + leaves(b)
    raise TypeError(tree)


def tree_reference(tree: Any, n: int) -> np.ndarray:
    """The tree's mask from the brute-force masks of its leaves and numpy's set operations."""
    match tree:
        case ("atom", text):
            return reference_mask(P.pattern(text), n)
        case ("~", x):
            return ~tree_reference(x, n)
        case ("|", a, b):
            return tree_reference(a, n) | tree_reference(b, n)
        case ("&", a, b):
            return tree_reference(a, n) & tree_reference(b, n)
        case ("-", a, b):
            return tree_reference(a, n) & ~tree_reference(b, n)
    raise TypeError(tree)


def expressions(max_leaves: int = 4) -> st.SearchStrategy[str]:
    return st.tuples(trees(max_leaves=max_leaves), st.booleans()).map(lambda t: render(*t))


def _assert_same(src: str, n: int) -> None:
    body = P.pattern(src)
    got, want = dense_mask(body, n), reference_mask(body, n)
    assert got.shape == (n, n) and got.dtype == np.bool_
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)[:5].tolist()
        pytest.fail(f"{src} at N = {n}: mask differs from the brute force at (i, j) = {bad}")


# --- every static primitive against the brute force ----------------------------------------------


@pytest.mark.parametrize("primitive", sorted(PRIMITIVES))
@given(data=st.data(), n=lengths)
def test_primitive_mask_matches_brute_force(primitive: str, data: st.DataObject, n: int) -> None:
    _assert_same(data.draw(PRIMITIVES[primitive], label=primitive), n)


@pytest.mark.parametrize(
    "src",
    [
        "window(0)", "window(2, 0)", "window(0, 3)", "window(before=1, after=4)", "window(2, dilation=3)",
        "window(1, 2, dilation=2)", "stride(1)", "stride(7)", "sink(0)", "sink(100)",
        "global(0:3)", "global(-3:)", "global(:2)", "global(::5)", "global(-100:100:3)", "global(5:-5:2)",
        "rows([0, -1, 7, 99, -99])", "cols([])", "rows(3)", "cols(-2)", "global(N // 2:)",
        "hops(2)", "hops(3)", "hops(base=4)", "blockwise(4, window(1))", "blockwise(5, causal & hops(2))",
        "blockwise(3, blockwise(2, window(0)))", "blockwise(7, global(0:1) | random(2, seed=3))",
        "where(k % 8 >= 6)", "where(q - k < 3 and not q == 5)", "where(0 <= q - k <= 4)",
        "where(max(q, k) % 3 == min(q, k) % 3 or abs(q - k) == N // 2)", "random(0)", "random(4, seed=9)",
        "random(1000)",
    ],
)  # fmt: skip
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
def test_spelled_out_primitives_match_brute_force(src: str, n: int) -> None:
    _assert_same(src, n)


@given(cond=_cond(), n=lengths)
def test_where_condition_means_what_python_says(cond: str, n: int) -> None:
    """where(...) has Python's precedence and Python's floor // and %: Python itself is the reference."""
    code = compile(cond, "<cond>", "eval")
    expected = np.array(
        [
            [bool(eval(code, {"q": i, "k": j, "N": n, "abs": abs, "min": min, "max": max})) for j in range(n)]
            for i in range(n)
        ]
    ).reshape(n, n)
    np.testing.assert_array_equal(_m(f"where({cond})", n), expected, err_msg=cond)


# --- layouts: neighborhoods and where over coordinates -------------------------------------------


@st.composite
def grids(draw: st.DrawFn) -> tuple[int, ...]:
    ndim = draw(st.integers(1, 3))
    top = {1: 40, 2: 7, 3: 4}[ndim]
    return tuple(draw(st.integers(1, top)) for _ in range(ndim))


def _axis_values(values: list[Any], draw: st.DrawFn) -> str:
    def lit(v: Any) -> str:
        return str(v).lower()

    if len(set(values)) == 1 and draw(st.booleans()):
        return lit(values[0])
    return "(" + ", ".join(lit(v) for v in values) + ("," if len(values) == 1 else "") + ")"


@st.composite
def neighborhoods(draw: st.DrawFn) -> tuple[str, int]:
    dims = draw(grids())
    dil, ker, strd, caus = [], [], [], []
    for n in dims:
        d = draw(st.integers(1, max(1, min(n, 4))))
        c = draw(st.booleans())
        k = draw(st.integers(1, 6)) if c else draw(st.integers(1, max(1, n // d)))
        dil.append(d), ker.append(k), strd.append(draw(st.integers(1, 4))), caus.append(c)
    src = f"neighborhood(g, kernel={_axis_values(ker, draw)}"
    if draw(st.booleans()) or any(d > 1 for d in dil):
        src += f", dilation={_axis_values(dil, draw)}"
    if draw(st.booleans()) or any(s > 1 for s in strd):
        src += f", stride={_axis_values(strd, draw)}"
    if draw(st.booleans()) or any(caus):
        src += f", causal={_axis_values(caus, draw)}"
    layout = f"layout g = grid({', '.join(map(str, dims))})"
    return f"{layout}\npattern p = {src})\n", int(np.prod(dims))


def _program_pattern(text: str) -> P.ir.Pattern:
    body = P.loads(text).get("p")
    assert isinstance(body, P.ir.PatternDef) and not isinstance(body.body, P.ir.Heads)
    return body.body


@given(neighborhoods())
def test_neighborhood_mask_matches_brute_force(case: tuple[str, int]) -> None:
    text, n = case
    p = _program_pattern(text)
    np.testing.assert_array_equal(dense_mask(p, n), reference_mask(p, n), err_msg=text)


@st.composite
def layout_wheres(draw: st.DrawFn) -> tuple[str, int]:
    dims = draw(grids())
    names = [f"{side}c{a}" for a in range(len(dims)) for side in "qk"] + ["q", "k"]
    term = st.one_of(st.sampled_from(names), st.integers(0, 5).map(str))
    diff = st.tuples(term, term).map(lambda t: f"abs({t[0]} - {t[1]})")
    cmp = st.tuples(st.one_of(term, diff), st.sampled_from(["<=", "==", ">", "!="]), st.integers(0, 4)).map(
        lambda t: f"{t[0]} {t[1]} {t[2]}"
    )
    cond = draw(st.lists(cmp, min_size=1, max_size=3).map(lambda cs: " and ".join(cs)))
    extra = draw(st.sampled_from(["", " | causal", " & window(3)", " - sink(2)"]))
    return f"layout g = grid({', '.join(map(str, dims))})\npattern p = where(g, {cond}){extra}\n", int(np.prod(dims))


@given(layout_wheres())
def test_where_over_layout_coordinates_matches_brute_force(case: tuple[str, int]) -> None:
    text, n = case
    p = _program_pattern(text)
    np.testing.assert_array_equal(dense_mask(p, n), reference_mask(p, n), err_msg=text)


def test_spec_neighborhood_examples_match_brute_force_on_small_grids() -> None:
    """The spec's NATTEN examples, with the same arguments on grids small enough for the loop."""
    cases = [
        ("grid(8, 8)", "kernel=3"), ("grid(12, 12)", "kernel=3, dilation=4"), ("grid(16, 4)", "kernel=4, stride=2"),
        ("grid(3, 4, 4)", "kernel=(2, 3, 3), causal=(true, false, false)"), ("grid(5, 9)", "kernel=(2, 4), dilation=(1, 2)"),
    ]  # fmt: skip
    for grid, args in cases:
        p = _program_pattern(f"layout g = {grid}\npattern p = neighborhood(g, {args})\n")
        n = p.layout.size  # type: ignore[union-attr]
        np.testing.assert_array_equal(dense_mask(p, n), reference_mask(p, n), err_msg=f"{grid} {args}")


# --- random expression trees ---------------------------------------------------------------------


@settings(max_examples=120)
@given(tree=trees(), extra=st.booleans(), n=lengths)
def test_expression_mask_matches_set_algebra_of_brute_force_leaves(tree: Any, extra: bool, n: int) -> None:
    """Parsing `| & - ~` and parentheses gives Python's precedence; each operator means its set operation."""
    src = render(tree, extra)
    got = dense_mask(P.pattern(src), n)
    np.testing.assert_array_equal(got, tree_reference(tree, n), err_msg=src)


@given(src=expressions(), n=lengths)
def test_expression_mask_matches_brute_force_on_the_ir(src: str, n: int) -> None:
    _assert_same(src, n)


def test_precedence_is_pythons() -> None:
    n = 12
    a, b, c = "window(1)", "causal", "sink(3)"

    def m(src: str) -> np.ndarray:
        return dense_mask(P.pattern(src), n)

    assert np.array_equal(m(f"{a} | {b} & {c}"), m(f"{a} | ({b} & {c})"))
    assert np.array_equal(m(f"{a} & {b} - {c}"), m(f"{a} & ({b} - {c})"))
    assert np.array_equal(m(f"~{a} & {b}"), m(f"(~{a}) & {b}"))
    assert np.array_equal(m(f"{a} - {b} - {c}"), m(f"({a} - {b}) - {c}"))
    assert not np.array_equal(m(f"{a} - {b} - {c}"), m(f"{a} - ({b} - {c})"))


# --- the algebra's laws --------------------------------------------------------------------------

exprs = expressions(max_leaves=3)


def _m(src: str, n: int) -> np.ndarray:
    return dense_mask(P.pattern(src), n)


@given(a=exprs, b=exprs, n=lengths)
def test_de_morgan(a: str, b: str, n: int) -> None:
    assert np.array_equal(_m(f"~(({a}) | ({b}))", n), _m(f"~({a}) & ~({b})", n))
    assert np.array_equal(_m(f"~(({a}) & ({b}))", n), _m(f"~({a}) | ~({b})", n))


@given(a=exprs, b=exprs, c=exprs, n=lengths)
def test_distributivity(a: str, b: str, c: str, n: int) -> None:
    assert np.array_equal(_m(f"({a}) & (({b}) | ({c}))", n), _m(f"(({a}) & ({b})) | (({a}) & ({c}))", n))
    assert np.array_equal(_m(f"({a}) | (({b}) & ({c}))", n), _m(f"(({a}) | ({b})) & (({a}) | ({c}))", n))


@given(a=exprs, b=exprs, n=lengths)
def test_absorption(a: str, b: str, n: int) -> None:
    assert np.array_equal(_m(f"({a}) | (({a}) & ({b}))", n), _m(a, n))
    assert np.array_equal(_m(f"({a}) & (({a}) | ({b}))", n), _m(a, n))


@given(a=exprs, b=exprs, n=lengths)
def test_difference_is_intersection_with_complement(a: str, b: str, n: int) -> None:
    assert np.array_equal(_m(f"({a}) - ({b})", n), _m(f"({a}) & ~({b})", n))
    assert np.array_equal(_m(f"~~({a})", n), _m(a, n))


# --- exact row counts ----------------------------------------------------------------------------


@given(r=st.integers(0, 60), n=st.integers(1, 200))
def test_window_row_count_matches_formula(r: int, n: int) -> None:
    """Rows far from the edges see 2r + 1 keys; the window is cut (not shifted) at the edges."""
    counts = _m(f"window({r})", n).sum(axis=1)
    i = np.arange(n)
    expected = np.minimum(i, r) + np.minimum(n - 1 - i, r) + 1
    np.testing.assert_array_equal(counts, expected)
    if n >= 2 * r + 1:
        assert counts[r] == 2 * r + 1


@given(a=st.integers(0, 20), b=st.integers(0, 20), d=st.integers(1, 5), n=st.integers(1, 120))
def test_asymmetric_dilated_window_row_count_matches_formula(a: int, b: int, d: int, n: int) -> None:
    counts = _m(f"window({a}, {b}, dilation={d})", n).sum(axis=1)
    i = np.arange(n)
    expected = np.minimum(i // d, a) + np.minimum((n - 1 - i) // d, b) + 1
    np.testing.assert_array_equal(counts, expected)


@st.composite
def noncausal_neighborhoods(draw: st.DrawFn) -> tuple[str, int, int]:
    dims = draw(grids())
    kernel, dilation, stride = [], [], []
    for n in dims:
        d = draw(st.integers(1, max(1, min(n, 3))))
        kernel.append(draw(st.integers(1, n // d)))
        dilation.append(d)
        stride.append(draw(st.integers(1, 3)))
    args = f"kernel={_axis_values(kernel, draw)}, dilation={_axis_values(dilation, draw)}, stride={_axis_values(stride, draw)}"
    text = f"layout g = grid({', '.join(map(str, dims))})\npattern p = neighborhood(g, {args})\n"
    return text, int(np.prod(dims)), int(np.prod(kernel))


@given(noncausal_neighborhoods())
def test_neighborhood_row_count_is_product_of_kernel_sizes(case: tuple[str, int, int]) -> None:
    """Non-causal: the window is shifted at the borders, never cut, so every row has prod(K) keys."""
    text, n, keys = case
    counts = dense_mask(_program_pattern(text), n).sum(axis=1)
    assert (counts == keys).all(), text


@given(dims=grids(), data=st.data())
def test_causal_neighborhood_row_count_is_product_of_clipped_kernels(
    dims: tuple[int, ...], data: st.DataObject
) -> None:
    """Causal on every axis: axis a contributes min(p_a + 1, K_a) keys, p_a = coordinate // dilation."""
    kernel = [data.draw(st.integers(1, 6)) for _ in dims]
    dilation = [data.draw(st.integers(1, max(1, min(n, 3)))) for n in dims]
    text = (
        f"layout g = grid({', '.join(map(str, dims))})\npattern p = neighborhood(g, kernel=({', '.join(map(str, kernel))},), "
        f"dilation=({', '.join(map(str, dilation))},), causal=true)\n"
    )
    if len(dims) > 1:
        text = text.replace(",), ", "), ")
    n = int(np.prod(dims))
    counts = dense_mask(_program_pattern(text), n).sum(axis=1)
    coords = np.stack(np.unravel_index(np.arange(n), dims), axis=1)
    expected = np.prod([np.minimum(coords[:, a] // dilation[a] + 1, kernel[a]) for a in range(len(dims))], axis=0)
    np.testing.assert_array_equal(counts, expected, err_msg=text)


def test_video_causal_row_count_mixes_causal_time_with_full_space() -> None:
    """The spec's video example, scaled down: causal in time (min(t+1, 3)), a full 3x3 in space."""
    p = _program_pattern(
        "layout v = grid(4, 5, 5)\npattern p = neighborhood(v, kernel=(3, 3, 3), causal=(true, false, false))\n"
    )
    counts = dense_mask(p, 100).sum(axis=1).reshape(4, 25)
    for t in range(4):
        assert (counts[t] == min(t + 1, 3) * 9).all()


# --- random: deterministic, exact, seed-dependent -------------------------------------------------

GOLDEN = {
    ("random(3, seed=7)", 32): "aa2c0ac02ba7e18d0608af4075157316b21117ff12f6b3c3d62f9f95e841bfa3",
    ("blockwise(4, random(2, seed=1))", 40): "55a3a8c953b9fe8f389d23a5df863754f34a990fe740c3b5d4f09e1f5606d209",
    ("random(20, seed=3)", 40): "b27cbe79fe20acf548e770d450b679d013309f54d7812694f9c5b8b2ea438c4e",  # bitmap path
}


@pytest.mark.parametrize(("src", "n"), sorted(GOLDEN))
def test_random_draw_matches_golden_hash(src: str, n: int) -> None:
    """A change of the counter-based draw changes every compiled BigBird pattern: it must be deliberate."""
    digest = hashlib.sha256(np.packbits(_m(src, n)).tobytes()).hexdigest()
    assert digest == GOLDEN[(src, n)]


@given(r=st.integers(0, 60), seed=st.integers(0, 2**32), n=st.integers(1, 64))
def test_random_is_deterministic_and_has_exactly_min_r_n_keys_per_row(r: int, seed: int, n: int) -> None:
    first = _m(f"random({r}, seed={seed})", n)
    again = _m(f"random({r}, seed={seed})", n)
    assert np.array_equal(first, again)
    assert (first.sum(axis=1) == min(r, n)).all()
    rows = np.array([n - 1, 0, n // 2])
    keys = random_keys(rows, n, r, seed)  # any row can be rebuilt alone
    for row, ks in zip(rows, keys, strict=True):
        assert sorted(ks.tolist()) == np.flatnonzero(first[row]).tolist()


def _floyd(rows: np.ndarray, n: int, r: int, seed: int) -> np.ndarray:
    """random_keys' docstring, literally: Floyd's sampling over the counter hash, one comparison at a time."""
    from patterndsl.semantics import counter_hash

    out = []
    for row in rows.tolist():
        chosen: list[int] = []
        for t in range(n - min(r, n), n):
            v = int(counter_hash(seed, n, np.array([row]), t)[0] % np.uint64(t + 1))
            chosen.append(t if v in chosen else v)
        out.append(chosen)
    return np.array(out, dtype=np.int64).reshape(len(out), min(r, n))


@given(n=st.integers(1, 120), r=st.integers(0, 130), seed=st.integers(0, 2**31), data=st.data())
def test_random_keys_is_floyds_sampling_for_every_r(n: int, r: int, seed: int, data: st.DataObject) -> None:
    """The fast paths (a bitmap for large r) draw exactly what the definition draws."""
    rows = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)))
    np.testing.assert_array_equal(random_keys(rows, n, r, seed), _floyd(rows, n, r, seed))


def test_random_with_many_keys_is_fast() -> None:
    import time

    start = time.perf_counter()
    m = _m("random(1500, seed=1)", 2048)
    assert (m.sum(axis=1) == 1500).all()
    assert time.perf_counter() - start < 10


@given(seed=st.integers(0, 2**20), n=st.integers(16, 64))
def test_random_seeds_give_different_masks(seed: int, n: int) -> None:
    assert not np.array_equal(_m(f"random(3, seed={seed})", n), _m(f"random(3, seed={seed + 1})", n))


def test_random_differs_by_length_but_not_by_chunking() -> None:
    """N is part of the counter (so the draw at N is not a crop of the draw at 2N) but the chunk size is not."""
    from patterndsl import mask as mask_module

    m64 = _m("random(4, seed=5)", 64)
    assert not np.array_equal(_m("random(4, seed=5)", 128)[:64, :64], m64)
    old = mask_module.CHUNK_ELEMENTS
    try:
        mask_module.CHUNK_ELEMENTS = 64 * 3  # three rows per chunk
        assert np.array_equal(_m("random(4, seed=5)", 64), m64)
    finally:
        mask_module.CHUNK_ELEMENTS = old


# --- pictures: cell densities without the dense mask ----------------------------------------------


@given(src=expressions(max_leaves=3), n=lengths, rows=st.integers(1, 60), cols=st.integers(1, 60))
def test_cell_density_equals_downsampled_dense_mask(src: str, n: int, rows: int, cols: int) -> None:
    from patterndsl import mask as mask_module
    from patterndsl.draw import downsample

    body = P.pattern(src)
    want = downsample(dense_mask(body, n), rows, cols)
    old = mask_module.CHUNK_ELEMENTS
    try:
        mask_module.CHUNK_ELEMENTS = 5 * n  # several chunks even at small N
        got = mask_module.cell_density(body, n, rows, cols)
    finally:
        mask_module.CHUNK_ELEMENTS = old
    np.testing.assert_allclose(got, want, err_msg=src)


# --- heads ---------------------------------------------------------------------------------------


def test_heads_mask_stacks_each_ranges_pattern() -> None:
    prog = P.loads("pattern moa = heads {\n    0:2 => causal & window(2)\n    2:3 => sink(1)\n}\n")
    body = prog.patterns[0].body
    m = dense_mask(body, 10, heads=3)
    assert m.shape == (3, 10, 10)
    np.testing.assert_array_equal(m, reference_mask(body, 10))
    np.testing.assert_array_equal(m[0], m[1])
