"""Receptive field, block counts and costs of the analyser against brute force on dense masks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import LIBRARY
from hypothesis import given
from hypothesis import strategies as st

from patterndsl import dense_mask, pattern
from patterndsl.analysis.cost import FWD_PER_PAIR, block_counts, cost
from patterndsl.analysis.count import bound_predicate, row_stats
from patterndsl.analysis.reach import receptive_field

SRCS = [
    "causal & window(3)", "window(2)", "causal & hops(2)", "window(2, dilation=2)", "window(1) | global(0:2)",
    "blockwise(4, window(1) | random(2, seed=0))", "causal & (window(2) | sink(1))", "stride(5) | window(0)",
    "window(1) - window(0)", "rows(0:3)", "causal & blockwise(3, hops(2) | window(1))",
]  # fmt: skip


def brute_coverage(masks: list[np.ndarray], causal: bool, depth: int) -> list[float]:
    n = masks[0].shape[0]
    target = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    reach = np.eye(n, dtype=bool)
    out = []
    for d in range(depth):
        a = masks[d % len(masks)].astype(np.float32)  # counts stay far below 2**24: exact
        reach = (a @ reach.astype(np.float32)) > 0
        out.append(float((reach & target).sum() / target.sum()))
    return out


@given(st.sampled_from(SRCS), st.integers(1, 48))
def test_token_coverage_per_depth_matches_matrix_reachability(src: str, n: int) -> None:
    p = pattern(src)
    m = dense_mask(p, n)
    causal = not np.triu(m, 1).any()
    r = receptive_field([p], n, causal)
    assert r.granularity.startswith("token")
    assert r.coverage == pytest.approx(brute_coverage([m], causal, len(r.coverage)))
    full = [d + 1 for d, c in enumerate(r.coverage) if c >= 1.0]
    assert r.depth == (full[0] if full else None)
    if r.depth is None and r.stopped == "reach stopped changing":
        more = brute_coverage([m], causal, len(r.coverage) + 3)
        assert max(more) < 1.0


def test_model_schedule_is_followed_layer_by_layer() -> None:
    a, b = pattern("causal & window(1)"), pattern("causal & stride(4)")
    n = 40
    r = receptive_field([a, b, a], n, True, repeat=False)
    assert len(r.coverage) <= 3
    expect = brute_coverage([dense_mask(a, n), dense_mask(b, n), dense_mask(a, n)], True, 3)
    assert r.coverage == pytest.approx(expect[: len(r.coverage)])


@pytest.mark.parametrize("src", ["causal & window(300)", "window(200) | global(0:16)", "causal & hops(2)"])
def test_block_bounds_enclose_token_coverage(src: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import patterndsl.analysis.reach as reach

    p = pattern(src)
    n = 1024
    exact = receptive_field([p], n, src.startswith("causal"))
    monkeypatch.setattr(reach, "TOKEN_LIMIT", 100)
    monkeypatch.setattr(reach, "BLOCK_UNITS", 64)
    monkeypatch.setattr(reach, "offset_reach", lambda *a, **k: None)  # force the block bounds
    bounds = reach.receptive_field([p], n, src.startswith("causal"))
    assert bounds.unit == 16 and bounds.coverage_lower is not None
    for d, c in enumerate(exact.coverage[: len(bounds.coverage)]):
        lo = bounds.coverage_lower[d] if d < len(bounds.coverage_lower) else bounds.coverage_lower[-1]
        # Bounds are on block pairs; a block pair reached by some token pair (upper) / by all (lower).
        assert lo <= c + 1 / 64 and c <= bounds.coverage[d] + 1e-12
    assert bounds.depth is not None and exact.depth is not None and bounds.depth <= exact.depth
    if bounds.depth_upper is not None:
        assert exact.depth <= bounds.depth_upper


@given(st.sampled_from(SRCS), st.integers(1, 70), st.sampled_from([(4, 4), (8, 4), (4, 16), (16, 16)]))
def test_block_counts_cover_exactly_the_nonempty_tiles(src: str, n: int, blocks: tuple[int, int]) -> None:
    bq, bk = blocks
    p = pattern(src)
    bc = block_counts(bound_predicate(p, n), n, bq, bk)
    m = dense_mask(p, n)
    nq, nk = -(-n // bq), -(-n // bk)
    pad = np.zeros((nq * bq, nk * bk), bool)
    pad[:n, :n] = m
    valid = np.zeros_like(pad)
    valid[:n, :n] = True
    tiles = pad.reshape(nq, bq, nk, bk)
    nonempty = tiles.any(axis=(1, 3))
    full = (tiles | ~valid.reshape(nq, bq, nk, bk)).all(axis=(1, 3)) & nonempty
    visited = bc.full + bc.partial
    assert (visited >= nonempty.sum(axis=1)).all()  # sound: never skips a tile with a pair
    assert (bc.full <= full.sum(axis=1)).all()  # sound: FULL only when every pair is allowed
    if "random" not in src and "hops" not in src:
        assert (visited == nonempty.sum(axis=1)).all()  # and exact on these predicates


def test_flops_bytes_and_efficiency_follow_the_stated_conventions() -> None:
    p = pattern("causal & window(7)")
    n, h, d, b = 64, 3, 16, 2
    pairs = row_stats(p, n).pairs
    bc = block_counts(bound_predicate(p, n), n, 16, 16)
    c = cost(pairs, bc, n, h, d, b)
    m = dense_mask(p, n)
    assert c.fwd_flops == FWD_PER_PAIR * int(m.sum()) * d * h * b
    assert c.bwd_flops == 10 * int(m.sum()) * d * h * b
    tiles = m.reshape(4, 16, 4, 16).any(axis=(1, 3)).sum()
    assert c.visited == tiles
    assert c.executed_fwd_flops == tiles * 16 * 16 * 4 * d * h * b
    assert c.tile_efficiency == pytest.approx(m.sum() / (tiles * 256))
    assert c.fwd_bytes == 2 * (2 * n * d + 2 * tiles * 16 * d) * h * b
    assert c.intensity == pytest.approx(c.executed_fwd_flops / c.fwd_bytes)


OFFSET_SRCS = [
    "causal & window(3)", "window(2)", "window(3, 1)", "causal & hops(2)", "causal & hops(3)",
    "causal & window(2, dilation=2)", "causal & (window(3) | stride(7))", "causal & window(0)", "full", "causal",
]  # fmt: skip


@given(st.lists(st.sampled_from(OFFSET_SRCS), min_size=1, max_size=3), st.integers(1, 60), st.booleans())
def test_offset_structure_reach_is_exact(srcs: list[str], n: int, repeat: bool) -> None:
    from patterndsl.analysis.reach import offset_reach

    schedule = [pattern(s) for s in srcs[:1]] if repeat else [pattern(s) for s in srcs]
    got = offset_reach(schedule, n, repeat)
    if got is None:  # a non-causal schedule that is not one window: not claimed
        return
    masks = [dense_mask(p, n) for p in schedule]
    causal = not any(np.triu(m, 1).any() for m in masks)
    assert got.causal_target == causal
    want = brute_coverage(masks, causal, len(got.coverage))
    assert got.coverage == pytest.approx(want)
    full = [d + 1 for d, c in enumerate(want) if c >= 1.0]
    if full:
        assert got.depth == full[0]
    elif got.depth is not None:  # read off the closed form past the listed depths
        assert max(brute_coverage(masks, causal, got.depth)) < 1.0 or got.depth > len(want)


def test_offset_structure_reaches_a_million_tokens_exactly() -> None:
    from patterndsl.analysis.reach import receptive_field

    n = 1 << 20
    r = receptive_field([pattern("causal & window(4095)")], n, True)
    assert r.granularity.startswith("token") and r.depth == 257
    r = receptive_field([pattern("causal & hops(2)")], n, True)
    assert r.depth == 20
    r = receptive_field([pattern("window(256)")], n, False)
    assert r.depth == 4096 and len(r.coverage) == 4096


@pytest.mark.parametrize(
    "name, defines",
    [("nat.pat", {"height": 9, "width": 11, "kernel": 3}), ("dinat.pat", {"kernel": 3}), ("", {})],
)
def test_neighborhood_reach_is_the_product_of_axes(name: str, defines: dict[str, int]) -> None:
    from patterndsl import ir, load, loads
    from patterndsl.analysis.reach import neighborhood_reach

    if name:
        prog = load(LIBRARY / name, defines)
    else:  # strides and dilations differing per axis
        prog = loads(
            "layout g = grid(12, 10)\npattern p = neighborhood(g, kernel=(3, 5), stride=(2, 3), dilation=(1, 2))\n"
        )
    checked = 0
    for item in [*prog.patterns, *prog.models]:
        is_model = isinstance(item, ir.Model)
        schedule = list(item.schedule) if is_model else [item.body]  # type: ignore[union-attr]
        if not all(isinstance(b, ir.Neighborhood) and not any(b.causal) for b in schedule):
            assert neighborhood_reach(schedule, 64, not is_model) is None
            continue
        n = schedule[0].layout.size  # type: ignore[union-attr]
        got = neighborhood_reach(schedule, n, not is_model)
        assert got is not None
        masks = [dense_mask(b, n) for b in schedule]
        assert got.coverage == pytest.approx(brute_coverage(masks, False, len(got.coverage)))
        checked += 1
    assert checked


def test_a_global_token_bounds_the_depth_by_two(monkeypatch: pytest.MonkeyPatch) -> None:
    import patterndsl.analysis.reach as reach

    monkeypatch.setattr(reach, "TOKEN_LIMIT", 100)
    monkeypatch.setattr(reach, "BLOCK_UNITS", 16)
    r = reach.receptive_field([pattern("window(5) | global(3:5)")], 600, False)
    assert r.unit > 1 and r.depth == 2 and r.depth_upper == 2 and "token 3" in r.stopped
    r = reach.receptive_field([pattern("window(5) | rows(3:5)")], 600, False)
    assert r.depth_upper is None  # no key is seen by every query: no hub
