"""The reference masks (`patterndsl.mask.dense_mask`) against an independent brute-force reading of
LANGUAGE.md (`tests/reference.py`), for every static primitive and for random set expressions; the set
algebra's laws; the row counts the spec implies; and `random`'s determinism.

Hypothesis draws pattern *source text*, so the parser, checker, semantics and mask are all under test.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask
from strategies import (
    PRIMITIVES,
    axis_values,
    conditions,
    expressions,
    grids,
    layout_wheres,
    lengths,
    neighborhoods,
    render,
    trees,
)

import patterndsl as P
from patterndsl.mask import dense_mask
from patterndsl.semantics import random_keys


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


@given(cond=conditions(), n=lengths)
def test_where_condition_means_what_python_says(cond: str, n: int) -> None:
    """where(...) has Python's precedence and Python's floor // and %: Python itself is the reference."""
    code = compile(cond, "<cond>", "eval")
    names = {"abs": abs, "min": min, "max": max, "log2": lambda x: math.floor(math.log2(x)) if x > 0 else -1}
    expected = np.array(
        [
            [bool(eval(code, {"q": i, "k": j, "N": n, **names})) for j in range(n)]
            for i in range(n)
        ]
    ).reshape(n, n)
    np.testing.assert_array_equal(_m(f"where({cond})", n), expected, err_msg=cond)


def _program_pattern(text: str) -> P.ir.Pattern:
    body = P.loads(text).get("p")
    assert isinstance(body, P.ir.PatternDef) and not isinstance(body.body, P.ir.Heads)
    return body.body


@given(neighborhoods())
def test_neighborhood_mask_matches_brute_force(case: tuple[str, int]) -> None:
    text, n = case
    p = _program_pattern(text)
    np.testing.assert_array_equal(dense_mask(p, n), reference_mask(p, n), err_msg=text)


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
    args = f"kernel={axis_values(kernel, draw)}, dilation={axis_values(dilation, draw)}, stride={axis_values(stride, draw)}"
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
