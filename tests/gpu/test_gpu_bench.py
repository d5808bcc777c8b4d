"""`patc bench` end to end on the GPU (the lent H100): JSON rows for every N and peer, a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patterndsl.cli import main as patc

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)


@pytest.mark.autotune
def test_bench_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "b.pat"
    f.write_text("pattern swa = causal & window(255)\n")
    png = tmp_path / "t.png"
    code = patc(
        ["bench", str(f), "-N", "1024", "2048", "--heads", "4", "--head-dim", "64", "--json", "--plot", str(png)]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["N"] for r in res["rows"]] == [1024, 2048] and res["peers"] == ["flex", "sdpa"]
    for r in res["rows"]:
        assert r["ours_ms"] > 0 and 0 < r["tile_efficiency"] <= 1 and isinstance(r["sdpa_ms"], float)
        assert r["allowed_pairs"] == 4 * sum(min(i + 1, 256) for i in range(r["N"]))
    assert png.stat().st_size > 1000
