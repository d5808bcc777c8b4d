"""docs/benchmarks.md is generated from the committed JSON results, and stays in step with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generate(tmp_path: Path) -> str:
    results = tmp_path / "benchmarks"
    shutil.copytree(ROOT / "docs/benchmarks", results)
    page = tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(results), str(page)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "img/benchmarks.png").stat().st_size > 10_000
    return page.read_text(encoding="utf-8")


def test_every_forward_ratio_on_the_page_is_computed_from_its_json(tmp_path: Path) -> None:
    text = _generate(tmp_path)
    fwd = json.loads((ROOT / "docs/benchmarks/forward_h100.json").read_text(encoding="utf-8"))
    for r in fwd["forward"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['pattern']} | {r['density']:.4f}"))
        rounds = r.get("rounds_ms")
        ratios = [f / o for f, o in zip(rounds["flex"], rounds["ours"], strict=True)] if rounds else None
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"
        when = r.get("date", fwd["date"])[:16].replace("T", " ")
        assert f"| {r['flex_ms'] / r['ours_ms']:.2f}x | {spread} | {when} |" in row, row


def test_committed_page_is_regenerated_from_the_committed_results(tmp_path: Path) -> None:
    assert _generate(tmp_path) == (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8"), (
        "docs/benchmarks.md is stale: run `python benchmarks/report.py`"
    )


def test_scaling_section_shows_every_measured_cell_and_says_what_is_missing(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks"
    results.mkdir()
    rows = [
        {"pattern": "causal", "N": n, "D": 128, "pass": "fwd", "ours_ms": n / 1000, "speedup_vs_flex": 1.5}
        for n in (4096, 16384)
    ] + [{"pattern": "causal", "N": 131072, "D": 128, "pass": "fwd+bwd", "error": "out of memory: x"},
         {"pattern": "causal", "N": 65536, "D": 128, "pass": "fwd", "ours_ms": 65.536, "flex_ms": None,
          "flex_error": "out of memory: y"}]  # fmt: skip
    meta = {"machine": "GPU", "date": "d", "torch": "t", "triton": "r", "shape": {"B": 1, "H": 16, "dtype": "bf16"}}
    (results / "scaling_h100.json").write_text(json.dumps({**meta, "rows": rows, "not_measured": ["power N=4096"]}))
    page = tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(results), str(page)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = page.read_text(encoding="utf-8")
    assert "| causal | 128 | fwd | 4.096 ms, 1.50x | 16.384 ms, 1.50x | 65.536 ms, Flex out of memory |" in text
    assert "causal N=131072 D=128 fwd+bwd: out of memory: x" in text and "power N=4096" in text
