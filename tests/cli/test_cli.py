"""`patc check / mask / show / fmt` as a user meets them: exit codes, files written, what is printed."""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import EXAMPLES, ROOT

import patterndsl as P
from patterndsl.cli import build_parser
from patterndsl.cli import main as patc
from patterndsl.mask import dense_mask

SPEC_EXAMPLES = sorted(glob.glob(str(EXAMPLES / "*.pat")))
LIBRARY = sorted(glob.glob(str(ROOT / "patterns" / "*.pat")))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.pat").write_text(
        "param w = 2\npattern local = causal & window(w)\npattern sinks = causal & sink(3)\n", encoding="utf-8"
    )
    (tmp_path / "one.pat").write_text("pattern only = window(1)\n", encoding="utf-8")
    (tmp_path / "moa.pat").write_text(
        "pattern moa = heads {\n    0:2 => causal\n    2:5 => window(1)\n}\n"
        "model m = layers(2) {\n    else => causal\n}\n",
        encoding="utf-8",
    )
    return tmp_path


# --- check ---------------------------------------------------------------------------------------


def test_check_passes_on_every_spec_example_and_library_file(capsys: pytest.CaptureFixture[str]) -> None:
    files = SPEC_EXAMPLES + LIBRARY
    assert len(SPEC_EXAMPLES) >= 8
    assert patc(["check", *files]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"{len(files)} of {len(files)} files ok")


def test_check_says_what_each_file_defines(capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["check", str(EXAMPLES / "model.pat"), str(EXAMPLES / "selectors.pat")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("model.pat: ok: moa (16 heads), masformer (model, 24 layers)")
    assert out[1].endswith("selectors.pat: ok: nsa (dynamic), prefill (dynamic), seer (dynamic)")
    assert out[2] == "2 of 2 files ok"


def test_check_reports_every_bad_file_and_exits_2(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("bad1.pat").write_text("pattern p = causl\n")
    Path("bad2.pat").write_text("pattern p = window(\n")
    assert patc(["check", "one.pat", "bad1.pat", "bad2.pat"]) == 2
    out, err = capsys.readouterr()
    assert "one.pat: ok: only" in out and "1 of 3 files ok" in out
    assert "bad1.pat:1:13: error: unknown name 'causl'" in err
    assert "bad2.pat:1:20: error: unexpected end of file" in err


def test_check_quiet_prints_only_errors(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["check", "-q", "one.pat", "two.pat"]) == 0
    assert capsys.readouterr().out == ""


# --- mask ----------------------------------------------------------------------------------------


def test_mask_writes_bool_npy_of_shape_n_n(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["mask", "two.pat", "-p", "local", "-N", "37", "-o", "local.npy"]) == 0
    m = np.load("local.npy")
    assert m.shape == (37, 37) and m.dtype == np.bool_
    np.testing.assert_array_equal(m, dense_mask(P.pattern("causal & window(2)"), 37))
    assert capsys.readouterr().out.startswith(f"local.npy: 37x37 bool, {int(m.sum())} allowed pairs")


def test_mask_define_overrides_a_param(work: Path) -> None:
    assert patc(["mask", "two.pat", "-p", "local", "-N", "20", "-D", "w=5", "-o", "w5.npy"]) == 0
    np.testing.assert_array_equal(np.load("w5.npy"), dense_mask(P.pattern("causal & window(5)"), 20))


def test_mask_of_the_only_pattern_needs_no_name(work: Path) -> None:
    assert patc(["mask", "one.pat", "-N", "9", "-o", "o.npy"]) == 0
    assert np.load("o.npy").sum() == 9 + 2 * 8


def test_mask_of_heads_pattern_is_h_n_n(work: Path) -> None:
    assert patc(["mask", "moa.pat", "-p", "moa", "-N", "16", "--heads", "5", "-o", "h.npy"]) == 0
    m = np.load("h.npy")
    assert m.shape == (5, 16, 16) and m.dtype == np.bool_
    causal, window = dense_mask(P.pattern("causal"), 16), dense_mask(P.pattern("window(1)"), 16)
    for h in range(5):
        np.testing.assert_array_equal(m[h], causal if h < 2 else window)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "moa", "--heads", "4"], "error: --heads 4: 'moa' defines 5 heads"),
        (["-p", "m"], "error: 'm' is a model; mask works on one pattern"),
    ],
)
def test_mask_heads_mistakes_exit_2(
    work: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert patc(["mask", "moa.pat", *argv, "-N", "8", "-o", "h.npy"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == message
    assert not Path("h.npy").exists()


def test_mask_heads_on_a_plain_pattern_is_an_error(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["mask", "one.pat", "-N", "8", "--heads", "4", "-o", "x.npy"]) == 2
    assert "'only' has no heads block; it is the same for every head" in capsys.readouterr().err


def test_mask_needs_a_name_when_a_file_has_several(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["mask", "two.pat", "-N", "8", "-o", "x.npy"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: two.pat defines 2 patterns; choose one with -p", "  hint: one of: local, sinks"]


def test_mask_of_a_dynamic_pattern_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = str(tmp_path / "x.npy")
    assert patc(["mask", str(EXAMPLES / "selectors.pat"), "-p", "nsa", "-N", "64", "-o", out]) == 2
    assert "dynamic selector" in capsys.readouterr().err


def test_mask_unwritable_output_is_a_user_error(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["mask", "one.pat", "-N", "8", "-o", "no/such/dir/x.npy"]) == 2
    assert "cannot write no/such/dir/x.npy" in capsys.readouterr().err


@pytest.mark.parametrize("n", ["0", "-3", "ten"])
def test_mask_rejects_a_bad_length(work: Path, capsys: pytest.CaptureFixture[str], n: str) -> None:
    with pytest.raises(SystemExit) as info:
        patc(["mask", "one.pat", "-N", n, "-o", "x.npy"])
    assert info.value.code == 2
    assert "-N" in capsys.readouterr().err


def test_mask_of_spec_longformer_matches_the_library(tmp_path: Path) -> None:
    out = tmp_path / "lf.npy"
    path = str(EXAMPLES / "longformer.pat")
    assert patc(["mask", path, "-p", "longformer", "-N", "1000", "-o", str(out)]) == 0
    m = np.load(out)
    np.testing.assert_array_equal(m, dense_mask(P.pattern("window(256) | global(0:16)"), 1000))


# --- show ----------------------------------------------------------------------------------------


def test_show_draws_in_the_terminal(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["show", "two.pat", "-p", "local", "-N", "16", "--width", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "local  N=16  density 17.58%"
    assert lines[1:] == ["▙", "▜▙", " ▜▙", "  ▜▙", "   ▜▙", "    ▜▙", "     ▜▙", "      ▜▙"]


def test_show_writes_a_png(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["show", "two.pat", "-p", "sinks", "-N", "64", "-o", "s.png"]) == 0
    data = Path("s.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert capsys.readouterr().out.strip() == "wrote s.png"


def test_show_heads_draws_one_picture_per_range(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["show", "moa.pat", "-p", "moa", "-N", "16", "-o", "h.png"]) == 0
    assert Path("h-0.png").exists() and Path("h-1.png").exists()
    assert patc(["show", "moa.pat", "-p", "moa", "-N", "16", "--head", "3"]) == 0
    assert "moa heads 3:4  N=16" in capsys.readouterr().out
    assert patc(["show", "moa.pat", "-p", "moa", "-N", "16", "--head", "5"]) == 2
    assert "--head 5: 'moa' has heads 0..4" in capsys.readouterr().err


def test_show_of_a_grid_needs_the_grids_size(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / "neighborhood.pat")
    assert patc(["show", path, "-p", "nat", "-N", "100"]) == 2
    err = capsys.readouterr().err
    assert "error: layout 'image' = grid(64, 64) holds 4096 tokens but N = 100" in err and "use N = 4096" in err


# --- fmt -----------------------------------------------------------------------------------------


def test_fmt_check_exit_codes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("messy.pat").write_text("pattern  p=causal|sink(2)\n")
    assert patc(["fmt", "--check", "one.pat"]) == 0
    assert patc(["fmt", "--check", "one.pat", "messy.pat"]) == 1
    assert capsys.readouterr().out == "messy.pat: would reformat\n"
    assert patc(["fmt", "--write", "messy.pat"]) == 0
    assert Path("messy.pat").read_text() == "pattern p = causal | sink(2)\n"
    assert patc(["fmt", "--check", "messy.pat"]) == 0


def test_fmt_leaves_spec_examples_meaning_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    for path in SPEC_EXAMPLES:
        assert patc(["fmt", path]) == 0
        out = capsys.readouterr().out
        assert P.loads(out, path) == P.load(path)


# --- help and the entry point ---------------------------------------------------------------------


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


def test_the_language_commands_are_registered() -> None:
    assert {"check", "show", "mask", "fmt"} <= set(_commands())


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_works_for_every_command(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as info:
        patc(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: patc") and len(out.splitlines()) >= 5
    if command is not None:
        assert command in out.splitlines()[0]


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        patc([])
    assert info.value.code == 2


def test_console_script_runs(tmp_path: Path) -> None:
    exe = shutil.which("patc") or str(Path(sys.executable).parent / "patc")
    if not Path(exe).exists():
        pytest.skip("patc is not installed as a console script here")
    bad = tmp_path / "bad.pat"
    bad.write_text("pattern p = window(-1)\n")
    done = subprocess.run([exe, "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: window's size (before) must be at least 0, got -1" in done.stderr
    assert "Traceback" not in done.stderr


# The child's own peak: VmHWM belongs to the process's address space after exec. (`ru_maxrss` does not:
# Linux carries the forking parent's high-water mark across exec, so a child of a big pytest worker
# reported the worker's 600 MiB.)
PEAK_KIB = (
    "next((int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')), None) "
    "or __import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss"
)


def test_mask_of_longformer_at_16384_is_fast_and_lean(tmp_path: Path) -> None:
    """Issue 2's bar: under 3 s (asserted with slack for a loaded CI box) and well under 1 GiB beyond the
    256 MiB result; measured in a child process so other tests' memory does not count."""
    out = tmp_path / "lf.npy"
    script = (
        "import sys, time\n"
        "from patterndsl.cli import main\n"
        "t = time.perf_counter()\n"
        f"code = main(['mask', {str(EXAMPLES / 'longformer.pat')!r}, '-p', 'longformer', '-N', '16384', '-o', {str(out)!r}])\n"
        f"print(code, time.perf_counter() - t, {PEAK_KIB})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    code, seconds, peak_kib = done.stdout.split()[-3:]
    assert code == "0"
    assert out.stat().st_size > 16384 * 16384
    result_mib, peak_mib = 16384 * 16384 / 2**20, int(peak_kib) / 1024
    assert peak_mib - result_mib < 512, f"peak RSS {peak_mib:.0f} MiB for a {result_mib:.0f} MiB mask"
    assert float(seconds) < 10.0, f"patc mask took {float(seconds):.2f} s"  # ~1 s when the box is quiet


def test_show_density_and_picture_match_the_dense_mask(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patterndsl.draw import unicode_picture

    assert patc(["show", "two.pat", "-p", "sinks", "-N", "301", "--width", "23"]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = dense_mask(P.pattern("causal & sink(3)"), 301)
    assert lines[0] == f"sinks  N=301  density {m.mean():.2%}"
    assert "\n".join(lines[1:]) == unicode_picture(m, 23)


def test_show_at_large_n_needs_no_dense_mask(tmp_path: Path) -> None:
    """Pictures are built from cell densities a chunk at a time: at N = 24000 the dense mask alone would
    be 549 MiB; measured in a child process so other tests' memory does not count."""
    script = (
        "from patterndsl.cli import main\n"
        f"code = main(['show', {str(EXAMPLES / 'longformer.pat')!r}, '-p', 'longformer', '-N', '24000', '--width', '16'])\n"
        f"print(code, {PEAK_KIB})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "longformer  N=24000  density" in done.stdout
    code, peak_kib = done.stdout.split()[-2:]
    assert code == "0" and int(peak_kib) / 1024 < 400, f"peak RSS {int(peak_kib) / 1024:.0f} MiB"


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "one.pat", "-N", "16", "-o", "no/such/dir/x.png"],
        ["compile", "one.pat", "-o", "no/such/dir/x.py"],
        ["analyze", "one.pat", "-N", "64", "--plot", "no/such/dir/x.png"],
    ],
)
def test_unwritable_outputs_are_user_errors_not_tracebacks(
    work: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert patc(argv) == 2
    err = capsys.readouterr().err
    assert "no/such/dir/x." in err and "Traceback" not in err and "internal error" not in err


def test_compile_takes_backward_tiles_and_refuses_bad_ones(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["compile", "one.pat", "-o", "m.py", "--bwd-tiles", "16,32,32,16,4,1,2,2"]) == 0
    text = (work / "m.py").read_text()
    assert "(16, 32, 32, 16, 4, 1, 2, 2)" in text and "bwd_tma_configs=" in text and "bwd_autotune=False" in text
    capsys.readouterr()
    for bad, says in [("16,x", "comma-separated integers"), ("24,16,16,16,4,1", "powers of two"), ("16,16", "six")]:
        assert patc(["compile", "one.pat", "-o", "m.py", "--bwd-tiles", bad]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
