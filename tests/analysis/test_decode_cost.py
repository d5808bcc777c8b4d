"""The decode-step figures of `patc analyze --decode` against brute force over the last row."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import allowed
from strategies import exact_retention_patterns, expressions

from patterndsl import analyze, pattern
from patterndsl.analysis.decode_cost import decode_figures
from patterndsl.analysis.retention import decode_consistent

_PATTERNS = st.one_of(exact_retention_patterns(), expressions(max_leaves=3)).filter(
    lambda s: decode_consistent(pattern(s))[0]
)


@settings(max_examples=20)
@given(_PATTERNS, st.integers(1, 40), st.sampled_from([1, 4, 16]))
def test_a_decode_step_reads_the_blocks_of_the_last_rows_keys(src: str, n: int, block: int) -> None:
    p = pattern(src)
    row = np.array([allowed(p, n - 1, j, n) for j in range(n)], dtype=bool)
    blocks = {j // block for j in np.nonzero(row)[0]}
    (step,) = decode_figures(p, (n,), 8, 2, block)["steps"]
    assert step["keys"] == int(row.sum())
    assert step["keys_read"] == sum(min(block, n - b * block) for b in blocks)
    assert step["bytes_read"] == step["keys_read"] * 2 * 8 * 2


def test_streaming_llm_decodes_and_caches_the_same_at_every_length() -> None:
    a = analyze(pattern("causal & (window(1023) | sink(4))"), N=64, decode=True, block_size=(64, 64))
    steps = a["patterns"][0]["decode"]["steps"]
    assert [s["N"] for s in steps] == [1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22]
    assert {(s["keys"], s["retained_keys"], s["cache_bytes"]) for s in steps[1:]} == {(1028, 1027, 1088 * 512)}
    assert a.decode_consistent == (True, None)


def test_the_analysis_says_why_a_pattern_cannot_be_decoded() -> None:
    a = analyze(pattern("causal & window(N // 4)"), N=64, decode=True)
    assert a.decode_consistent == (False, "window(N // 4) is sized with N, so its rows change as the sequence grows")
    assert "steps" not in a["patterns"][0]["decode"]
