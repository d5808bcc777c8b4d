"""Every kind of mistake in a `.pat` file: the exact message, where it points (line:col and caret), the
hint, and that `patc` prints it to stderr with exit status 2 and never a traceback. Then fuzzing: random
bytes and random token soup only ever raise PatternError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterndsl as P
from patterndsl.cli import main as patc
from patterndsl.fmt import format_module
from patterndsl.mask import dense_mask
from patterndsl.parse import parse
from patterndsl.source import SHOWN_LINE, PatternError


@dataclass(frozen=True)
class Case:
    src: str
    line: int
    col: int
    length: int  # of the caret underline
    message: str
    hint: str | None = None  # a substring of the hint line (None: not checked)


def _expected_lines(case: Case, path: str) -> list[str]:
    source_line = case.src.splitlines()[case.line - 1]
    length = case.length
    if len(source_line) > SHOWN_LINE:  # the cases' long lines err near their start: the first SHOWN_LINE shown
        assert case.col <= SHOWN_LINE // 3
        source_line = source_line[:SHOWN_LINE] + "..."
        length = min(length, len(source_line) - case.col + 1)
    return [
        f"{path}:{case.line}:{case.col}: error: {case.message}",
        f"  {source_line}",
        "  " + " " * (case.col - 1) + "^" + "~" * (length - 1),
    ]


def _assert_rendered(text: str, case: Case, path: str) -> None:
    lines = text.rstrip("\n").splitlines()
    assert lines[:3] == _expected_lines(case, path), text
    assert len(lines) <= 4 and all(line.startswith("  hint: ") for line in lines[3:]), text
    if case.hint is not None:
        assert len(lines) == 4 and lines[3].startswith("  hint: ") and case.hint in lines[3], text
    assert "Traceback" not in text


HEADS = "pattern p = heads {\n    0:4 => causal\n"

CHECK_ERRORS: dict[str, Case] = {
    # syntax
    "unclosed_call": Case("pattern p = window(3", 1, 21, 1, "unexpected end of file", "expected ')', ',', ':'"),
    "extra_paren": Case("pattern p = window(3))", 1, 22, 1, "unexpected ')'", "expected 'layout', 'let'"),
    "doubled_operator": Case("pattern p = causal && full", 1, 21, 1, "unexpected '&'", "expected '('"),
    "single_slash": Case("pattern p = where(q / 2 == k)", 1, 21, 1, "unexpected character '/'", "integer division is '//'"),
    "string": Case("param w = 'x'", 1, 11, 1, "unexpected character \"'\"", "no strings"),
    "juxtaposed": Case("pattern p = window(3) causal", 1, 23, 6, "unexpected 'causal'", "expected"),
    "missing_arrow": Case(HEADS + "    4:8 full\n}", 3, 9, 4, "unexpected 'full'", "'=>'"),
    "dangling_union": Case("\n\npattern p = causal |\n", 3, 21, 1, "unexpected end of file", "a name"),
    "semicolon": Case("pattern p = causal\n  ; pattern q = full", 2, 3, 1, "unexpected character ';'", "no separator"),
    "non_ascii": Case("pattern p = cau\u00e9sal", 1, 16, 1, "unexpected character '\u00e9'", "names are ASCII letters"),
    "bang": Case("pattern p = causal ! full", 1, 20, 1, "unexpected character '!'", "'~' for patterns"),
    "huge_literal": Case("pattern p = sink(99999999999999999999)", 1, 18, 20, "integer literal is too large", "2**62"),
    "huge_long_literal": Case("pattern p = sink(" + "9" * 5000 + ")", 1, 18, 5000, "integer literal is too large", "2**62"),
    "huge_power": Case("pattern p = sink(2 ** 70)", 1, 23, 2, "an exponent above 64 is not supported"),
    "huge_value": Case("param a = 2 ** 40\npattern p = sink(a * a)", 2, 18, 5, "the value 1208925819614629174706176 is too large", "2**62"),
    "huge_float": Case("param a = 1e999", 1, 11, 5, "number literal is too large", "finite"),
    # unknown names, did you mean
    "unknown_function": Case("pattern p = windw(3)", 1, 13, 8, "unknown function 'windw'", "did you mean 'window'?"),
    "unknown_global": Case("pattern p = globl(0:4)", 1, 13, 10, "unknown function 'globl'", "did you mean 'global'?"),
    "unknown_name": Case("pattern p = cusal", 1, 13, 5, "unknown name 'cusal'", "did you mean 'causal'?"),
    "unknown_let": Case("let local = causal\npattern p = locl & window(2)", 2, 13, 4, "unknown name 'locl'", "did you mean 'local'?"),
    "q_outside_where": Case("pattern p = q", 1, 13, 1, "'q' exists only inside where(...)", "where(q % 64 == 0)"),
    "coordinate_without_layout": Case("pattern p = where(qc0 == 1)", 1, 19, 3, "'qc0' needs a layout", "layout my_grid"),
    "coordinate_axis": Case("layout g = grid(4, 8)\npattern p = where(g, qc2 == 1)", 2, 22, 3, "'qc2': layout 'g' has 2 axes (0..1)"),
    # argument count and type
    "missing_argument": Case("pattern p = stride()", 1, 13, 8, "stride is missing its argument 'step'", "stride(step)"),
    "too_many_arguments": Case("pattern p = window(1, 2, 3, 4)", 1, 26, 1, "window takes at most 2 positional arguments, got 4", "signature: window(before=..., after=..., dilation=...)"),
    "one_too_many": Case("pattern p = sink(1, 2)", 1, 21, 1, "sink takes at most 1 positional argument, got 2", "sink(count)"),
    "pattern_for_int": Case("pattern p = window(causal)", 1, 20, 6, "window's size must be an integer, not a pattern"),
    "float_for_int": Case("pattern p = sink(1.5)", 1, 18, 3, "sink's count must be an integer, not a number"),
    "pattern_for_tokens": Case("pattern p = global(causal)", 1, 20, 6, "global takes a token set, not a pattern", "0:16"),
    "int_as_pattern": Case("pattern p = 3", 1, 13, 1, "the right side of 'pattern p =' must be a pattern, not an integer"),
    "int_in_union": Case("pattern p = causal & where(q < k) | window(3) & 4", 1, 37, 13, "'&' cannot combine a pattern and an integer"),
    "or_of_patterns": Case("pattern p = where(q == k) & causal or full", 1, 13, 30, "'or' combines conditions; combine patterns with '|'"),
    "bare_window": Case("pattern p = window", 1, 13, 6, "'window' needs arguments", "window(256)"),
    "causal_called": Case("pattern p = causal(3)", 1, 13, 9, "'causal' takes no arguments", "write it bare"),
    "compare_outside_where": Case("pattern p = causal & (3 < 4)", 1, 23, 5, "comparisons belong inside where(...)"),
    "two_conditions": Case("pattern p = where(q < k, 3)", 1, 19, 5, "where takes one condition; with two arguments the first is a layout", "and"),
    "where_assign": Case("pattern p = where(q = k)", 1, 19, 5, "where takes no keyword arguments", "'=='"),
    "layout_not_grid": Case("layout g = window(3)", 1, 12, 9, "a layout must be grid(n1, ..., nk)", "grid(64, 64)"),
    "grid_axes": Case("layout g = grid(" + ", ".join(["2"] * 17) + ")", 1, 12, 55, "grid takes 1 to 16 axis lengths, not 17"),
    "grid_extra_negative": Case("layout g = grid(4, prefix=-1)", 1, 27, 2, "grid's prefix must be at least 0, got -1"),
    "grid_extra_unknown": Case("layout g = grid(4, before=2)", 1, 20, 8, "grid has no argument 'before'", "prefix=226"),
    "layout_part_unknown": Case("layout g = grid(4)\npattern p = global(g.middle)", 2, 20, 8, "a layout has no part 'middle'", "g.prefix or g.suffix"),
    "layout_part_of_int": Case("param w = 3\npattern p = global(w.prefix)", 2, 20, 8, "'w.prefix': 'w' is an integer, not a layout"),
    "log2_two_arguments": Case("pattern p = where(log2(q, k) > 1)", 1, 27, 1, "log2 takes at most 1 positional argument, got 2", "log2(x)"),
    "neighborhood_of_pattern": Case("pattern p = neighborhood(causal, kernel=3)", 1, 26, 6, "neighborhood's first argument must be a layout, not a pattern"),
    "kernel_axes": Case("layout g = grid(4, 4)\npattern p = neighborhood(g, kernel=(3, 3, 3))", 2, 36, 9, "kernel has 3 values but the layout has 2 axes"),
    "selector_in_blockwise": Case("pattern p = blockwise(4, topk(2, block=16))", 1, 26, 17, "topk cannot be used inside blockwise", "block="),
    "slash_in_blockwise": Case("pattern p = blockwise(4, slash(2))", 1, 26, 8, "slash cannot be used inside blockwise"),
    "vertical_fraction": Case("pattern p = causal & vertical(0.5)", 1, 31, 3, "vertical's count is a whole number of columns, got 0.5", "vertical(1000)"),
    "vertical_of_n": Case("pattern p = causal & vertical(N // 8)", 1, 31, 6, "vertical's count must be a number once params are set, not a function of N", "vertical(1000)"),
    "slash_zero_last": Case("pattern p = causal & slash(4, last=0)", 1, 36, 1, "slash's last must be at least 1, got 0"),
    "vertical_bare": Case("pattern p = causal & vertical", 1, 22, 8, "'vertical' needs arguments", "vertical(1000, last=64)"),
    # unknown keyword arguments
    "unknown_keyword": Case("pattern p = window(3, foo=2)", 1, 23, 5, "window has no argument 'foo'", "signature: window("),
    "misspelt_keyword": Case("pattern p = window(3, dilaton=2)", 1, 23, 9, "window has no argument 'dilaton'", "did you mean 'dilation'?"),
    "misspelt_seed": Case("pattern p = random(3, sed=1)", 1, 23, 5, "random has no argument 'sed'", "did you mean 'seed'?"),
    "keyword_twice": Case("pattern p = window(3, dilation=1, dilation=2)", 1, 35, 10, "argument 'dilation' given twice"),
    "positional_after_keyword": Case("pattern p = window(before=1, 2)", 1, 30, 1, "positional argument after a keyword argument", "positional arguments first"),
    # out of range
    "negative_window": Case("pattern p = window(-1)", 1, 13, 10, "window's size (before) must be at least 0, got -1"),
    "negative_after": Case("pattern p = window(2, -1)", 1, 13, 13, "window's size (after) must be at least 0, got -1"),
    "zero_dilation": Case("pattern p = window(3, dilation=0)", 1, 13, 21, "window's dilation must be at least 1, got 0"),
    "zero_stride": Case("pattern p = stride(0)", 1, 13, 9, "stride must be at least 1, got 0"),
    "zero_slice_step": Case("pattern p = rows(0:10:0)", 1, 18, 6, "a slice step must be at least 1, got 0"),
    "hops_base": Case("pattern p = hops(1)", 1, 18, 1, "hops' base must be at least 2, got 1"),
    "zero_block": Case("pattern p = blockwise(0, full)", 1, 13, 18, "blockwise's block size must be at least 1, got 0"),
    "zero_divisor": Case("pattern p = where(q % 0 == 1)", 1, 23, 1, "the right side of '%' must be positive, got 0"),
    "zero_grid": Case("layout g = grid(0, 4)", 1, 17, 1, "a grid axis length must be at least 1, got 0"),
    "kernel_too_large": Case("layout g = grid(4, 8)\npattern p = neighborhood(g, kernel=(5, 3))", 2, 36, 6, "kernel 5 is larger than axis 0 (length 4)", "at least kernel positions"),
    "kernel_too_large_dilated": Case(
        "layout g = grid(4, 8)\npattern p = neighborhood(g, kernel=3, dilation=2)", 2, 36, 1,
        "kernel 3 does not fit axis 0: length 4 with dilation 2 leaves 2 positions per dilation group",
    ),
    "neighborhood_dilation": Case("layout g = grid(4, 4)\npattern p = neighborhood(g, kernel=3, dilation=0)", 2, 48, 1, "dilation must be at least 1, got 0 on axis 0"),
    "neighborhood_stride": Case("layout g = grid(4, 4)\npattern p = neighborhood(g, kernel=3, stride=(1, 0))", 2, 46, 6, "stride must be at least 1, got 0 on axis 1"),
    "threshold_mass": Case("pattern p = threshold(1.5, block=8)", 1, 23, 3, "threshold's mass must be in (0, 1], got 1.5"),
    # heads and models
    "heads_overlap": Case(HEADS + "    3:8 => full\n}", 3, 5, 3, "head range 3:8 overlaps heads 3:4 of another range", "exactly once"),
    "heads_gap": Case(HEADS + "    5:8 => full\n}", 3, 5, 3, "heads 4:5 have no pattern (a gap before this range)", "exactly once"),
    "heads_not_from_zero": Case("pattern p = heads {\n    1:4 => causal\n}", 2, 5, 3, "heads 0:1 have no pattern (a gap before this range)"),
    "heads_empty_range": Case(HEADS + "    4:4 => full\n}", 3, 5, 3, "empty head range 4:4", "stop must exceed"),
    "model_gap": Case("model m = layers(4) {\n    0:2 => causal\n}", 1, 1, 21, "model 'm' gives no pattern to layers 2, 3", "else"),
    "model_range": Case("model m = layers(4) {\n    0:6 => causal\n    else => full\n}", 2, 5, 3, "layer range 0:6 goes past the model's 4 layers"),
    # definitions
    "cycle": Case("let a = b\nlet b = c\nlet c = a\npattern p = a", 1, 1, 9, "cycle in definitions: a -> b -> c -> a", "itself"),
    "self_cycle": Case("let a = a | causal\npattern p = a", 1, 1, 18, "cycle in definitions: a -> a"),
    "use_before_definition": Case("pattern p = window(w)\nparam w = 3", 1, 20, 1, "'w' is used before it is defined (line 2)", "move the definition"),
    "defined_twice": Case("pattern p = causal\npattern p = full", 2, 1, 16, "'p' is defined twice (first at line 1)"),
    "param_and_let": Case("param w = 3\nlet w = causal", 2, 1, 14, "'w' is defined twice (first at line 1)"),
    "reserved_keyword": Case("let and = causal", 1, 1, 16, "'and' is a keyword and cannot be redefined", "another name"),
    "reserved_builtin": Case("let window = full", 1, 1, 17, "'window' is a built-in name and cannot be redefined"),
    "reserved_n": Case("pattern N = causal", 1, 1, 18, "'N' is a built-in name and cannot be redefined"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CHECK_ERRORS))
def test_check_error_message_points_at_the_mistake(name: str) -> None:
    case = CHECK_ERRORS[name]
    with pytest.raises(P.PatternError) as info:
        P.loads(case.src, "t.pat")
    _assert_rendered(info.value.render(), case, "t.pat")


@pytest.mark.parametrize("name", sorted(CHECK_ERRORS))
def test_patc_check_prints_the_error_and_exits_2(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CHECK_ERRORS[name]
    monkeypatch.chdir(tmp_path)
    Path("t.pat").write_text(case.src, encoding="utf-8")
    assert patc(["check", "t.pat"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_rendered(err, case, "t.pat")


# --- errors that need N: found when a mask (or kernel) is built --------------------------------

MASK_ERRORS: dict[str, tuple[Case, int]] = {
    "window_negative_at_small_n": (Case("pattern p = window(N // 8 - 10)", 1, 13, 19, "window's size (before) must be at least 0, got -8 at N = 16"), 16),
    "sink_negative_at_small_n": (Case("pattern p = sink(N - 100)", 1, 13, 13, "sink's count must be at least 0, got -92 at N = 8"), 8),
    "stride_zero_at_n": (Case("pattern p = stride(N - 8)", 1, 13, 13, "stride must be at least 1, got 0 at N = 8"), 8),
    "dilation_zero_at_n": (Case("pattern p = window(3, dilation=N - 8)", 1, 13, 25, "window's dilation must be at least 1, got 0 at N = 8"), 8),
    "block_zero_at_n": (Case("pattern p = blockwise(N - 8, full)", 1, 13, 22, "blockwise's block size must be at least 1, got 0 at N = 8"), 8),
    "inner_window_at_block_count": (Case("pattern p = blockwise(2, window(N - 10))", 1, 26, 14, "window's size (before) must be at least 0, got -6 at N = 4"), 8),
    "divisor_zero_at_n": (Case("pattern p = where(q % (N - 8) == 0)", 1, 13, 23, "a divisor in where(...) must be at least 1, got 0 at N = 8"), 8),
    "random_negative_at_n": (Case("pattern p = random(N - 20)", 1, 13, 14, "random's count must be at least 0, got -12 at N = 8"), 8),
    "grid_size_mismatch": (Case("layout g = grid(4, 4)\npattern p = neighborhood(g, kernel=3)", 1, 12, 10, "layout 'g' = grid(4, 4) holds 16 tokens but N = 8", "use N = 16"), 8),
    "grid_size_mismatch_where": (Case("layout g = grid(2, 3)\npattern p = where(g, qc0 == kc0)", 1, 12, 10, "layout 'g' = grid(2, 3) holds 6 tokens but N = 7", "use N = 6"), 7),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MASK_ERRORS))
def test_n_dependent_error_points_at_the_argument(name: str) -> None:
    case, n = MASK_ERRORS[name]
    body = P.loads(case.src, "t.pat").patterns[0].body  # fine without N
    with pytest.raises(P.PatternError) as info:
        dense_mask(body, n)
    _assert_rendered(info.value.render(), case, "t.pat")


@pytest.mark.parametrize("name", sorted(MASK_ERRORS))
def test_patc_mask_prints_n_dependent_error_and_exits_2(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case, n = MASK_ERRORS[name]
    monkeypatch.chdir(tmp_path)
    Path("t.pat").write_text(case.src, encoding="utf-8")
    assert patc(["mask", "t.pat", "-N", str(n), "-o", "m.npy"]) == 2
    _, err = capsys.readouterr()
    _assert_rendered(err, case, "t.pat")
    assert not Path("m.npy").exists()


def test_n_dependent_argument_is_fine_where_it_is_valid() -> None:
    body = P.pattern("window(N // 8 - 10)")
    assert dense_mask(body, 128).sum(axis=1).max() == 2 * 6 + 1


def test_arithmetic_past_64_bits_at_n_is_an_error_not_a_wrapped_mask() -> None:
    body = P.pattern("window(N ** 5)")
    assert dense_mask(body, 8).all()
    with pytest.raises(P.PatternError, match="64-bit range at N = 16384"):
        dense_mask(body, 16384)


def test_large_intermediate_values_are_exact() -> None:
    """int32 would overflow here; the mask must still mean what the text says."""
    m = dense_mask(P.pattern("where(q * 2 ** 40 < k * 2 ** 40 + 2 ** 41)"), 12)
    i, j = divmod(__import__("numpy").arange(144), 12)
    assert (m.reshape(-1) == (i < j + 2)).all()


# --- command-line errors without a source position -----------------------------------------------


def _run_err(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert patc(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return err


@pytest.fixture
def longformer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    Path("l.pat").write_text("param w = 4\nparam g = 2\npattern lf = window(w) | global(0:g)\n", encoding="utf-8")
    return "l.pat"


def test_unknown_define_names_the_params_and_guesses(longformer: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_err(["mask", longformer, "-N", "8", "-D", "ww=3", "-o", "m.npy"], capsys)
    assert err.splitlines() == ["error: -D ww: l.pat has no param 'ww' (its params: w, g)", "  hint: did you mean 'w'?"]


@pytest.mark.parametrize(
    ("define", "message"),
    [
        ("w", "error: -D w: expected NAME=VALUE"),
        ("w=abc", "error: -D w=abc: the value must be a number"),
        ("w=99999999999999999999", "error: -D w=99999999999999999999: the value is too large"),
        ("w=inf", "error: -D w=inf: the value must be a finite number"),
    ],
)
def test_bad_define_value(longformer: str, define: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_err(["mask", longformer, "-N", "8", "-D", define, "-o", "m.npy"], capsys)
    assert err.splitlines()[0] == message


def test_define_of_wrong_type_points_at_its_use(longformer: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_err(["mask", longformer, "-N", "8", "-D", "w=2.5", "-o", "m.npy"], capsys)
    assert err.splitlines()[0] == "l.pat:3:21: error: window's size must be an integer, not a number"


def test_unknown_pattern_name_guesses(longformer: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_err(["mask", longformer, "-p", "longfromer", "-N", "8", "-o", "m.npy"], capsys)
    assert err.splitlines() == ["error: l.pat has no pattern or model 'longfromer'", "  hint: it defines: lf"]


def test_missing_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_err(["check", str(tmp_path / "nope.pat")], capsys)
    assert "no such file" in err


def test_non_utf8_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bin.pat"
    path.write_bytes(b"pattern p = \xff\xfe")
    err = _run_err(["check", str(path)], capsys)
    assert "not UTF-8" in err


# --- fuzzing: nothing but PatternError, ever ----------------------------------------------------

TOKENS = [
    "param", "let", "layout", "pattern", "model", "layers", "heads", "every", "else", "and", "or", "not",
    "full", "none", "causal", "window", "stride", "sink", "global", "rows", "cols", "hops", "blockwise",
    "where", "random", "neighborhood", "grid", "topk", "threshold", "min", "max", "abs", "true", "false",
    "vertical", "slash", "last", "given", "N", "q", "k", "qc0", "kc1", "qc2", "kc0", "a", "g", "w", "dilation", "kernel", "stride",
    "causal", "seed", "base", "before", "after", "block", "score",
    "=", "==", "!=", "<", "<=", ">", ">=", "(", ")", "[", "]", "{", "}", ",", ":", "=>", "+", "-", "*",
    "//", "%", "**", "~", "|", "&", "0", "1", "2", "3", "7", "64", "1000", "0.5", "1e3", "2**62",
    "\n", "# comment\n", " ",
]  # fmt: skip

PREFIXES = ["", "pattern p = ", "layout g = grid(4, 4)\npattern p = ", "param w = 3\nlet a = causal\npattern p = "]

soup = st.tuples(st.sampled_from(PREFIXES), st.lists(st.sampled_from(TOKENS), max_size=30)).map(
    lambda t: t[0] + " ".join(t[1])
)
random_text = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
    st.text(max_size=100),
    st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=60)).map(lambda t: t[0] + t[1].decode("latin-1")),
)


def _only_pattern_errors(text: str) -> None:
    try:
        program = P.loads(text, "fuzz.pat")
    except P.PatternError as e:
        e.render()  # rendering must not fail either
        return
    formatted = format_module(parse(text, "fuzz.pat"))  # whatever checks also formats, to the same IR
    assert P.loads(formatted, "fuzz.pat") == program, formatted
    for item in program.patterns:
        for n in (1, 5, 16):
            try:
                dense_mask(item.body, n)
            except P.PatternError as e:
                e.render()


@settings(max_examples=400, suppress_health_check=list(HealthCheck))
@given(soup)
def test_token_soup_only_raises_pattern_error(text: str) -> None:
    _only_pattern_errors(text)


@settings(max_examples=300, suppress_health_check=list(HealthCheck))
@given(random_text)
def test_random_bytes_only_raise_pattern_error(text: str) -> None:
    _only_pattern_errors(text)


@st.composite
def mutated_programs(draw: st.DrawFn) -> str:
    """A valid program with a few random edits: deep into the checker, not only the parser."""
    from strategies import expressions, neighborhoods

    text = draw(
        st.one_of(
            expressions(max_leaves=4).map(lambda e: f"param w = 3\nlet a = causal\npattern p = {e}\n"),
            neighborhoods().map(lambda c: c[0]),
        )
    )
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        match draw(st.sampled_from(["delete", "insert", "replace"])):
            case "delete":
                text = text[:at] + text[at + draw(st.integers(1, 6)) :]
            case "insert":
                text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
            case _:
                text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at + draw(st.integers(1, 6)) :]
    return text


@settings(max_examples=300, suppress_health_check=list(HealthCheck))
@given(mutated_programs())
def test_mutated_programs_only_raise_pattern_error(text: str) -> None:
    _only_pattern_errors(text)


@settings(max_examples=40, suppress_health_check=list(HealthCheck))
@given(st.one_of(soup, random_text))
def test_patc_check_on_garbage_exits_0_or_2_without_traceback(text: str) -> None:
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.pat"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = patc(["check", str(path)])
    assert code in (0, 2)
    assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue()
    if code == 2:
        assert "error: " in err.getvalue()


# --- deep nesting: a message, never a RecursionError ---------------------------------------------


@pytest.mark.parametrize(
    "src",
    [
        "pattern p = " + "~" * 3000 + "causal",
        "pattern p = " + "(window(1) | " * 3000 + "full" + ")" * 3000,
        "pattern p = sink(" + "-" * 3000 + "1)",
        "pattern p = where(" + "(q < 5 and " * 3000 + "true" + ")" * 3000 + ")",
        "pattern p = where(" + "not " * 3000 + "q < 5)",
    ],
    ids=["tilde", "union", "minus", "and", "not"],
)
def test_deep_nesting_is_refused_with_a_position(src: str) -> None:
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    err = info.value
    assert err.message == "expression nested more than 200 levels deep"
    assert err.span is not None and err.span.line == 1 and err.hint == "name parts of it with 'let'"


def test_nesting_up_to_the_limit_works_everywhere() -> None:
    src = "pattern p = " + " | ".join(f"window({k})" for k in range(150))
    assert dense_mask(P.loads(src).patterns[0].body, 8).all()
    assert P.loads("pattern p = " + "(" * 3000 + "causal" + ")" * 3000).patterns[0].body == P.pattern("causal")


def test_a_very_long_let_chain_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["let a0 = causal"] + [f"let a{k} = a{k - 1} | window({k})" for k in range(1, 3000)]
    path = tmp_path / "chain.pat"
    path.write_text("\n".join(lines) + "\npattern p = a2999\n", encoding="utf-8")
    assert patc(["mask", str(path), "-N", "16", "-o", str(tmp_path / "m.npy")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err


def test_a_mask_too_large_for_any_machine_is_refused_up_front(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(P.PatternError, match=r"a dense mask at N = 10000000 needs 93132\.3 GiB"):
        dense_mask(P.pattern("causal"), 10_000_000)
    src = tmp_path / "c.pat"
    src.write_text("pattern p = causal\n")
    assert patc(["mask", str(src), "-N", "10000000", "-o", str(tmp_path / "m.npy")]) == 2
    assert "use a smaller N" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("src", "message", "hint"),
    [
        ("pattern p = layers", "'layers' is a keyword, not a value", "model m = layers(24)"),
        ("pattern p = 1:2", "unexpected ':'", "a token set like 0:16 is written as an argument"),
        ("pattern p = threshold(N, block=4)", "threshold's mass must be a constant (it may not depend on N)", None),
        ("model m = layers(4) {\n else => causal\n every 2 => full\n}", "'else' must be the last entry", None),
        ("pattern p = window(before=3)", "window(before=...) needs after=... too", "window(r)"),
        ("layout g = grid(N)", "a grid axis length must be a constant (it may not depend on N)", None),
        ("param w = N", "param 'w' depends on N; a param must be a constant", "window(N // 8)"),
    ],
)
def test_more_messages(src: str, message: str, hint: str | None) -> None:
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    assert info.value.message == message
    if hint is not None:
        assert info.value.hint is not None and hint in info.value.hint


@pytest.mark.parametrize(
    ("src", "line", "col"),
    [
        ("pattern p = causal |  # trailing\n# only comments\n\n", 1, 21),
        ("pattern p = window(3)\r\n\r\npattern q = window(\r\n", 3, 20),
        ("pattern p = (causal\n   # more to come\n", 1, 20),
        ("param", 1, 6),
    ],
)
def test_end_of_file_error_points_after_the_last_code(src: str, line: int, col: int) -> None:
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    assert info.value.message == "unexpected end of file"
    assert info.value.span is not None and (info.value.span.line, info.value.span.column) == (line, col)


@pytest.mark.parametrize("at", [10, 2500, 4990])
def test_an_error_in_a_long_line_shows_a_window_with_the_caret_under_it(at: int) -> None:
    """A 5000-character line is cut to a window around the error, the caret still under the culprit."""
    line = "pattern p = " + "full | " * ((at - 12) // 7) + "nope"
    line += " | full" * ((5000 - len(line)) // 7)
    with pytest.raises(PatternError) as info:
        P.loads(line + "\n", "long.pat")
    rendered = info.value.render().splitlines()
    shown, caret = rendered[1], rendered[2]
    assert len(shown) <= 2 + SHOWN_LINE + 6 and len(caret) <= len(shown)
    assert shown[caret.index("^"): caret.index("^") + 4] == "nope"
