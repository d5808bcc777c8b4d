"""What `patc` reads: special files never hang it, oversized files are refused before they are read, and
text that is not ASCII is welcome in comments and refused, with a clear message, everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import patterndsl as P
from patterndsl.cli import main as patc
from patterndsl.parse import MAX_SOURCE_BYTES

PATC = [sys.executable, "-c", "import sys; from patterndsl.cli import main; sys.exit(main(sys.argv[1:]))"]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """patc in a child process: a hang fails the test at the timeout instead of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*PATC, *argv], cwd=cwd, capture_output=True, text=True, timeout=20, env=env)


# --- special files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "{f}"],
        ["fmt", "{f}"],
        ["mask", "{f}", "-N", "8", "-o", "m.npy"],
        ["compile", "{f}", "-o", "m.py"],
        ["analyze", "{f}", "-N", "8"],
    ],
    ids=["check", "fmt", "mask", "compile", "analyze"],
)
@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_files_are_refused_without_reading_them(tmp_path: Path, argv: list[str], special: str) -> None:
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")  # nobody writes: opening it to read would block for ever
    path = special if special.startswith("/") else str(tmp_path / special)
    done = _run([a.replace("{f}", path) for a in argv], tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"error: {path}: not a regular file" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fifo"] if special == "fifo" else [])


def test_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: is a directory, not a .pat file")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.pat"
    with big.open("wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros that take no disk
    for argv in (["check", str(big)], ["fmt", str(big)], ["compile", str(big), "-o", str(tmp_path / "m.py")]):
        assert patc(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {big}: the file is larger than {MAX_SOURCE_BYTES} bytes" in err, err
    assert not (tmp_path / "m.py").exists()


def test_missing_files_read_the_same_in_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.pat")
    argvs = [
        ["check", missing],
        ["fmt", missing],
        ["mask", missing, "-N", "8", "-o", str(tmp_path / "m.npy")],
        ["show", missing, "-N", "8"],
        ["compile", missing, "-o", str(tmp_path / "m.py")],
        ["analyze", missing, "-N", "8"],
    ]
    for argv in argvs:
        assert patc(argv) == 2
        assert capsys.readouterr().err == f"error: {missing}: no such file\n", argv


def test_bytes_that_are_not_utf8_are_pointed_at(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.pat"
    bad.write_bytes("pattern p = causal\n# G\u00f3mez\n".encode("latin-1"))
    assert patc(["check", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{bad}:2:4: error: not UTF-8 text (byte 22)"
    assert err[2] == "     ^" and err[3] == "  hint: save the file as UTF-8"


# --- text beyond ASCII ------------------------------------------------------------------------

UNICODE_COMMENTS = (
    "# Gómez et al., «Attention», 2024 — ∑ over keys; 注意\n"
    "param w = 3  # fenêtre\n"
    "pattern p = causal & window(w)  # ✓\n"
)


def test_utf8_is_welcome_in_comments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "u.pat"
    path.write_text(UNICODE_COMMENTS, encoding="utf-8")
    assert P.load(path).patterns[0].body == P.pattern("causal & window(3)")
    assert patc(["check", str(path)]) == 0
    assert patc(["fmt", "--check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok: p")


def test_a_byte_order_mark_is_not_an_error() -> None:
    assert P.loads("\ufeffpattern p = causal\n").patterns[0].body == P.pattern("causal")


@pytest.mark.parametrize(
    ("src", "col", "char"),
    [("pattern p\u00e9 = causal", 10, "\u00e9"), ("pattern p = cau\u00e9sal", 16, "\u00e9"), ("param \u03b1 = 3", 7, "\u03b1")],
)
def test_names_stay_ascii_with_a_clear_message(src: str, col: int, char: str) -> None:
    with pytest.raises(P.PatternError) as info:
        P.loads(src, "t.pat")
    err = info.value
    assert err.message == f"unexpected character {char!r}"
    assert err.span is not None and (err.span.line, err.span.column) == (1, col)
    assert err.hint == "names are ASCII letters, digits and '_'; other characters may appear only in comments"


@pytest.mark.parametrize("sep", ["\u2028", "\u2029"])
def test_line_numbers_count_newlines_only(sep: str) -> None:
    """Python's splitlines() also breaks at these; lark and editors count '\\n' only."""
    with pytest.raises(P.PatternError) as info:
        P.loads(f"# one{sep}still the first line\npattern p = cusal\n", "t.pat")
    lines = info.value.render().splitlines()
    assert lines[0] == "t.pat:2:13: error: unknown name 'cusal'"
    assert lines[1] == "  pattern p = cusal"


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\u200f", "\x0c", "\x00", "\x85"])
def test_invisible_control_characters_are_refused_even_in_comments(char: str) -> None:
    """A bidirectional override in a comment can make code read differently from what it is."""
    with pytest.raises(P.PatternError) as info:
        P.loads(f"pattern p = causal  # a{char}b\n", "t.pat")
    err = info.value
    assert err.message == f"invisible control character U+{ord(char):04X}"
    assert err.span is not None and (err.span.line, err.span.column) == (1, 24)
