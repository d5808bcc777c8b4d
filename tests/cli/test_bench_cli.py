"""`patc bench` without a GPU: argument and pattern errors first, then one clear sentence about the GPU;
the table, JSON and plot writers on a result of the shape `_measure` returns (the GPU run itself is
tests/gpu/test_gpu_bench.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patterndsl.cli import bench
from patterndsl.cli import main as patc

torch = pytest.importorskip("torch")
SRC = "pattern swa = causal & window(1023)\nlayout g = grid(4, 8)\npattern img = where(g, abs(qc0 - kc0) <= 1)\n"


@pytest.fixture
def pat(tmp_path: Path) -> Path:
    f = tmp_path / "b.pat"
    f.write_text(SRC)
    return f


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_one_clear_error(pat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["bench", str(pat), "-p", "swa", "-N", "1024", "4096"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-p", "swa", "--vs", "flex,xformers"], "unknown peer 'xformers'"),
        (["-p", "img", "-N", "100"], "error: layout 'g' = grid(4, 8) holds 32 tokens but N = 100"),
        (["-p", "nope"], "no pattern or model 'nope'"),
        (["-p", "swa", "--heads", "3", "--vs", "none"], None),
    ],
)
def test_argument_errors_come_before_the_gpu_check(
    pat: Path, argv: list[str], message: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = patc(["bench", str(pat), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if message is not None:
        assert message in err
    elif not torch.cuda.is_available():
        assert "needs a CUDA GPU" in err  # a valid call gets as far as the GPU check


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["-N", "0"], ["-N", "x"]])
def test_bad_values_are_argparse_errors(pat: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        patc(["bench", str(pat), "-p", "swa", *argv])
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def _result() -> dict:
    rows = []
    for n, ours, flex in ((4096, 0.1, 0.15), (16384, 0.4, "out of memory")):
        rows.append(
            {"N": n, "ours_ms": ours, "ours_tflops": 300.0, "tile_efficiency": 0.9, "config": [128, 128, 8, 3, 1],
             "flex_ms": flex, "flex_over_ours": flex / ours if isinstance(flex, float) else None,
             "sdpa_ms": 2 * ours, "sdpa_over_ours": 2.0}
        )  # fmt: skip
    return {"file": "b.pat", "pattern": "swa", "machine": "GPU", "torch": "t", "triton": "t", "batch": 1,
            "heads": 16, "head_dim": 128, "dtype": "bfloat16", "pass": "forward", "peers": ["flex", "sdpa"],
            "rows": rows}  # fmt: skip


def test_table_shows_every_n_and_peer(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    bench._table(_result())
    out = capsys.readouterr().out
    assert "16384" in out and "4096" in out and "out of memory" in out and "1.50" in out and "2.00" in out
    json.dumps(_result())  # what --json prints is plain JSON


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "t.png"
    bench._plot(_result(), str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(bench.PatternError, match="cannot write"):
        bench._plot(_result(), str(tmp_path / "missing" / "t.png"))


def test_peers_are_timed_in_interleaved_rounds() -> None:
    """Ours and each peer once per round, rounds alternating in order, every round kept: a clock drifting
    while the benchmark runs reaches every peer alike."""
    calls: list[str] = []
    fns = {x: (lambda x=x: calls.append(x)) for x in ("ours", "flex", "sdpa")}
    got = bench.interleaved(fns, lambda fn: fn() or float(len(calls)), rounds=4)
    assert "".join(c[0] for c in calls) == "ofs" + "sfo" + "ofs" + "sfo"
    assert got == {"ours": [1.0, 6.0, 7.0, 12.0], "flex": [2.0, 5.0, 8.0, 11.0], "sdpa": [3.0, 4.0, 9.0, 10.0]}
