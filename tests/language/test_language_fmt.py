"""`patc fmt` is a round trip: parse(fmt(x)) checks to the same IR as parse(x), fmt is idempotent, and
every comment survives in its order. For the spec's examples, hand-written edge cases and random files."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
from helpers import EXAMPLES, ROOT
from hypothesis import given
from hypothesis import strategies as st
from strategies import ATOMS, expressions, layout_wheres, neighborhoods

from patterndsl import ir
from patterndsl.check import check
from patterndsl.fmt import format_module
from patterndsl.parse import parse

SPEC_EXAMPLES = sorted(glob.glob(str(EXAMPLES / "*.pat")))
LIBRARY = sorted(glob.glob(str(ROOT / "patterns" / "*.pat")))


def _ir(text: str) -> ir.Program:
    return check(parse(text, "x.pat"), "x.pat")


def fmt(text: str) -> str:
    return format_module(parse(text, "x.pat"))


def _comments(text: str) -> list[str]:
    return re.findall(r"#[^\n]*", text)


def assert_round_trip(text: str) -> str:
    once = fmt(text)
    assert _ir(once) == _ir(text), f"fmt changed the meaning:\n{text}\n---\n{once}"
    assert fmt(once) == once, f"fmt is not idempotent:\n{once}\n---\n{fmt(once)}"
    assert [c.rstrip() for c in _comments(once)] == [c.rstrip() for c in _comments(text)], once
    return once


def test_spec_examples_exist() -> None:
    assert len(SPEC_EXAMPLES) >= 8


@pytest.mark.parametrize("path", SPEC_EXAMPLES + LIBRARY, ids=lambda p: f"{Path(p).parent.name}/{Path(p).name}")
def test_spec_example_and_library_file_round_trips(path: str) -> None:
    assert_round_trip(Path(path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", SPEC_EXAMPLES + LIBRARY, ids=lambda p: f"{Path(p).parent.name}/{Path(p).name}")
def test_spec_examples_and_library_are_already_canonical(path: str) -> None:
    """They are written the way `patc fmt` prints, so `patc fmt --check` passes on them."""
    text = Path(path).read_text(encoding="utf-8")
    assert fmt(text) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("pattern p = a | b | c\n", "pattern p = a | b | c\n"),
        ("pattern p = a | (b | c)\n", "pattern p = a | (b | c)\n"),
        ("pattern p = a & b & c | d\n", "pattern p = a & b & c | d\n"),
        ("pattern p = a - b - c\n", "pattern p = a - b - c\n"),
        ("pattern p = a - (b - c)\n", "pattern p = a - (b - c)\n"),
    ],
)  # fmt: skip
def test_chains_print_without_parentheses_the_user_did_not_write(text: str, canonical: str) -> None:
    assert format_module(parse(text, "x.pat")) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "let C = 4\npattern p = where((q // C) * C == k)\n",
        "pattern p = (causal | sink(2)) | window(1)\n",
        "pattern p = (causal & sink(2)) | window(1)\n",
        "pattern p = where((q % 4) == 0 and (k < 3))\n",
        "pattern p = window((3))\n",
        "pattern p = ((causal)) & (window(2))\n",
        "pattern p = where(-(q) < (2 ** 3) ** 2)\n",
        "param w = (8)\npattern p = global([(0), 1]) | rows((N // 2):)\n",
        "layout g = grid((4), 4)\npattern p = neighborhood(g, kernel=((3), 3))\n",
    ],
)  # fmt: skip
def test_parentheses_the_user_wrote_are_kept(text: str) -> None:
    """`(q // C) * C` stays as written: parentheses for a reader are not redundant to the reader."""
    assert assert_round_trip(text) == text


@st.composite
def parenthesized(draw: st.DrawFn) -> str:
    """A random expression with extra parentheses around some of its atoms and around itself."""
    src = draw(expressions(max_leaves=5))
    atom = r"\b(?:window|sink|global|rows|cols|stride|hops|random)\([^()]*\)|\b(?:causal|full|none)\b(?!\s*\()"
    parts = re.split(f"({atom})", src)
    out = [f"({p})" if k % 2 == 1 and p and draw(st.booleans()) else p for k, p in enumerate(parts)]
    text = "".join(out)
    return f"({text})" if draw(st.booleans()) else text


@given(src=parenthesized())
def test_fmt_keeps_every_parenthesis_and_adds_none(src: str) -> None:
    """The user's pairs survive and none is added: fmt changes only white space in expressions."""
    text = f"pattern p = {src}\n"
    once = assert_round_trip(text)
    assert once.replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize(
    "text",
    [
        "pattern p = window(3)|causal&sink(2)\n",
        "pattern p = (window(3) | causal) & sink(2)\n",
        "pattern p = window(3) - (causal - sink(2))\n",
        "pattern p = ~(window(3) & ~causal)\n",
        "pattern p = where(q - (k - 1) >= 2 ** 3 ** 1 and not (q % 3 == 1 or k < 2))\n",
        "pattern p = where(-q + -(-k) < 4 < N // 2)\n",
        "pattern p = rows(-4:) | cols(:3:2) | global([0, -1,]) | rows(N // 2 : N - 1)\n",
        "param f = 0.00001\npattern p = threshold(f * 10, block=16)\n",
        "param big = 1_000_000\npattern p = window(big // 100000)\n",
        "pattern p = topk(3, block=16, score=given) & causal\n",
        "layout g = grid(4, 4)\npattern p = neighborhood(g, kernel=(3,), dilation=1, causal=(true, false))\n".replace("(3,)", "(3, 3)"),
        "layout g = grid(8)\npattern p = neighborhood(g, kernel=(3,))\n",
        "# head\n\n# two\nparam w = 3 # trailing\n\n\nlet a = causal   # a\n# before p\npattern p = a & window(w)\n# end\n",
        "pattern moa = heads {  # moa\n  0:2 => causal # first\n  # own line\n  2:4 => full\n}\n# after\n",
        "pattern p = (causal  # c\n  | full # d\n  # own\n  & sink(2))  # e\n# tail\npattern r = full # z\n",
        "pattern moa = heads { 0:2 => causal # a\n 2:4 => full }  # b\n",
        "pattern moa = heads {\n    0:2 => causal\n    # last\n}  # after the brace\n# own\nlet a = full  # t\n",
        "model m = layers(6) {\n every 3 => causal\n 1:2 => heads {\n 0:1 => full\n 1:2 => none\n }\n else => window(1)\n}\n",
    ],
)  # fmt: skip
def test_edge_case_round_trips(text: str) -> None:
    assert_round_trip(text)


def test_fmt_is_canonical_for_messy_input() -> None:
    out = fmt("pattern   p=window( 3 )|causal&sink( 2 )   # c\n")
    assert out == "pattern p = window(3) | causal & sink(2)  # c\n"


# --- random files --------------------------------------------------------------------------------


@given(src=expressions(max_leaves=6))
def test_random_expression_round_trips(src: str) -> None:
    assert_round_trip(f"pattern p = {src}\n")


@given(case=st.one_of(neighborhoods(), layout_wheres()))
def test_random_layout_pattern_round_trips(case: tuple[str, int]) -> None:
    assert_round_trip(case[0])


comment_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(lambda s: "#" + s)


@st.composite
def files(draw: st.DrawFn) -> str:
    """A file of params, lets, patterns, heads and models, comments and blank lines sprinkled in."""
    lines: list[str] = []
    names: list[str] = []

    def sprinkle() -> None:
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(st.sampled_from(["", draw(comment_text), "   " + draw(comment_text)])))

    def trailing() -> str:
        return ("  " + draw(comment_text)) if draw(st.booleans()) else ""

    sprinkle()
    lines.append(f"param w = {draw(st.integers(0, 9))}{trailing()}")
    for k in range(draw(st.integers(1, 4))):
        sprinkle()
        kind = draw(st.sampled_from(["let", "pattern", "heads", "model"]))
        body = draw(ATOMS) if not names or draw(st.booleans()) else f"{draw(st.sampled_from(names))} & window(w)"
        name = f"x{k}"
        if kind in ("let", "pattern"):
            lines.append(f"{kind} {name} = {body}{trailing()}")
            names.append(name)
        elif kind == "heads":
            lines.append(f"pattern {name} = heads {{{trailing()}")
            sprinkle()
            lines.append(f"  0:2 => {body}{trailing()}")
            sprinkle()
            lines.append(f"  2:3 => causal{trailing()}")
            lines.append("}" + trailing())
        else:
            lines.append(f"model {name} = layers(4) {{{trailing()}")
            lines.append(f"    every 2 => {body}{trailing()}")
            sprinkle()
            lines.append(f"    else => causal{trailing()}")
            lines.append("}" + trailing())
    sprinkle()
    return "\n".join(lines) + "\n"


@given(files())
def test_random_file_round_trips_with_its_comments(text: str) -> None:
    assert_round_trip(text)


def test_patc_fmt_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patterndsl.cli import main as patc

    path = tmp_path / "a.pat"
    path.write_text("pattern p=causal # c\n", encoding="utf-8")
    assert patc(["fmt", "--check", str(path)]) == 1
    assert "would reformat" in capsys.readouterr().out
    assert patc(["fmt", str(path)]) == 0
    assert capsys.readouterr().out == "pattern p = causal  # c\n"
    assert path.read_text() == "pattern p=causal # c\n"  # printing does not write
    assert patc(["fmt", "-w", str(path)]) == 0
    assert path.read_text() == "pattern p = causal  # c\n"
    capsys.readouterr()
    assert patc(["fmt", "--check", str(path)]) == 0
    assert capsys.readouterr().out == ""
    path.write_text("pattern p = causl\n", encoding="utf-8")
    assert patc(["fmt", str(path)]) == 2  # never formats a file that does not check
    assert "did you mean 'causal'?" in capsys.readouterr().err
