"""Token layouts (patterndsl.layout): the index map is a bijection onto the caller's tokens, the predicate in
layout space equals the composed predicate pair by pair, block tables over physical rows are sound, and
kernels that use a layout match the independent brute-force reference (tests/reference.py) in Triton's
CPU interpreter: grids whose sides are not multiples of the tile, dilation that does not divide the axis,
causal time axes, strides, 1-D dilated windows. Outputs are poisoned (NaN) before each run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import check_attention, check_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask

import patterndsl as P
from patterndsl import expr as E
from patterndsl import ir
from patterndsl import layout as L
from patterndsl.mask import eval_numpy
from patterndsl.semantics import predicate

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

# (source, N): every kind of layout, at sizes the interpreter runs in about a second each
CASES = [
    ("pattern p = causal & window(5, dilation=3)\n", 100),  # 3 does not divide 100
    ("pattern p = window(4, 2, dilation=4)\n", 64),
    ("pattern p = stride(7)\n", 90),
    ("pattern p = causal & stride(5) & window(40)\n", 77),
    ("layout g = grid(10, 12)\npattern p = neighborhood(g, kernel=5)\n", 120),  # sides not multiples of 16
    ("layout g = grid(13, 11)\npattern p = neighborhood(g, kernel=3, dilation=(3, 2))\n", 143),
    ("layout g = grid(12, 12)\npattern p = neighborhood(g, kernel=3, dilation=4)\n", 144),
    ("layout g = grid(5, 6, 7)\npattern p = neighborhood(g, kernel=(2, 3, 3), causal=(true, false, false))\n", 210),
    ("layout g = grid(9, 14)\npattern p = neighborhood(g, kernel=(3, 5), stride=(2, 3))\n", 126),
    ("layout g = grid(8, 12)\npattern p = neighborhood(g, kernel=3, causal=(true, false)) & causal\n", 96),
    ("layout g = grid(3, 4, prefix=5, suffix=3)\npattern p = neighborhood(g, kernel=(1, 3)) | global(g.prefix) | cols(g.suffix)\n", 20),
    pytest.param("layout g = grid(3, 2, 3, 2, 2, 4)\npattern p = neighborhood(g, kernel=(2, 1, 2, 2, 2, 4))\n", 288,
                 marks=pytest.mark.slow, id="tile-major-3d"),  # about 10 s in the interpreter
]
# index maps and layout predicates only (the kernels of many-axis grids run the 3-D case above, under slow)
EXACT_ONLY = [("layout g = grid(2, 3, 2, 4)\npattern p = neighborhood(g, kernel=(1, 2, 2, 4))\n", 48)]  # tile-major 2-D


def _layout_of(attn: Any, k: int = 0) -> str | None:
    """The description of predicate k's token layout, None where its rows are contiguous."""
    lay = attn.spec.layouts[k]
    return None if lay is None else lay.description


def _body(src: str) -> Any:
    return P.loads(src).patterns[0].body


def _physical(layout: L.Layout, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = E.evaluate_int(L.rows(layout), n)
    r = np.arange(rows, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    token = np.broadcast_to(eval_numpy(E.bind_n(L.logical_index(layout), n), r, zero, n), r.shape)
    ok = np.broadcast_to(eval_numpy(E.bind_n(L.valid(layout), n), r, zero, n), r.shape).astype(bool)
    return token, ok


def _layouts(body: Any, bq: int, bk: int) -> list[L.Layout]:
    """The chosen layout and every candidate tile shape (a layout changes speed, never meaning)."""
    chosen = L.choose(body, bq, bk)
    out = [chosen] if chosen is not None else []
    for x in ir.walk(body):
        if isinstance(x, ir.Neighborhood):
            out += L.candidates(x.layout, x.dilation, bq, bk)[:6]
            break
    return out


@pytest.mark.parametrize("src, n", CASES + EXACT_ONLY)
def test_index_map_is_a_bijection_and_layout_predicate_is_exact(src: str, n: int) -> None:
    body = _body(src)
    pred = predicate(body)
    layouts = _layouts(body, 16, 16) + _layouts(body, 32, 16)
    assert layouts, "every case here should get a layout"
    want = reference_mask(body, n)
    for lay in layouts:
        token, ok = _physical(lay, n)
        assert sorted(token[ok].tolist()) == list(range(n)), L.describe(lay)
        lp = E.bind_n(L.layout_predicate(pred, lay), n)
        r = np.arange(token.size, dtype=np.int64)
        got = np.broadcast_to(eval_numpy(lp, r[:, None], r[None, :], n), (r.size, r.size))
        t = np.where(ok, token, 0)
        composed = want[t[:, None], t[None, :]] & ok[:, None] & ok[None, :]
        assert np.array_equal(got, composed), L.describe(lay)


def _tiles(offsets: Any, indices: Any) -> set[tuple[int, int]]:
    out = set()
    for r in range(offsets.numel() - 1):
        out |= {(r, int(c)) for c in indices[int(offsets[r]) : int(offsets[r + 1])]}
    return out


@pytest.mark.parametrize("src, n", [pytest.param(*c, marks=pytest.mark.slow) if i in (5, 7) else c  # 5-6 s each
                                    for i, c in enumerate(CASES)])
def test_kernel_with_layout_matches_reference_and_tables_are_sound(src: str, n: int) -> None:
    body = _body(src)
    want = reference_mask(body, n)
    lay = _layouts(body, 16, 16)[0]  # the chosen one, else the first tile shape (forced)
    from patterndsl.compile import compile_source
    from patterndsl.runtime import tables as T

    attn = P.compile(src, block_m=16, block_n=16, layout=lay)
    assert _layout_of(attn) == L.describe(lay)
    check_attention(attn, want, h=2, hkv=1)
    token, ok = _physical(lay, n)
    assert T.rows(attn.spec, 0, n) == token.size
    f_off, f_idx, p_off, p_idx = T.block_tables(attn.spec, n, 16, 16, torch.device("cpu"))
    full, part = _tiles(f_off, f_idx), _tiles(p_off, p_idx)
    t = np.where(ok, token, 0)
    phys = want[t[:, None], t[None, :]] & ok[:, None] & ok[None, :]
    rows, cols = np.nonzero(phys)
    assert {(int(a) // 16, int(b) // 16) for a, b in zip(rows, cols, strict=True)} <= full | part
    for qb, kb in full:  # FULL: every pair of the tile allowed, every row a token
        assert phys[qb * 16 : qb * 16 + 16, kb * 16 : kb * 16 + 16].all()
    plain = P.compile(src, block_m=16, block_n=16, layout=False)
    assert plain.spec.layouts == (None,) and _layout_of(plain) is None
    assert "def layout_0" in compile_source(src, block_m=16, block_n=16, layout=lay).text
    assert "def layout_0" not in compile_source(src, block_m=16, block_n=16, layout=False).text  # no index map


@settings(max_examples=5, deadline=None)
@given(
    dims=st.lists(st.integers(3, 11), min_size=2, max_size=2),
    kernel=st.integers(1, 3),
    dilation=st.lists(st.integers(1, 3), min_size=2, max_size=2),
    causal=st.lists(st.booleans(), min_size=2, max_size=2),
)
def test_random_2d_neighborhoods_with_layouts_match_reference(
    dims: list[int], kernel: int, dilation: list[int], causal: list[bool]
) -> None:
    k = [max(1, min(kernel, n // d)) for n, d in zip(dims, dilation, strict=True)]  # the checker's rule
    c = ", ".join("true" if x else "false" for x in causal)
    src = (
        f"layout g = grid({dims[0]}, {dims[1]})\n"
        f"pattern p = neighborhood(g, kernel=({k[0]}, {k[1]}), dilation=({dilation[0]}, {dilation[1]}), causal=({c}))\n"
    )
    body = _body(src)
    n = dims[0] * dims[1]
    want = reference_mask(body, n)
    pred = predicate(body)
    for lay in _layouts(body, 16, 16)[:3]:
        token, ok = _physical(lay, n)
        assert sorted(token[ok].tolist()) == list(range(n))
        lp = E.bind_n(L.layout_predicate(pred, lay), n)
        r = np.arange(token.size, dtype=np.int64)
        got = np.broadcast_to(eval_numpy(lp, r[:, None], r[None, :], n), (r.size, r.size))
        t = np.where(ok, token, 0)
        assert np.array_equal(got, want[t[:, None], t[None, :]] & ok[:, None] & ok[None, :])
    check_attention(P.compile(src, block_m=16, block_n=16), want, h=1)


@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 120), r=st.integers(0, 12), d=st.integers(2, 6), causal=st.booleans())
def test_random_dilated_windows_with_layouts_match_reference(n: int, r: int, d: int, causal: bool) -> None:
    src = "pattern p = " + ("causal & " if causal else "") + f"window({r}, dilation={d})\n"
    attn = P.compile(src, block_m=16, block_n=16)
    assert _layout_of(attn) == f"residue classes mod {d}"
    check_attention(attn, reference_mask(_body(src), n), h=1)


def test_layout_cuts_visited_tiles_of_the_benchmark_patterns() -> None:
    """What the layouts are for, in ratios the analyser also reports (the benchmark's shapes, scaled down)."""
    dilated = P.pattern("causal & window(255, dilation=4)")
    lay = L.choose(dilated, 64, 32)
    pred = predicate(dilated)
    assert L.visited_tiles(pred, lay, 4096, 64, 32) * 3 < L.visited_tiles(pred, None, 4096, 64, 32)
    na = _body("layout g = grid(64, 64)\npattern p = neighborhood(g, kernel=13)\n")
    lay = L.choose(na, 64, 32)
    pred = predicate(na)
    assert L.visited_tiles(pred, lay, 4096, 64, 32) * 3 < L.visited_tiles(pred, None, 4096, 64, 32) * 2


def test_windows_and_sinks_keep_the_plain_order() -> None:
    for src in ("causal & window(100)", "causal & (window(127) | stride(128))", "window(9, dilation=3) | global(0:5)"):
        assert L.choose(P.pattern(src), 128, 64) is None


def test_analyze_reports_tile_efficiency_with_and_without_the_layout() -> None:
    from patterndsl.analysis.analyze import Options, analyze

    program = P.loads("pattern d = causal & window(63, dilation=4)\npattern w = causal & window(63)\n")
    out = {
        e["pattern"]: e["layout"] for e in analyze(program.get("d"), Options(4096, block_q=64, block_k=32))["patterns"]
    }  # type: ignore[arg-type]
    (fig,) = out.values()
    assert fig["chosen"] == "residue classes mod 4"
    pairs = int(P.dense_mask("causal & window(63, dilation=4)", 4096).sum())
    assert fig["tile_efficiency"] > 2 * fig["plain_tile_efficiency"]
    assert fig["tile_efficiency"] == pytest.approx(pairs / (fig["visited_blocks"] * 64 * 32))
    plain = analyze(program.get("w"), Options(4096, block_q=64, block_k=32))["patterns"][0]["layout"]  # type: ignore[arg-type]
    assert plain["chosen"] == "contiguous" and plain["tile_efficiency"] == plain["plain_tile_efficiency"]


# the kinds the gradient test covers: 1-D dilation not dividing N, 2-D dilation not dividing the axes, causal time
BWD_CASES = [CASES[0], pytest.param(*CASES[5], marks=pytest.mark.slow),  # about 9 s
             pytest.param(*CASES[7], marks=pytest.mark.slow)]  # the 3-D grid: about 5 s


@pytest.mark.parametrize("src, n", BWD_CASES)
def test_gradients_with_layouts_match_reference(src: str, n: int) -> None:
    body = _body(src)
    lay = _layouts(body, 16, 16)[0]
    from patterndsl.runtime import tables as T

    attn = P.compile(src, block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1), layout=lay)
    check_grads(attn, reference_mask(body, n), h=2, hkv=1)
    f_off, _, p_off, _ = T.block_tables_t(attn.spec, n, 16, 16, torch.device("cpu"))
    assert f_off.numel() - 1 == -(-T.rows(attn.spec, 0, n) // 16)  # dK/dV run over physical key blocks


def test_grid_neighborhoods_get_smaller_tiles_and_windows_keep_the_defaults() -> None:
    from patterndsl.compile import DEFAULT_CONFIGS, GRID_CONFIGS

    na = "layout g = grid(64, 64)\npattern p = neighborhood(g, kernel=13)\n"
    attn = P.compile(na)
    assert attn.spec.configs == GRID_CONFIGS
    assert _layout_of(attn) == L.describe(L.choose(_body(na), 64, 32))
    assert P.compile(na, layout=False).spec.configs == DEFAULT_CONFIGS
    assert P.compile("pattern p = causal & window(255, dilation=4)\n").spec.configs == DEFAULT_CONFIGS


@pytest.mark.parametrize("src", [
    "layout g = grid(64, 64)\npattern p = neighborhood(g, kernel=13)\n",
    "layout g = grid(32, 48)\npattern p = where(g, qc0 == kc0) | where(g, qc1 == kc1)\n",
    pytest.param("layout g = grid(8, 16, 16)\npattern p = neighborhood(g, kernel=(3, 5, 5), causal=(true, false, false))\n",
                 marks=pytest.mark.slow, id="3-d"),  # about 16 s: every 3-D candidate counted twice
])  # fmt: skip
def test_layouts_ranked_on_bands_of_rows_as_on_all_of_them(src: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the exact counts' budget the chooser ranks layouts on bands of query rows; the layout it picks
    visits (exactly counted) as few tiles as the best, within 10% (near-ties may go either way)."""
    body = _body(src)
    pred, (grid, _) = predicate(body), L._grid_of(body)  # type: ignore[misc]
    layouts: list[Any] = [None, *L.candidates(grid, (1,) * len(grid.dims), 64, 32)]
    exact = L._visit_scores(pred, layouts, grid.size, 64, 32)
    banded: list[int] = []
    count = L._band_visits
    monkeypatch.setattr(L, "_EXACT_WORK", 1)
    monkeypatch.setattr(L, "_BAND_ROWS", 64)
    monkeypatch.setattr(L, "_band_visits", lambda *a: banded.append(count(*a)) or banded[-1])
    bands = L._visit_scores(pred, layouts, grid.size, 64, 32)
    assert bands == banded and len(bands) == len(layouts)
    assert exact[int(np.argmin(bands))] <= 1.1 * min(exact), (bands, exact)


@pytest.mark.slow  # about 6 s
def test_choosing_for_a_long_axis_takes_no_axis_by_axis_mask() -> None:
    """A neighborhood on a grid with an axis of 2**15 positions: the per-axis score (an axis x axis mask,
    a gigabyte here and 256 TiB at 2**24) is skipped and the layouts ranked on bands of rows."""
    import tracemalloc

    body = _body("layout g = grid(2**15, 32)\npattern p = neighborhood(g, kernel=3)\n")
    tracemalloc.start()
    try:
        L.choose(body, 128, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, peak
