"""`permute(B, segment=s, by=given)` in a `.pat` file: what the checker accepts (the body, in the permuted
order, and the segment on the pattern's definition), each misuse as `file:line:col: error:` with its caret
and hint from `patc check` and `compile` alike, and the canonical text."""

from __future__ import annotations

from pathlib import Path

import pytest

import patterndsl as P
from patterndsl import ir
from patterndsl.cli import main as patc
from patterndsl.fmt import format_module
from patterndsl.parse import parse

PBS = "param s = 64\npattern far = permute(causal & (window(3) | topk(2, block=16)), segment=s, by=given)\n"


def test_the_body_and_segment_are_the_patterns() -> None:
    program = P.loads(PBS, "t.pat")
    (pdef,) = program.patterns
    assert pdef.permute is not None and pdef.permute.segment == 64
    assert pdef.body == P.pattern("causal & (window(3) | topk(2, block=16))")
    assert P.loads("pattern p = causal\n").patterns[0].permute is None


def test_the_canonical_text_keeps_it() -> None:
    text = format_module(parse("pattern  far=permute( causal ,segment = 64, by=given )\n", "t.pat"))
    assert text == "pattern far = permute(causal, segment=64, by=given)\n"
    assert P.loads(text).patterns[0].permute == ir.Permute(64)


MISUSE = {
    "inside_an_expression": (
        "pattern p = causal | permute(causal, segment=4, by=given)\n", 1, 22,
        "permute(...) must be the whole right side of a pattern", "pattern name = permute(P",
    ),
    "in_a_let": (
        "let x = permute(causal, segment=4, by=given)\n", 1, 9,
        "permute(...) must be the whole right side of a pattern", "pattern name = permute(P",
    ),
    "by_not_given": (
        "pattern p = permute(causal, segment=4, by=causal)\n", 1, 43,
        "permute's by can only be 'given'", "permutation=perm",
    ),
    "no_segment": ("pattern p = permute(causal, by=given)\n", 1, 13, "permute needs segment=...", "segment=256"),
    "no_by": ("pattern p = permute(causal, segment=8)\n", 1, 13, "permute needs by=...", "by=given"),
    "segment_zero": ("pattern p = permute(causal, segment=0, by=given)\n", 1, 37,
                     "permute's segment must be at least 1, got 0", None),
    "segment_with_n": ("pattern p = permute(causal, segment=N // 4, by=given)\n", 1, 37,
                       "permute's segment must be a constant", None),
    "body_not_a_pattern": ("pattern p = permute(3, segment=4, by=given)\n", 1, 21,
                           "permute's first argument must be a pattern, not an integer", None),
    "used_again": (
        "pattern a = permute(causal, segment=4, by=given)\npattern b = a | window(1)\n", 2, 13,
        "'a' is a permuted pattern and cannot be used in another pattern or a model", "name its body with a let",
    ),
    "in_a_model": (
        "pattern a = permute(causal, segment=4, by=given)\nmodel m = layers(2) { else => a }\n", 2, 31,
        "'a' is a permuted pattern", None,
    ),
    "in_heads": (
        "pattern p = heads { 0:2 => permute(causal, segment=4, by=given) }\n", 1, 28,
        "permute(...) must be the whole right side of a pattern", None,
    ),
    "redefined": ("let permute = causal\n", 1, 1, "'permute' is a built-in name and cannot be redefined", None),
}


@pytest.mark.parametrize("name", sorted(MISUSE))
def test_misuse_is_pointed_at_by_check_and_compile(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, line, col, message, hint = MISUSE[name]
    monkeypatch.chdir(tmp_path)
    Path("t.pat").write_text(src, encoding="utf-8")
    assert patc(["check", "t.pat"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"t.pat:{line}:{col}: error: {message}"), err
    assert err[1] == "  " + src.splitlines()[line - 1] and err[2].index("^") == col + 1, err
    if hint is not None:
        assert err[3].startswith("  hint: ") and hint in err[3], err
    assert "Traceback" not in "\n".join(err)
    with pytest.raises(P.PatternError) as info:  # compile refuses what check refuses, with the same words
        P.compile(Path("t.pat"))
    assert info.value.render().splitlines()[0] == err[0]


def test_check_accepts_what_compile_compiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pbs.pat"
    path.write_text(PBS, encoding="utf-8")
    assert patc(["check", str(path)]) == 0
    assert "far (dynamic, permuted in segments of 64)" in capsys.readouterr().out
    attn = P.compile(path)
    assert attn.spec.permute == 64
    assert attn.spec.predicates[0].expr == P.compile("pattern p = causal & window(3)\n").spec.predicates[0].expr
