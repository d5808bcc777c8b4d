"""The checker is the one place a file's rules live: names that where() binds cannot be redefined, long
flat chains of '|', '&', 'and', 'or' are fine, and what `patc check` accepts, `patc compile` compiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


# --- long flat chains ------------------------------------------------------------------------------

TERMS = 1000


def _chain(op: str, term: str, count: int = TERMS) -> str:
    return f" {op} ".join(term.format(t=t) for t in range(count))


@pytest.mark.parametrize(
    ("src", "same_as"),
    [
        (f"pattern p = {_chain('|', 'where(q - k == {t})')}", "causal"),
        (f"pattern p = {_chain('&', 'window({t})')}", "window(0)"),
        (f"pattern p = where({_chain('or', 'q - k == {t}')})", "causal"),
        (f"pattern p = where({_chain('and', 'q != {t} + 64')})", "full"),
        (
            f"pattern p = full & ({_chain('|', 'where(q - k == {t})')}) & where({_chain('and', 'k != {t} + 64')})",
            "causal",
        ),
    ],
    ids=["union", "intersection", "or", "and", "nested"],
)
def test_a_flat_chain_of_a_thousand_terms_means_what_it_says(src: str, same_as: str) -> None:
    from patterndsl.mask import dense_mask

    body = P.loads(src).patterns[0].body
    np.testing.assert_array_equal(dense_mask(body, 48), dense_mask(P.pattern(same_as), 48))


def test_a_thousand_term_union_runs_through_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patterndsl.cli import main as patc
    from patterndsl.compile import compile_source

    src = f"pattern p = causal & ({_chain('|', 'where(q - k == {t} * 2)')})\n"
    path = tmp_path / "u.pat"
    path.write_text(src)
    assert patc(["check", str(path)]) == 0
    assert patc(["mask", str(path), "-N", "40", "-o", str(tmp_path / "m.npy")]) == 0
    assert patc(["show", str(path), "-N", "40"]) == 0
    assert patc(["analyze", str(path), "-N", "40"]) == 0
    assert "def _allowed_0(i, j, N)" in compile_source(path).text
    assert "Traceback" not in capsys.readouterr().err


def test_a_chain_keeps_the_message_of_its_first_bad_pair() -> None:
    """Operands are combined left to right, as before: the first mismatch is reported, at its pair."""
    src = "pattern p = causal | window(1) | 3 | full | where(q < 1)"
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    err = info.value
    assert err.message == "'|' cannot combine a pattern and an integer"
    assert err.span is not None and (err.span.column, err.span.length) == (13, 22)


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("pattern p = " + "~" * 300 + "causal", "expression nested more than 200 levels deep"),
        ("pattern p = " + "(causal | " * 300 + "full" + ")" * 300, "expression nested more than 200 levels deep"),
        ("pattern p = sink(" + " + ".join(["1"] * 300) + ")", "more than 200 operations chained with '+'"),
        ("pattern p = full" + " - window(1)" * 300, "more than 200 operations chained with '-'"),
        (
            "pattern p = sink(" + " * ".join(["1"] * 150) + " // 1" * 100 + ")",
            "more than 200 operations chained with '*', '//'",
        ),
    ],
    ids=["tilde", "parenthesised", "sum", "difference", "product"],
)
def test_limits_speak_of_what_the_user_wrote(src: str, message: str) -> None:
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    assert info.value.message == message
    assert info.value.span is not None and info.value.span.line == 1
