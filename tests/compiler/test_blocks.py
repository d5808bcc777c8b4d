"""Block tables against the dense reference mask: every allowed pair lies in a listed tile, FULL tiles
are entirely allowed, no listed tile is empty, and the transposed tables list the same tiles.

Patterns are hypothesis-drawn source text (the language tests' strategy), N is rarely a multiple of
the block sizes.
"""

from __future__ import annotations

import pytest
from helpers import assert_tables_match_mask
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import expressions

import patterndsl as P
from patterndsl.blocks import block_tables
from patterndsl.mask import dense_mask
from patterndsl.source import PatternError

torch = pytest.importorskip("torch")


@settings(max_examples=60)
@given(src=expressions(max_leaves=3), n=st.integers(1, 100), bq=st.sampled_from([1, 4, 16, 32]),
       bk=st.sampled_from([1, 8, 16, 64]))  # fmt: skip
def test_tables_cover_exactly_the_allowed_tiles(src: str, n: int, bq: int, bk: int) -> None:
    body = P.pattern(src)
    try:
        mask = dense_mask(body, n)
    except PatternError:
        assume(False)
        return
    assert_tables_match_mask(mask, block_tables(body, n, bq, bk))


LIBRARY = [
    "causal & (window(30) | sink(4))",
    "window(12) | global(0:5)",
    "window(8, dilation=4)",
    "causal & blockwise(8, hops(2) | window(1))",
    "blockwise(16, window(1) | global(0:2) | random(3, seed=0))",
    "causal & hops(2)",
    "causal & (window(15) | stride(16))",
]


@pytest.mark.parametrize("src", LIBRARY)
@pytest.mark.parametrize("n", [1, 17, 200])
def test_library_tables_match_mask(src: str, n: int) -> None:
    body = P.pattern(src)
    assert_tables_match_mask(dense_mask(body, n), block_tables(body, n, 32, 16))


def test_blockwise_random_is_exact_when_kernel_block_is_pattern_block() -> None:
    body = P.pattern("blockwise(16, window(1) | global(0:2) | random(3, seed=0))")
    t = block_tables(body, 300, 16, 16)
    assert t.partial.nnz == 0  # every tile is decided exactly (the ragged last one counts its real pairs)


def test_tables_are_cached_per_arguments() -> None:
    body = P.pattern("causal & window(40)")
    assert block_tables(body, 500, 32, 32) is block_tables(body, 500, 32, 32)
    assert block_tables(body, 500, 32, 32) is not block_tables(body, 501, 32, 32)


def test_sliding_window_tables_grow_with_listed_tiles_not_n_squared() -> None:
    body = P.pattern("causal & window(1023)")
    t = block_tables(body, 1 << 18, 128, 64)
    assert t.full.nnz + t.partial.nnz < 20 * t.q_blocks
    assert t.nbytes() < 1 << 20


def test_heads_body_is_refused_with_a_clear_error() -> None:
    program = P.loads("pattern h = heads {\n 0:2 => causal\n 2:4 => full\n}\n")
    with pytest.raises(TypeError, match="per head range"):
        block_tables(program.patterns[0].body, 64, 16, 16)  # type: ignore[arg-type]
