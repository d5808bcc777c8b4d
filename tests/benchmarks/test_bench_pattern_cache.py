"""benchmarks/bench_pattern_cache.py, dry run on the CPU: the window's cache keeps one size as the context grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.slow  # one process that imports torch and the compiler: about 8 s
def test_dry_run_measures_constant_memory_for_window_and_sinks(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_NS": "2048,8192", "BENCH_B": "1", "BENCH_HKV": "1",
           "BENCH_H": "2", "BENCH_D": "16", "BENCH_CHUNK": "512", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "bench_pattern_cache.py", str(out)], cwd=ROOT / "benchmarks", env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["pattern"], r["context"]): r for r in json.loads(out.read_text())["rows"]}
    window = [rows["streaming_1023_4", n]["memory_bytes"] for n in (2048, 8192)]
    dense = [rows["dense_causal", n]["memory_bytes"] for n in (2048, 8192)]
    assert window[0] == window[1] < dense[1] and dense[1] > 2 * dense[0]
