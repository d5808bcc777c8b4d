"""The transformers examples and benchmark run as written, at tiny sizes on CPU (slow: each trains or
generates with a real transformers model); the benchmark refuses figures that cannot be measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytest.importorskip("torch")
pytest.importorskip("transformers", minversion="5.25")  # the hf extra's floor

pytestmark = pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")


def _run(script: Path, *args: str, **env: str) -> str:
    """The script's output, run as a user would (float32 on the CPU path: no Triton interpreter)."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), *args], env={**environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_train_tiny_writes_its_loss_curves(tmp_path: Path) -> None:
    out, losses = tmp_path / "loss.png", tmp_path / "loss.json"
    _run(ROOT / "examples" / "train_tiny.py", "--steps", "2", "--patterns", "window", "causal",
         "--out", str(out), "--json", str(losses))
    assert out.read_bytes().startswith(b"\x89PNG")
    curves = json.loads(losses.read_text())
    assert set(curves) == {"window", "causal"} and all(len(c) == 2 for c in curves.values())


@pytest.mark.slow
def test_generate_prints_its_rates() -> None:
    text = _run(ROOT / "examples" / "generate.py", "--prompt", "12", "--new", "3", "--window", "3")
    assert "pattern cache:" in text and "sdpa, transformers' cache:" in text and "tokens/s" in text
    assert "generated the same tokens" in text


@pytest.mark.slow
def test_bench_hf_smoke_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _run(ROOT / "benchmarks" / "bench_hf.py", str(out), BENCH_SMOKE="1")
    result = json.loads(out.read_text())
    assert result["invalid"] == []
    ours = result["training"]["patterndsl"]
    assert ours["tokens_per_s"] > 0 and ours["compiled_in_window"] == 0
    assert 0 < ours["attention_ms"] < ours["profiled_step_ms"] and ours["attention_calls"] == 4
    steps = result["generation"]["batches"]["1"]
    for label in ("patterndsl_pattern_cache", "sdpa"):
        run = steps[label]
        assert 0 < run["prefill_and_first_s"] < run["total_s"] and 0 < run["decode_s"] < run["total_s"]
        assert run["decode_tokens_per_s"] == pytest.approx(3 / run["decode_s"])  # batch 1, 4 new tokens


def test_bench_hf_refuses_figures_that_cannot_be_measurements() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_hf

    step = {"median_step_ms": 100.0, "tokens_per_s": 1.6e5, "attention_fwd_ms": 7061.0, "attention_bwd_ms": 26.0,
            "mask_ms": 1.0, "attention_ms": 7087.0, "attention_and_mask_ms": 7088.0, "compiled_in_window": 0}
    fine = {**step, "attention_fwd_ms": 11.0, "attention_ms": 37.0, "attention_and_mask_ms": 38.0}
    run = {"prefill_and_first_s": 5.45, "decode_s": 0.0, "total_s": 1.42, "decode_tokens_per_s": 6.3e10}
    result = {"training": {"patterndsl": dict(fine), "flex_attention": step,
                           "sdpa": {**fine, "compiled_in_window": 3}},
              "generation": {"batches": {"1": {"patterndsl_pattern_cache": run, "sdpa": {
                  "prefill_and_first_s": 0.5, "decode_s": 3.0, "total_s": 3.5, "decode_tokens_per_s": 21.0}}}}}
    problems = bench_hf.insane(result)
    bench_hf.ratios(result)
    assert len(problems) == 6  # flex: fwd, attention, with masks; sdpa: compiled; prefill, decode_s
    assert step["attention_fwd_ms"] is None and step["attention_and_mask_ms"] is None
    assert result["training"]["sdpa"]["attention_ms"] is None and fine["attention_ms"] == 37.0
    assert run["decode_tokens_per_s"] is None and run["prefill_and_first_s"] is None
    assert result["training"]["patterndsl_vs_flex_attention"]["attention_and_mask_speedup"] is None
    assert result["generation"]["batches"]["1"]["patterndsl_pattern_cache_speedup_vs_sdpa"] is None
