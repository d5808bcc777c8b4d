"""What `patc` writes: never over its input or a file it did not write (unless --force), never half a file
(a temporary file renamed over the target), exactly the file named, and only in formats it can write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

from patterndsl.cli import main as patc
from patterndsl.cli.output import MARKABLE, write_atomically
from patterndsl.source import PatternError

SRC = "pattern p = causal & window(2)\n"
HEADS = "pattern h = heads {\n    0:1 => causal\n    1:2 => full\n}\n"
SUFFIXES = "use one of: " + ", ".join(f".{s}" for s in sorted(MARKABLE))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("s.pat").write_text(SRC)
    Path("h.pat").write_text(HEADS)
    return tmp_path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# one command per kind of output: (argv without the output, the output option)
WRITERS = {
    "compile": (["compile", "s.pat"], "-o"),
    "mask": (["mask", "s.pat", "-N", "8"], "-o"),
    "show": (["show", "s.pat", "-N", "8"], "-o"),
    "analyze": (["analyze", "s.pat", "-N", "8"], "--plot"),
}
OUT = {"compile": "out.py", "mask": "out.npy", "show": "out.png", "analyze": "out.png"}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_the_input_is_never_overwritten(work: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, option = WRITERS[command]
    before = _files(work)
    for force in ([], ["--force"]):
        assert patc([*argv, option, "s.pat", *force]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option} s.pat: that is the input file; patc never overwrites its input")
        assert _files(work) == before


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_file_patc_did_not_write_needs_force(work: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, option = WRITERS[command]
    out = OUT[command]
    Path(out).write_bytes(b"precious notes\n")
    Path("other.pat").write_text("pattern mine = full\n")
    before = _files(work)
    for target in (out, "other.pat"):
        assert patc([*argv, option, target]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"error: {option} {target}: the file exists and is not a ")
        assert err[0].endswith(" patc wrote")
        assert err[1] == "  hint: choose another name, or pass --force to replace it"
    assert _files(work) == before
    assert patc([*argv, option, out, "--force"]) == 0
    assert Path(out).read_bytes() != b"precious notes\n"


@pytest.mark.parametrize("command", ["compile", "mask", "show"])
def test_patc_replaces_its_own_output(work: Path, command: str) -> None:
    argv, option = WRITERS[command]
    out = OUT[command]
    assert patc([*argv, option, out]) == 0
    first = Path(out).read_bytes()
    Path("s.pat").write_text(SRC.replace("window(2)", "window(3)"))
    assert patc([*argv, option, out]) == 0
    assert Path(out).read_bytes() != first
    assert sorted(p.name for p in work.iterdir()) == sorted(["s.pat", "h.pat", out])


def test_a_float_npy_is_not_a_mask_patc_wrote(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save("weights.npy", np.zeros((4, 4)))
    assert patc(["mask", "s.pat", "-N", "4", "-o", "weights.npy"]) == 2
    assert "is not a mask patc wrote" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load("weights.npy"), np.zeros((4, 4)))


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_outputs_are_written_atomically(
    work: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The new content goes to a temporary file renamed over the target: when the rename fails (as when
    the run is killed before it), the old file is whole and no temporary file is left."""
    argv, option = WRITERS[command]
    out = OUT[command]
    assert patc([*argv, option, out]) == 0
    before = _files(work)

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    Path("s.pat").write_text(SRC.replace("window(2)", "window(5)"))
    before["s.pat"] = Path("s.pat").read_bytes()
    assert patc([*argv, option, out, "--force"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write {out}: No space left on device")
    assert _files(work) == before


def test_fmt_write_is_atomic_and_keeps_mode_and_links(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    messy = Path("messy.pat")
    messy.write_text("pattern  p=causal|sink(2)\n")
    messy.chmod(0o640)
    Path("link.pat").symlink_to("messy.pat")
    assert patc(["fmt", "-w", "link.pat"]) == 0
    assert Path("link.pat").is_symlink() and messy.read_text() == "pattern p = causal | sink(2)\n"
    assert messy.stat().st_mode & 0o777 == 0o640
    messy.write_text("pattern  p=full\n")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(5, "I/O error")))
    assert patc(["fmt", "-w", "messy.pat"]) == 2
    assert messy.read_text() == "pattern  p=full\n"
    assert sorted(p.name for p in work.iterdir()) == ["h.pat", "link.pat", "messy.pat", "s.pat"]


def test_an_interrupted_writer_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "m.py"
    target.write_text("old\n")

    def half(f: object) -> None:
        f.write(b"new, but only ha")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(target), half)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.py"]


def test_show_writes_no_picture_when_a_later_head_fails(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("d.pat").write_text("pattern h = heads {\n    0:1 => causal\n    1:2 => topk(1, block=16)\n}\n")
    assert patc(["show", "d.pat", "-N", "16", "-o", "d.png"]) == 2
    assert "dynamic selector" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["d.pat", "h.pat", "s.pat"]


# --- exactly the file named ------------------------------------------------------------------------


def test_mask_writes_exactly_the_named_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["mask", "s.pat", "-N", "8", "-o", "m"]) == 0
    assert capsys.readouterr().out.startswith("m: 8x8 bool")
    assert sorted(p.name for p in work.iterdir()) == ["h.pat", "m", "s.pat"]
    with open("m", "rb") as f:
        assert np.load(f).shape == (8, 8)


@pytest.mark.parametrize("name", ["m.PDF", "m.svg", "m.eps"])
def test_show_writes_the_format_its_suffix_names(work: Path, name: str) -> None:
    assert patc(["show", "s.pat", "-N", "8", "-o", name]) == 0
    head = Path(name).read_bytes()[:16]
    assert head.startswith({"m.PDF": b"%PDF", "m.svg": b"<?xml", "m.eps": b"%!PS"}[name])
    assert patc(["show", "s.pat", "-N", "8", "-o", name]) == 0  # its own picture: replaced without --force


@pytest.mark.parametrize(
    ("argv", "option", "name", "what"),
    [
        (["show", "s.pat", "-N", "8"], "-o", "m.txt", "'.txt' pictures"),
        (["show", "s.pat", "-N", "8"], "-o", "m", "a picture without a suffix naming its format"),
        (["show", "h.pat", "-N", "8"], "-o", "m.jpg", "'.jpg' pictures"),
        (["analyze", "s.pat", "-N", "8"], "--plot", "m.txt", "'.txt' pictures"),
        (["bench", "s.pat", "-N", "64"], "--plot", "m.docx", "'.docx' pictures"),
    ],
)
def test_an_unsupported_picture_suffix_lists_the_supported_ones(
    work: Path, capsys: pytest.CaptureFixture[str], argv: list[str], option: str, name: str, what: str
) -> None:
    before = _files(work)
    assert patc([*argv, option, name]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {option} {name}: patc cannot write {what}",
        f"  hint: {SUFFIXES}",
    ]
    assert _files(work) == before


# --- what is not a file ----------------------------------------------------------------------------


def test_a_directory_is_not_an_output(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("d.py").mkdir()
    assert patc(["compile", "s.pat", "-o", "d.py", "--force"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: -o d.py: is a directory", "  hint: name a file inside it"]


def test_a_fifo_is_not_an_output(work: Path) -> None:
    """Opening a FIFO to write blocks until a reader comes: refused from its type, in a child process so that
    a regression fails at the timeout instead of hanging the suite."""
    os.mkfifo("pipe.npy")
    code = "import sys; from patterndsl.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, "mask", "s.pat", "-N", "8", "-o", "pipe.npy", "--force"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: -o pipe.npy: not a regular file (a device, pipe or socket)")


def test_a_missing_folder_is_reported_before_any_work(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["mask", "s.pat", "-N", "8", "-o", "no/such/m.npy"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write no/such/m.npy: the folder no/such does not exist")


def test_write_atomically_reports_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(PatternError, match="cannot write"):
        write_atomically(str(tmp_path / "no" / "x"), lambda f: None)
