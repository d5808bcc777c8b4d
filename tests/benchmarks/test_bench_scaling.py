"""benchmarks/bench_scaling.py, dry run on the CPU: it measures every cell it is asked for, agrees with Flex on
the forward, carries a previous run's rows over with --resume and says which cells a deadline left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


def _run(out: Path, *extra: str, **env: str) -> None:
    full = {**os.environ, "BENCH_DEVICE": "cpu", "TRITON_INTERPRET": "1", "BENCH_ONLY": "sliding_window_1024",
            "BENCH_DS": "16", "PYTHONPATH": str(ROOT), **env}  # fmt: skip
    done = subprocess.run([sys.executable, "bench_scaling.py", str(out), *extra], cwd=ROOT / "benchmarks", env=full,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow  # three runs of the script, each its own process: about 8 s
def test_dry_run_measures_resumes_and_reports_what_the_deadline_left_out(tmp_path: Path) -> None:
    first = tmp_path / "first.json"
    _run(first, BENCH_NS="96", BENCH_PASSES="fwd")
    rows = json.loads(first.read_text())["rows"]
    assert [(r["N"], r["pass"]) for r in rows] == [(96, "fwd")]
    assert rows[0]["rel_err_vs_flex"] < 1e-5 and rows[0]["allowed_pairs"] == sum(min(i, 1023) + 1 for i in range(96))
    second = tmp_path / "second.json"
    _run(second, "--resume", str(first), BENCH_NS="96,130", BENCH_PASSES="fwd", BENCH_DEADLINE="0")
    data = json.loads(second.read_text())
    assert data["rows"] == rows and data["not_measured"] == ["sliding_window_1024 N=130 D=16 fwd"]
