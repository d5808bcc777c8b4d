"""The transformers examples and benchmark run as written, at tiny sizes on CPU (slow: each trains or
generates with a real transformers model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")]


def _run(script: Path, *args: str, **env: str) -> str:
    """The script's output, run as a user would (float32 on the CPU path: no Triton interpreter)."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), *args], env={**environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_tiny_writes_its_loss_curves(tmp_path: Path) -> None:
    out, losses = tmp_path / "loss.png", tmp_path / "loss.json"
    _run(ROOT / "examples" / "train_tiny.py", "--steps", "2", "--patterns", "window", "causal",
         "--out", str(out), "--json", str(losses))
    assert out.read_bytes().startswith(b"\x89PNG")
    curves = json.loads(losses.read_text())
    assert set(curves) == {"window", "causal"} and all(len(c) == 2 for c in curves.values())


def test_generate_prints_its_rates() -> None:
    text = _run(ROOT / "examples" / "generate.py", "--prompt", "12", "--new", "3", "--window", "3")
    assert "pattern cache:" in text and "sdpa, transformers' cache:" in text and "tokens/s" in text
    assert "generated the same tokens" in text


def test_bench_hf_smoke_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _run(ROOT / "benchmarks" / "bench_hf.py", str(out), BENCH_SMOKE="1")
    result = json.loads(out.read_text())
    assert result["training"]["patterndsl"]["tokens_per_s"] > 0
    steps = result["generation"]["batches"]["1"]
    assert steps["patterndsl_pattern_cache"]["decode_tokens_per_s"] > 0 and "sdpa" in steps
