"""docs/performance.md is generated from the committed JSON results, and stays in step with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def _report(results: Path, page: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(results), str(page)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return page.read_text(encoding="utf-8")


def _generate(tmp_path: Path) -> str:
    results = tmp_path / "benchmarks"
    shutil.copytree(ROOT / "benchmarks/results", results)
    page = tmp_path / "performance.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(results), str(page)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "img/benchmarks.png").stat().st_size > 10_000
    return page.read_text(encoding="utf-8")


def test_every_forward_ratio_on_the_page_is_computed_from_its_json(tmp_path: Path) -> None:
    text = _generate(tmp_path)
    fwd = json.loads((ROOT / "benchmarks/results/forward_h100.json").read_text(encoding="utf-8"))
    for r in fwd["forward"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['pattern']} | {r['density']:.4f}"))
        rounds = r.get("rounds_ms")
        ratios = [f / o for f, o in zip(rounds["flex"], rounds["ours"], strict=True)] if rounds else None
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"
        when = r.get("date", fwd["date"])[:16].replace("T", " ")
        assert f"| {r['flex_ms'] / r['ours_ms']:.2f}x | {spread} | {when} |" in row, row


def test_committed_page_is_regenerated_from_the_committed_results(tmp_path: Path) -> None:
    assert _generate(tmp_path) == (ROOT / "docs/performance.md").read_text(encoding="utf-8"), (
        "docs/performance.md is stale: run `python benchmarks/report.py`"
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
    text = _report(results, tmp_path / "performance.md")
    assert "| causal | 128 | fwd | 4.096 ms, 1.50x | 16.384 ms, 1.50x | 65.536 ms, Flex out of memory |" in text
    assert "causal N=131072 D=128 fwd+bwd: out of memory: x" in text and "power N=4096" in text


def _forward_file(rows: list[tuple[str, float, float, float]]) -> dict[str, object]:
    """A forward benchmark file: (pattern, ours, Flex, SDPA) in ms."""
    return {"date": "2030-01-02T03:04:05+00:00", "machine": "Some GPU 7", "torch": "9.9", "triton": "8.8",
            "shape": {"B": 1, "H": 16, "N": 4096, "D": 64, "dtype": "bfloat16"},
            "forward": [{"pattern": p, "density": 0.5, "ours_ms": o, "ours_tflops": 1.0, "flex_ms": f,
                         "flex_tflops": 1.0, "sdpa_dense_ms": s} for p, o, f, s in rows]}  # fmt: skip


def _part(text: str, heading: str) -> str:
    """The lines of one `## heading` section of the page."""
    assert f"## {heading}\n" in text, heading
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_page_states_method_environment_and_only_the_cases_a_peer_won(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    rows = [("fast", 1.0, 2.0, 3.0), ("flexwins", 2.0, 1.5, 3.0), ("sdpawins", 2.0, 4.0, 1.0), ("tie", 1.0, 1.0, 9.0)]
    (results / "forward_h100.json").write_text(json.dumps(_forward_file(rows)))
    text = _report(results, tmp_path / "performance.md")
    assert "4 * allowed pairs * head_dim * heads * batch" in _part(text, "Method")
    assert "| Forward, 1-D patterns | Some GPU 7 | 9.9 | 8.8 | 2030-01-02 03:04 UTC |" in _part(text, "Environment")
    weak = _part(text, "Known weak spots")
    lines = [line for line in weak.splitlines() if line.startswith("| Forward")]
    assert lines == ["| Forward, 1-D patterns | sdpawins | 2.000 | SDPA | 1.000 | 0.500x |",
                     "| Forward, 1-D patterns | flexwins | 2.000 | FlexAttention | 1.500 | 0.750x |"]  # fmt: skip
    assert "2 of 8 comparisons" in weak


def test_weak_spots_say_none_when_ours_is_faster_everywhere(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "forward_h100.json").write_text(json.dumps(_forward_file([("fast", 1.0, 2.0, 3.0)])))
    text = _report(results, tmp_path / "performance.md")
    assert "None: ours was the faster in all 2 comparisons." in _part(text, "Known weak spots")
