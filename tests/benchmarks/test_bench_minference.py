"""benchmarks/bench_minference.py, dry run on the CPU (the interpreter, float32, a small N): it measures every
method, and Flex over the block mask it builds from the selection agrees with patterndsl's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.slow  # one process that imports torch and runs the interpreter: about 10 s
def test_dry_run_measures_and_agrees_with_flex(tmp_path: Path) -> None:
    out = tmp_path / "minference.json"
    env = {**os.environ, "BENCH_DEVICE": "cpu", "TRITON_INTERPRET": "1", "BENCH_N": "160", "BENCH_H": "2",
           "BENCH_HKV": "1", "BENCH_V": "20", "BENCH_S": "10", "BENCH_ROUNDS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "bench_minference.py", str(out)], cwd=ROOT / "benchmarks", env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["rel_err_vs_flex"] < 1e-4
    assert max(got["variant_rel_err_vs_flex"].values()) < 1e-4  # every kernel variant it times agrees too
    assert all(got[name] > 0 for name in got["variant_options"]), got["variant_options"]
    for key in ("ours_ms", "selection_ms", "flex_mask_build_ms", "flex_kernel_ms", "sdpa_causal_ms", "speedup_vs_flex"):
        assert got[key] > 0, key
