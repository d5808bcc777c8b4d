"""What `patc` reads: special files never hang it, oversized files are refused before they are read, and
text that is not ASCII is welcome in comments and refused, with a clear message, everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from patterndsl.cli import main as patc
from patterndsl.parse import MAX_SOURCE_BYTES

PATC = [sys.executable, "-c", "import sys; from patterndsl.cli import main; sys.exit(main(sys.argv[1:]))"]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """patc in a child process: a hang fails the test at the timeout instead of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
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
