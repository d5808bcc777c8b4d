"""The exchange plan and the placements, against brute force on the dense mask: every rank receives
exactly the key rows of the tiles its queries visit, owned elsewhere; placements tile the sequence and
shard / unshard invert each other; `patc analyze --ranks` reports the plan's figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compiled, emulate_ranks
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import reference_mask
from strategies import document_splits, expressions

from patterndsl import loads, semantics
from patterndsl.cli import main
from patterndsl.distributed import Placement, Terms, plan
from patterndsl.distributed.plan import imbalance, rank_costs, row_costs
from patterndsl.source import PatternError


def _terms(src: str, n: int) -> tuple[Terms, np.ndarray]:
    body = loads(f"pattern p = {src}\n").patterns[0].body
    return Terms(((semantics.predicate(body), 1),)), reference_mask(body, n)


def _doc_mask(src: str, docs: list[int]) -> np.ndarray:
    body = loads(f"pattern p = {src}\n").patterns[0].body
    n = sum(docs)
    m = np.zeros((n, n), dtype=bool)
    at = 0
    for d in docs:
        if d:
            m[at:at + d, at:at + d] = reference_mask(body, d)
        at += d
    return m


def _brute_recv(mask: np.ndarray, owner: np.ndarray, block: int, r: int, s: int,
                starts: list[int]) -> set[int]:
    """Key rows of rank s in tiles (block x block, per document) holding an allowed pair with a query of
    rank r."""
    n = mask.shape[0]
    doc = np.searchsorted(np.array(starts), np.arange(n), side="right") - 1
    local_block = (np.arange(n) - np.array(starts)[doc]) // block
    tile_q = doc * n + local_block  # a tile: (document, block) of the query, and of the key
    out: set[int] = set()
    hit = {(tile_q[i], tile_q[j]) for i, j in zip(*np.nonzero(mask), strict=True)}
    for i in np.flatnonzero(owner == r):
        for j in np.flatnonzero(owner == s):
            if (tile_q[i], tile_q[j]) in hit:
                out.add(int(j))
    return out


def _owner(pl: Placement) -> np.ndarray:
    owner = np.zeros(pl.n, dtype=np.int64)
    for r, runs in enumerate(pl.runs):
        for a, b in runs:
            owner[a:b] = r
    return owner


@settings(max_examples=30)
@given(expressions(max_leaves=3), st.integers(8, 40), st.integers(2, 4), st.sampled_from([2, 4, 8]),
       st.booleans())
def test_plan_is_exact_at_tile_granularity(src: str, n: int, world: int, block: int, chosen: bool) -> None:
    terms, mask = _terms(src, n)
    pl = Placement.best(terms, n, world, None, block) if chosen else Placement.contiguous(n, world)
    got = plan(terms, pl, block)
    owner = _owner(pl)
    for r in range(world):
        for s in range(world):
            rows = {int(j) for a, b in got.recv[r][s] for j in range(a, b)}
            want = set() if r == s else _brute_recv(mask, owner, block, r, s, [0])
            assert rows == want, (src, r, s)
    assert np.array_equal(row_costs(terms, n), mask.sum(1))


@settings(max_examples=20)
@given(document_splits, st.integers(2, 3))
def test_plan_keeps_documents_apart(docs: list[int], world: int) -> None:
    src = "causal & window(3) | global(0:1)"
    n = sum(docs)
    if n < world:
        return
    terms, _ = _terms(src, 1)
    cu = (0, *np.cumsum(docs).tolist())
    mask = _doc_mask(src, docs)
    pl = Placement.best(terms, n, world, cu, 4)
    got = plan(terms, pl, 4, cu)
    owner = _owner(pl)
    starts = [int(c) for c in cu[:-1]]
    for r in range(world):
        for s in range(world):
            rows = {int(j) for a, b in got.recv[r][s] for j in range(a, b)}
            assert rows == (set() if r == s else _brute_recv(mask, owner, 4, r, s, starts))
    assert np.array_equal(row_costs(terms, n, cu), mask.sum(1))


@settings(max_examples=30)
@given(st.integers(1, 60), st.integers(1, 5), st.sampled_from([1, 4, 16]))
def test_placements_tile_and_shard_round_trip(n: int, world: int, block: int) -> None:
    x = torch.arange(n).reshape(1, 1, n, 1)
    cost = np.arange(n, dtype=np.int64) + 1
    for pl in (Placement.contiguous(n, world), Placement.balanced(n, world, cost, block),
               Placement.head_tail(n, world, block)):
        shards = [pl.shard(x, r) for r in range(world)]
        assert [s.shape[2] for s in shards] == [pl.length(r) for r in range(world)]
        assert torch.equal(pl.unshard(shards), x)
        assert torch.equal(torch.cat([pl.positions(r) for r in range(world)]).sort().values, torch.arange(n))
        assert all(torch.equal(pl.positions(r), s.flatten()) for r, s in enumerate(shards))  # row order
    assert [s.shape[2] for s in (Placement.contiguous(n, world).shard(x, r) for r in range(world))] == \
        [t.shape[2] for t in x.tensor_split(world, dim=2)]


def test_choice_balances_causal_and_keeps_windows_contiguous() -> None:
    n, world = 4096, 4
    causal, _ = _terms("causal", 1)
    pl = Placement.best(causal, n, world, None, 64)
    assert pl.strategy == "head-tail" and imbalance(rank_costs(pl, row_costs(causal, n))) < 0.01
    window, _ = _terms("causal & window(100)", 1)
    pl = Placement.best(window, n, world, None, 64)
    assert pl.strategy == "contiguous by cost"
    assert plan(window, pl, 64).tokens_sent().max() <= 128  # a halo of the window, in whole tiles


def test_bad_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="tile"):
        Placement(10, (((0, 4),), ((5, 10),)))


def _analyze(capsys: pytest.CaptureFixture[str], tmp_path: Path, src: str, *argv: str) -> dict:  # type: ignore[type-arg]
    f = tmp_path / "p.pat"
    f.write_text(f"pattern p = {src}\n")
    assert main(["analyze", str(f), *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["context_parallel"]  # type: ignore[no-any-return]


def test_analyze_ranks_reports_the_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    n, world = 120, 3
    r = _analyze(capsys, tmp_path, "causal & window(20)", "-N", str(n), "--ranks", str(world), "--block", "16x16",
                 "--head-dim", "8")
    terms, mask = _terms("causal & window(20)", n)
    pl = Placement.best(terms, n, world, None, 16)
    assert r["ours"]["bytes_sent"] == (plan(terms, pl, 16).tokens_sent() * 2 * 8 * 2).tolist()
    assert sum(r["ours"]["pairs"]) == sum(r["ring"]["pairs"]) == int(mask.sum())
    assert r["ring"]["bytes_sent"] == [(world - 1) * (n // world) * 2 * 8 * 2] * world
    docs = _analyze(capsys, tmp_path, "causal", "-N", str(n), "--ranks", "2", "--docs", "50,40,30")
    assert docs["documents"] == 3 and sum(docs["ours"]["pairs"]) == 50 * 51 // 2 + 40 * 41 // 2 + 30 * 31 // 2


@pytest.mark.parametrize("argv, message", [
    (["--docs", "3"], "needs --ranks"),
    (["--ranks", "2", "--docs", "10,20"], "add up to N"),
    (["--ranks", "1"], "between 2"),
])
def test_analyze_ranks_misuse(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str) -> None:
    f = tmp_path / "p.pat"
    f.write_text("pattern p = causal\n")
    assert main(["analyze", str(f), "-N", "100", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("src, docs", [("causal & window(4095)", None), ("causal", None),
                                       ("window(256) | global(0:16)", None), ("causal", "64")])
def test_analyze_ranks_at_a_million(capsys: pytest.CaptureFixture[str], tmp_path: Path, src: str,
                                    docs: str | None) -> None:
    """The issue's done-criterion: 8 ranks, N = 2**20: balanced within 5 %, and the window sends 50x
    less than a ring."""
    r = _analyze(capsys, tmp_path, src, "-N", str(1 << 20), "--ranks", "8", *(["--docs", docs] if docs else []))
    assert r["ours"]["imbalance"] < 0.05
    if "window(4095)" in src:
        assert r["bytes_ratio"] >= 50


@pytest.mark.slow
@settings(max_examples=15)
@given(expressions(max_leaves=3), st.integers(8, 40), st.integers(2, 4), st.sampled_from([4, 8]), st.booleans(),
       st.integers(0, 2**31))
def test_ranks_together_compute_the_single_call(src: str, n: int, world: int, block: int, chosen: bool,
                                                 seed: int) -> None:
    """Random patterns: every rank's rows against its own and its received keys, merged, and the
    gradients sent home, add up to the single call (float64, CPU path)."""
    try:
        attn = compiled(src)
    except PatternError:  # e.g. random(N // 3): analysable, not compilable
        assume(False)
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, hh, n, 8, dtype=torch.float64, generator=g) for hh in (2, 1, 1, 2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attn(*leaves, return_lse=True)
    (out * do).sum().backward()
    pl = Placement.choose(attn, n, world, block=block) if chosen else Placement.contiguous(n, world)
    got = emulate_ranks(attn, q, k, v, do, pl, block)
    for a, b in zip(got, (out, lse, *(t.grad for t in leaves)), strict=True):
        torch.testing.assert_close(a.double(), b.detach().double(), atol=1e-5, rtol=1e-5)


def test_context_parallel_without_a_process_group_says_so() -> None:
    attn = compiled("causal")
    x = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        attn.context_parallel(x, x, x)
