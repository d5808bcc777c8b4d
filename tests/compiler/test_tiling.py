"""The tile builder (`patterndsl.tiling`) on numpy, as the analyser runs it without torch, against brute force
over (i, j) from the reference mask: every allowed pair lies in a listed tile, FULL tiles are entirely allowed,
no listed tile is empty, no tile is listed twice; its work budget stops it; on torch, building the kernels'
tables reads the device once per round, never once per boolean mask.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from strategies import expressions

import patterndsl as P
from patterndsl.analysis.limits import Budget, OverBudget
from patterndsl.blocks import bound_predicate
from patterndsl.mask import dense_mask
from patterndsl.source import PatternError
from patterndsl.tiling import full_tiles, tiling


def _check(src: str, n: int, bq: int, bk: int) -> None:
    body = P.pattern(src)
    mask = dense_mask(body, n)
    t = tiling(bound_predicate(body, n), n, bq, bk)
    fq, fk = full_tiles(t)
    full = list(zip(fq.tolist(), fk.tolist(), strict=True))
    part = list(zip(t.part_q.tolist(), t.part_k.tolist(), strict=True))
    assert len(set(full + part)) == len(full) + len(part), "a tile is listed twice"
    full_set, part_set = set(full), set(part)
    for qb in range(-(-n // bq)):
        for kb in range(-(-n // bk)):
            tile = mask[qb * bq : (qb + 1) * bq, kb * bk : (kb + 1) * bk]
            if (qb, kb) in full_set:
                assert tile.all(), f"FULL tile ({qb}, {kb}) has a disallowed pair"
            elif (qb, kb) in part_set:
                assert tile.any() and not tile.all(), f"PARTIAL tile ({qb}, {kb}) is empty or full"
            else:
                assert not tile.any(), f"tile ({qb}, {kb}) holds allowed pairs but is not listed"
    assert t.visited == len(full) + len(part)


@settings(max_examples=30, deadline=None)
@example(src="causal | random(N // 3, seed=2)", n=1, bq=1, bk=1)  # no draws at all: r is 0 at N = 1
@given(src=expressions(max_leaves=3), n=st.integers(1, 90), bq=st.sampled_from([1, 4, 16, 32]),
       bk=st.sampled_from([1, 8, 16, 64]))  # fmt: skip
def test_tiles_are_exactly_the_allowed_ones(src: str, n: int, bq: int, bk: int) -> None:
    try:
        P.pattern(src)
        dense_mask(P.pattern(src), n)
    except PatternError:
        assume(False)
    _check(src, n, bq, bk)


@pytest.mark.parametrize("src", [
    "window(9) | random(3, seed=1)",  # the draws enumerated into tiles
    "causal & blockwise(16, hops(2) | window(1) | random(2, seed=4))",  # asked on the pattern's block grid
    "(causal & window(40)) | stride(37)",
])  # fmt: skip
def test_shortcuts_keep_the_tiles_exact_at_kernel_tile_sizes(src: str) -> None:
    _check(src, 700, 128, 64)


def test_budget_stops_the_subdivision() -> None:
    pred = bound_predicate(P.pattern("causal & window(100)"), 1 << 16)
    with pytest.raises(OverBudget):
        tiling(pred, 1 << 16, 16, 16, spend=lambda count, _: Budget(50).spend(count) if count > 40 else None)


def test_kernel_tables_read_the_device_once_per_round() -> None:
    """On a GPU each boolean-mask index, nonzero, item or tolist waits for the device: a build takes one per
    round of the quad tree and of refinement, plus a few for the sizes of its outputs."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    from patterndsl.runtime import tables as T

    class Reads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.masks = self.scalars = 0

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = getattr(func, "__name__", "")
            if name in ("__getitem__", "__setitem__"):
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                self.masks += any(torch.is_tensor(x) and x.dtype == torch.bool for x in index)
            self.scalars += name in ("nonzero", "item", "tolist", "__int__", "__bool__", "__index__")
            return func(*args, **(kwargs or {}))

    spec = P.compile("pattern p = (causal & window(300)) | global(0:16)\n").spec
    with Reads() as reads:
        T.block_tables(spec, 8000, 128, 64, "cpu")
    levels = (-(-8000 // 64) - 1).bit_length() + 1
    assert reads.masks == 0 and reads.scalars <= levels + 14 + 4, (reads.masks, reads.scalars)
