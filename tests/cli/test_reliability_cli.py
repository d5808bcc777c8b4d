"""One mistake, one wording, in every subcommand; options that do not apply are errors, never ignored; what
the file already says (its head count) is not asked for again; and window's dilation is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import patterndsl as P
from patterndsl.cli import main as patc
from patterndsl.mask import dense_mask

SRC = """\
pattern moa = heads {
    0:2 => causal
    2:5 => window(1)
}
pattern one = window(1)
layout g = grid(4, 4)
pattern nat = neighborhood(g, kernel=3)
model m = layers(2) {
    else => causal
}
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("f.pat").write_text(SRC)
    return tmp_path


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert patc(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


# --- heads -----------------------------------------------------------------------------------------


def test_mask_takes_the_head_count_from_the_file(work: Path) -> None:
    assert patc(["mask", "f.pat", "-p", "moa", "-N", "8", "-o", "h.npy"]) == 0
    m = np.load("h.npy")
    assert m.shape == (5, 8, 8)
    np.testing.assert_array_equal(m[4], dense_mask(P.pattern("window(1)"), 8))
    assert patc(["mask", "f.pat", "-p", "moa", "-N", "8", "--heads", "5", "-o", "h.npy"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["mask", "f.pat", "-p", "moa", "-N", "8", "-o", "h.npy", "--heads", "4"],
        ["analyze", "f.pat", "-p", "moa", "-N", "8", "--heads", "4"],
        ["bench", "f.pat", "-p", "moa", "-N", "64", "--heads", "4"],
    ],
    ids=["mask", "analyze", "bench"],
)
def test_a_head_count_the_file_contradicts_reads_the_same_everywhere(
    work: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _error(argv, capsys) == [
        "error: --heads 4: 'moa' defines 5 heads",
        "  hint: leave --heads out, or give --heads 5",
    ]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["show", "f.pat", "-p", "one", "-N", "8", "--head", "1"], "--head 1"),
        (["mask", "f.pat", "-p", "one", "-N", "8", "--heads", "2", "-o", "x.npy"], "--heads 2"),
    ],
    ids=["show", "mask"],
)
def test_a_head_option_on_a_pattern_without_heads_is_an_error(
    work: Path, argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`show --head 1` on a pattern without heads drew the pattern and said nothing."""
    flag = option.split()[0]
    assert _error(argv, capsys) == [
        f"error: {option}: 'one' has no heads block; it is the same for every head",
        f"  hint: drop {flag}",
    ]
    assert not Path("x.npy").exists()


def test_show_draws_every_head_range_in_the_terminal(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["show", "f.pat", "-p", "moa", "-N", "8", "--width", "8"]) == 0
    out = capsys.readouterr().out
    assert "moa heads 0:2  N=8" in out and "moa heads 2:5  N=8" in out


# --- the same mistake, the same words --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["mask", "f.pat", "-p", "m", "-N", "8", "-o", "x.npy"],
        ["show", "f.pat", "-p", "m", "-N", "8"],
        ["bench", "f.pat", "-p", "m", "-N", "64"],
    ],
    ids=["mask", "show", "bench"],
)
def test_a_model_where_a_pattern_is_needed(work: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _error(argv, capsys) == [
        f"error: 'm' is a model; {argv[0]} works on one pattern",
        "  hint: name one of its layers' patterns with -p, or use 'patc analyze' for the whole model",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["mask", "f.pat", "-p", "nat", "-N", "8", "-o", "x.npy"],
        ["show", "f.pat", "-p", "nat", "-N", "8"],
        ["analyze", "f.pat", "-p", "nat", "-N", "8"],
        ["bench", "f.pat", "-p", "nat", "-N", "16", "8"],
    ],
    ids=["mask", "show", "analyze", "bench"],
)
def test_a_length_the_grid_does_not_hold(work: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _error(argv, capsys) == [
        "f.pat:6:12: error: layout 'g' = grid(4, 4) holds 16 tokens but N = 8",
        "  layout g = grid(4, 4)",
        "             ^~~~~~~~~~",
        "  hint: use N = 16, or change the grid",
    ]


@pytest.mark.parametrize("command", ["mask", "show", "analyze", "compile", "bench"])
@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["-p", "nope"], "error: f.pat has no pattern or model 'nope'"),
        (["-p", "one", "-D", "w=3"], "error: -D w: f.pat has no param 'w' (its params: none)"),
        (["-p", "one", "-D", "w"], "error: -D w: expected NAME=VALUE"),
    ],
    ids=["pattern", "param", "define"],
)
def test_shared_option_mistakes_read_the_same(
    work: Path, command: str, extra: list[str], first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rest = {"mask": ["-N", "8", "-o", "x.npy"], "show": ["-N", "8"], "analyze": ["-N", "8"],
            "compile": ["-o", "x.py"], "bench": ["-N", "64"]}[command]  # fmt: skip
    assert _error([command, "f.pat", *extra, *rest], capsys)[0] == first_line


# --- window's dilation -----------------------------------------------------------------------------


def test_window_dilation_must_be_named() -> None:
    """LANGUAGE.md writes `window(a, b, dilation=d)`; a third positional argument read as the dilation
    is easily misread (as a third size, or a stride)."""
    with pytest.raises(P.PatternError) as info:
        P.loads("pattern p = window(1, 2, 3)", "t.pat")
    err = info.value
    assert err.message == "window's dilation is given by name"
    assert err.span is not None and (err.span.line, err.span.column, err.span.length) == (1, 26, 1)
    assert err.hint == "write window(1, 2, dilation=3)"
    assert P.pattern("window(1, 2, dilation=3)") == P.pattern("window(before=1, after=2, dilation=3)")
