"""`patc` on a permuted pattern (`permute(B, segment=s, by=given)`): `check` names the segment, `show` draws
B in the permuted order and says so, `bench` (which has no permutation to pass) refuses at the pattern."""

from __future__ import annotations

from pathlib import Path

import pytest

from patterndsl.cli import main as patc

SRC = "pattern routed = permute(blockwise(4, window(0)) | causal & window(1), segment=16, by=given)\n"


def test_check_show_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "routed.pat"
    path.write_text(SRC, encoding="utf-8")
    assert patc(["check", str(path)]) == 0
    assert "routed (permuted in segments of 16)" in capsys.readouterr().out
    assert patc(["show", str(path), "-N", "16", "--width", "16"]) == 0
    assert "(in the permuted order)" in capsys.readouterr().out
    assert patc(["bench", str(path), "-N", "64"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}:1:1: error: 'routed' takes a permutation with each call; patc bench times patterns without one"
    assert err[-1].startswith("  hint: bench its body")
