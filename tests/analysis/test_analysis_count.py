"""Exact counts and symbolic nnz(N) of the analyser against the dense reference mask."""

from __future__ import annotations

import pytest
from helpers import LIBRARY, reference_rows
from hypothesis import given
from hypothesis import strategies as st
from strategies import analysis_patterns

from patterndsl import dense_mask, load, loads, pattern
from patterndsl.analysis.count import row_stats
from patterndsl.analysis.symbolic import Closed, NoClosed, nnz


@given(analysis_patterns(), st.integers(1, 70))
def test_row_counts_and_spans_match_dense_mask(src: str, n: int) -> None:
    p = pattern(src)
    s = row_stats(p, n)
    cnt, first, last = reference_rows(dense_mask(p, n))
    assert s.counts.tolist() == cnt.tolist(), s.method
    assert s.first.tolist() == first.tolist(), s.method
    assert s.last.tolist() == last.tolist(), s.method


@pytest.mark.parametrize(
    "name, defines",
    [("nat.pat", {"height": 9, "width": 11, "kernel": 3}), ("dinat.pat", {}), ("gna.pat", {})],
)
def test_neighborhood_rows_are_products_of_axes(name: str, defines: dict[str, int]) -> None:
    prog = load(LIBRARY / name, defines)
    for item in prog.patterns:
        body = item.body
        n = next(L.size for L in prog.layouts if L.name in repr(body))
        if n > 5000:
            continue
        cnt, first, last = reference_rows(dense_mask(body, n))  # type: ignore[arg-type]
        s = row_stats(body, n)  # type: ignore[arg-type]
        assert (s.counts == cnt).all() and (s.first == first).all() and (s.last == last).all(), item.name


def test_large_n_counts_use_fast_paths() -> None:
    n = 1 << 16
    assert row_stats(pattern("causal & window(255)"), n).pairs == 256 * n - 255 * 256 // 2
    assert row_stats(pattern("blockwise(64, window(1))"), n).pairs == 64 * 64 * (3 * 1024 - 2)


CLOSED = [
    "full", "none", "causal", "~causal", "window(3)", "window(2, 5)", "window(3, dilation=2)",
    "window(1, 2, dilation=3)", "sink(4)", "global(0:3)", "global([1, 5])", "rows(2:6:2)", "cols(3:5)",
    "causal & window(4)", "window(3) | global(0:2)", "causal & (window(3) | sink(2))", "window(5) - window(2)",
    "(window(2) | rows(0:2)) & ~cols([3])", "causal & hops(2)", "hops(3)", "stride(4)", "causal & stride(3)",
    "random(3, seed=1)", "blockwise(4, window(1))", "blockwise(3, causal & (window(1) | sink(1)))",
]  # fmt: skip


@pytest.mark.parametrize("src", CLOSED)
def test_symbolic_count_matches_exact_count(src: str) -> None:
    p = pattern(src)
    s = nnz(p)
    assert isinstance(s, Closed), s
    step = 3 if "blockwise(3" in src else 4 if "blockwise(4" in src else 1
    for n in range(s.valid_from, s.valid_from + 120):
        if n % step == 0:
            assert s.at(n) == row_stats(p, n).pairs, (src, n, s.text())


def test_window_closed_form_reads_as_the_textbook_one() -> None:
    s = nnz(pattern("window(256)"))
    assert isinstance(s, Closed)
    assert s.text().startswith("513*N - 65792")


@pytest.mark.parametrize(
    "src", ["where(q == k)", "blockwise(4, window(1) | random(2, seed=0))", "window(N // 4)", "window(1) | stride(3)"]
)
def test_no_closed_form_is_said_plainly(src: str) -> None:
    s = nnz(pattern(src))
    assert isinstance(s, NoClosed)
    assert s.text().startswith("no closed form (")


def test_neighborhood_closed_form_is_kernel_area_times_n() -> None:
    prog = load(LIBRARY / "gna.pat")
    body = prog.get("gna_video").body  # type: ignore[union-attr]
    s = nnz(body)  # type: ignore[arg-type]
    assert isinstance(s, Closed) and s.at(16 * 32 * 32) == row_stats(body, 16 * 32 * 32).pairs  # type: ignore[arg-type]


@pytest.mark.parametrize("src", ["causal & window(2**40 - 1)", "window(3) | sink(2**50)", "global(0:2**45)",
                                 "window(2**41, dilation=3)"])
def test_terms_too_wide_to_list_have_no_closed_form_and_cost_nothing(src: str) -> None:
    """A window or token range of 2**40 is refused before it is listed (it used to be enumerated: hours and
    tens of GB for `patc analyze`), and the exact count still comes from the run counter."""
    s = nnz(pattern(src))
    assert isinstance(s, NoClosed) and "too many to expand" in s.text(), s
    p = pattern(src)
    assert row_stats(p, 70).counts.tolist() == reference_rows(dense_mask(p, 70))[0].tolist()


@pytest.mark.parametrize("src", [
    "layout g = grid(4, 12, 12)\npattern p = neighborhood(g, kernel=(3, 5, 5), causal=(true, false, false))\n",
    "layout g = grid(10, 9)\npattern p = neighborhood(g, kernel=3, dilation=(2, 1), causal=(true, true))\n",
    "layout g = grid(7, 11)\npattern p = neighborhood(g, kernel=(3, 5), causal=(false, true))\n",
])  # fmt: skip
def test_causal_neighborhood_closed_forms_evaluate_at_their_grid(src: str) -> None:
    """A causal axis keeps the closed form in the axis lengths (n0, n1, ...): evaluating it substitutes the
    grid's own lengths (it used to fail to convert, so `patc analyze` of video.pat's causal pattern crashed)."""
    body = loads(src).patterns[0].body
    s = nnz(body)
    assert isinstance(s, Closed) and s.condition.startswith("N fixed"), s
    n = s.valid_from
    assert s.at(n) == int(dense_mask(body, n).sum()) == row_stats(body, n).pairs
