"""The checker is the one place a file's rules live: names that where() binds cannot be redefined, long
flat chains of '|', '&', 'and', 'or' are fine, and what `patc check` accepts, `patc compile` compiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import LIBRARY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
        ("param qc10 = 1", 14, "a query coordinate"),  # grids have up to 16 axes
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


@pytest.mark.parametrize("name", ["kk", "q1", "qc", "kcx", "key", "query", "Q", "K", "qc1x", "qcd10"])
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
    assert "def allowed_0(i, j, N)" in compile_source(path).text
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


# --- check ok means compile ok ---------------------------------------------------------------------

COMPILE_RULES = {
    # language rules: every command refuses them
    "two_selector_blocks": (
        "let a = causal & topk(2, block=16)\npattern p = a | threshold(0.5, block=32)",
        (2, 17, 24), "the selectors of one pattern share one block size to compile: block=32 here, block=16 in the first",
        "write block=16",
    ),
    "two_selector_blocks_in_a_head": (
        "pattern p = heads {\n    0:1 => topk(1, block=16)\n    1:2 => topk(1, block=16) & topk(2, block=32)\n}",
        (3, 32, 17), "the selectors of one pattern share one block size to compile: block=32 here, block=16 in the first",
        None,
    ),
    "two_selector_blocks_in_a_model": (
        "model m = layers(2) {\n    else => topk(1, block=16) | topk(2, block=64)\n}",
        (2, 33, 17), "the selectors of one pattern share one block size to compile: block=64 here, block=16 in the first",
        None,
    ),
    "selector_block": (
        "pattern p = causal & topk(2, block=8)", (1, 36, 1),
        "a selector's block must be a multiple of 16 to compile (the kernel's smallest tile), got 8", "block=16",
    ),
    "threshold_block": (
        "pattern p = threshold(0.5, block=24)", (1, 34, 2),
        "a selector's block must be a multiple of 16 to compile (the kernel's smallest tile), got 24", "block=16",
    ),
    "model_head_counts": (
        "model m = layers(3) {\n    0:1 => heads {\n        0:4 => causal\n    }\n    else => heads {\n        0:2 => full\n    }\n}",
        (5, 13, 7), "model 'm' has heads blocks of 4 and 2 heads; its layers must agree", "same head count",
    ),
    "two_verticals": (
        "pattern p = causal & (vertical(3) | vertical(4))", (1, 37, 11),
        "a compiled pattern holds at most one vertical(...) (one selection per head), this one 2", "let v = vertical(3)",
    ),
    "slash_beside_topk": (
        "pattern p = causal & (slash(3) | topk(4, block=64))", (1, 34, 17),
        "topk and slash cannot share a pattern to compile", "heads",
    ),
    # kernel limits: masks and the analysis take these, `patc check` and `patc compile` do not
    "random_of_n": (
        "pattern p = blockwise(4, random(N // 2))", (1, 26, 14),
        "random(r, ...) compiles only when r is a number once params are set, not a function of N", "random(3)",
    ),
    "random_unrolled": (
        "param r = 17\npattern p = random(r, seed=1)", (2, 13, 17),
        "random(17, ...) draws more than 16 keys per row; the kernel unrolls the draw", "at most 16",
    ),
    "arithmetic_past_64_bits": (
        "pattern p = causal | where((q + 2 ** 61) * 4 < k)", (1, 22, 28),
        "the pattern's integer arithmetic does not fit 64 bits even at N = 1", "smaller",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(COMPILE_RULES))
def test_patc_check_refuses_what_compile_refuses(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patterndsl.cli import main as patc
    from patterndsl.compile import compile_source

    src, (line, col, length), message, hint = COMPILE_RULES[name]
    path = tmp_path / "t.pat"
    path.write_text(src + "\n")
    assert patc(["check", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}:{line}:{col}: error: {message}"
    assert err[2] == "  " + " " * (col - 1) + "^" + "~" * (length - 1)
    if hint is not None:
        assert hint in err[3]
    with pytest.raises(P.PatternError):
        compile_source(path)
    out = tmp_path / "m.py"
    assert patc(["compile", str(path), "-o", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == err
    assert not out.exists()


def _patc_check(path: Path) -> bool:
    import contextlib
    import io

    from patterndsl.cli import main as patc

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return patc(["check", str(path)]) == 0


def _compiles(path: Path, name: str | None = None) -> bool:
    """compile_source renders the module's text (no GPU). A token layout changes speed, never what
    compiles, and costs seconds on grids: left out here."""
    from patterndsl.compile import compile_source

    try:
        compile_source(path, name, layout=False)
    except P.PatternError:
        return False
    return True


_LEAVES = st.one_of(
    st.sampled_from(["causal", "full", "none", "hops(2)", "global(0:4)", "sink(2)", "stride(3)", "window(N // 4)"]),
    st.integers(0, 20).map(lambda r: f"window({r})"),
    st.tuples(st.integers(0, 20), st.integers(0, 3)).map(lambda t: f"random({t[0]}, seed={t[1]})"),
    st.sampled_from(["random(N // 4)", "blockwise(4, random(N // 2))", "blockwise(16, window(1) | random(3))"]),
    st.integers(55, 63).map(lambda e: f"where((q + 2 ** {min(e, 61)}) * {1 << (e - 55)} < k)"),
    st.integers(0, 62).map(lambda e: f"window(2 ** {e}, dilation=2 ** {62 - e})"),
    st.tuples(
        st.sampled_from(["topk(2, block={})", "threshold(0.5, block={})"]), st.sampled_from([8, 16, 24, 32, 64])
    ).map(lambda t: t[0].format(t[1])),
)
_EXPRESSIONS = st.recursive(
    _LEAVES,
    lambda inner: st.tuples(inner, st.sampled_from(["|", "&", "-"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    max_leaves=4,
)
_FILES = st.one_of(
    _EXPRESSIONS.map(lambda e: f"pattern p = {e}\n"),
    st.tuples(_EXPRESSIONS, _EXPRESSIONS).map(
        lambda t: f"pattern p = heads {{\n    0:1 => {t[0]}\n    1:3 => {t[1]}\n}}\n"
    ),
    st.tuples(_EXPRESSIONS, _EXPRESSIONS, st.integers(1, 3)).map(
        lambda t: f"model m = layers(4) {{\n    every {t[2]} => {t[0]}\n    else => {t[1]}\n}}\n"
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_FILES)
def test_check_ok_exactly_when_compile_ok(text: str, tmp_path: Path) -> None:
    path = tmp_path / "t.pat"
    path.write_text(text)
    assert _patc_check(path) == _compiles(path), text


def test_check_ok_and_compile_ok_on_every_library_pattern() -> None:
    files = sorted(LIBRARY.glob("*.pat"))
    assert len(files) >= 20
    for path in files:
        assert _patc_check(path), path
        for name in P.load(path).names():
            assert _compiles(path, name), (path, name)
