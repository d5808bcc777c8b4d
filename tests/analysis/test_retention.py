"""Decode consistency and retained keys (analysis.retention) against brute force over (i, j)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import allowed, reference_mask
from strategies import exact_retention_patterns, expressions

from patterndsl import loads, pattern
from patterndsl.analysis.retention import decode_consistent, inconsistent_patterns, retention

HORIZON = 64  # future queries brute force looks at: past every reach the strategies draw (x3 under blockwise)


def _needed(src: str, n: int) -> np.ndarray:
    """Brute force: keys j < n that some query n <= i < n + HORIZON allows (the pattern at n + HORIZON)."""
    p, big = pattern(src), n + HORIZON
    return np.array([any(allowed(p, i, j, big) for i in range(n, big)) for j in range(n)], dtype=bool)


def _kept(src: str, n: int) -> np.ndarray:
    keep = np.zeros(n, dtype=bool)
    for a, b in retention(pattern(src)).intervals(n):
        keep[a:b] = True
    return keep


@settings(max_examples=20)
@given(expressions(max_leaves=3), st.integers(1, 12), st.integers(1, 6))
def test_decode_consistent_rows_do_not_change_as_the_sequence_grows(src: str, n: int, more: int) -> None:
    ok, why = decode_consistent(pattern(src))
    assert ok == (why is None)
    if ok:
        assert np.array_equal(reference_mask(pattern(src), n + more)[:n, :n], reference_mask(pattern(src), n))


@settings(max_examples=50)
@given(expressions(max_leaves=3), st.integers(1, 16))
def test_every_key_a_future_query_reaches_is_retained(src: str, n: int) -> None:
    if decode_consistent(pattern(src))[0]:
        assert not (_needed(src, n) & ~_kept(src, n)).any(), retention(pattern(src)).text()


@settings(max_examples=40)
@given(exact_retention_patterns(), st.integers(1, 16))
def test_retained_keys_are_exact_for_windows_sinks_and_token_ranges(src: str, n: int) -> None:
    assert np.array_equal(_kept(src, n), _needed(src, n)), retention(pattern(src)).text()


def test_streaming_llm_keeps_the_sinks_and_the_window_at_any_length() -> None:
    r = retention(pattern("causal & (window(1023) | sink(4))"))
    for n in (1, 4, 1000, 10**6, 10**15):
        want = [(0, 4), (n - 1023, n)] if n > 1027 else [(0, n)]
        assert r.intervals(n) == want
    assert r.count(10**15) == 1027
    assert r.max_pages(64, 64) is not None and r.text() == "the first 4; the last 1023"


def test_blockwise_windows_keep_whole_blocks() -> None:
    r = retention(pattern("causal & blockwise(64, window(2))"))
    assert r.intervals(1000) == [(64 * (1000 // 64 - 2), 1000)] and r.alignment() == 64


@pytest.mark.parametrize("src", ["causal", "causal & hops(2)", "causal & stride(128)", "causal & (window(3) | topk(2, block=16))"])
def test_patterns_that_reach_every_key_again_keep_all(src: str) -> None:
    r = retention(pattern(src))
    assert r.keeps_all and r.count(10**9) == 10**9 and r.max_pages(64, 64) is None


@pytest.mark.parametrize(
    ("src", "reads"),
    [
        ("causal & window(N // 4)", "window(N // 4) is sized with N"),
        ("sink(N // 8)", "sink(N // 8) is sized with N"),
        ("global(-4:)", "counted from the end"),
        ("cols([0, -1])", "counted from the end"),
        ("random(2, seed=1)", "draws each row's keys from N"),
        ("causal & where(k >= N - 8)", "reads N"),
        ("blockwise(N // 8 + 1, window(1))", "sized with N"),
    ],
)
def test_patterns_that_read_n_are_named_with_the_construct(src: str, reads: str) -> None:
    ok, why = decode_consistent(pattern(src))
    assert not ok and why is not None and reads in why


def test_layouts_heads_and_models_are_decided_per_part() -> None:
    program = loads(
        "layout g = grid(4, 4)\n"
        "pattern local = neighborhood(g, kernel=3)\n"
        "pattern fine = causal & (window(8) | sink(2) | cols(0:4))\n"
        "pattern mixed = heads {\n  0:2 => causal\n  2:4 => causal & window(N // 2)\n}\n"
        "model m = layers(3) {\n  every 2 => causal\n  else => random(1)\n}\n"
    )
    found = dict(inconsistent_patterns(program))
    assert set(found) == {"local", "mixed", "m"}
    assert "fixes N = 16" in found["local"] and found["mixed"].startswith("heads 2:4: ")
    assert found["m"].startswith("layer 1: ")
    assert decode_consistent(program.get("fine"))  == (True, None)  # type: ignore[arg-type]


def test_heads_keep_the_union_of_their_keys_and_blocks_say_so() -> None:
    program = loads("pattern p = heads {\n  0:1 => causal & window(3)\n  1:2 => causal & sink(2) | cols([9])\n}\n")
    assert retention(program.patterns[0].body).text() == "the first 2; key 9; the last 3"
    r = retention(pattern("blockwise(64, causal & window(2))"))
    assert r.text() == "the current block of 64 and the 128 keys before it"
