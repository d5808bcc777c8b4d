"""The checker is the one place a file's rules live: names that where() binds cannot be redefined, long
flat chains of '|', '&', 'and', 'or' are fine, and what `patc check` accepts, `patc compile` compiles."""

from __future__ import annotations

import pytest

import patterndsl as P

# --- the names where() binds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "length", "role"),
    [
        ("param k = 3\npattern p = where(q - k <= k) | window(k)", 11, "the key index"),
        ("param q = 3\npattern p = window(q)", 11, "the query index"),
        ("let k = causal\npattern p = k", 14, "the key index"),
        ("layout qc0 = grid(4, 4)\npattern p = full", 23, "a query coordinate"),
        ("pattern kc1 = causal", 20, "a key coordinate"),
        ("param kc7 = 1", 13, "a key coordinate"),
    ],
)
def test_index_names_cannot_be_defined(src: str, length: int, role: str) -> None:
    """`param k = 3` then `where(q - k <= k)` would read `k` as the key index in where() and as the param
    in window(k): the same name with two meanings, silently. The definition is refused instead."""
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    err = info.value
    name = src.split()[1]
    assert err.message == f"'{name}' is {role} inside where(...) and cannot be redefined"
    assert err.span is not None and (err.span.line, err.span.column, err.span.length) == (1, 1, length)
    assert err.hint is not None and "choose another name" in err.hint


@pytest.mark.parametrize("name", ["kk", "q1", "qc", "kcx", "key", "query", "Q", "K", "qc10"])
def test_names_near_the_index_names_are_fine(name: str) -> None:
    assert P.loads(f"param {name} = 3\npattern p = window({name})").params == ((name, 3),)
