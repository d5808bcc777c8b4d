"""`patc analyze` as a user meets it: every figure of --json against brute force on the dense mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import LIBRARY

from patterndsl import dense_mask, load
from patterndsl.cli import main


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:  # type: ignore[type-arg]
    assert main(["analyze", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "p.pat"
    f.write_text(text)
    return str(f)


def brute(mask: np.ndarray, bq: int, bk: int) -> dict[str, float]:
    n = mask.shape[0]
    nq, nk = -(-n // bq), -(-n // bk)
    pad = np.zeros((nq * bq, nk * bk), bool)
    pad[:n, :n] = mask
    visited = int(pad.reshape(nq, bq, nk, bk).any(axis=(1, 3)).sum())
    return {"pairs": int(mask.sum()), "visited": visited}


@pytest.mark.parametrize(
    "src, n",
    [
        ("causal & window(5)", 100), ("window(3) | global(0:4)", 77), ("causal & hops(2)", 64),
        ("blockwise(8, window(1) | global(0:1) | random(2, seed=3))", 96), ("window(2, dilation=3) - causal", 50),
    ],
)  # fmt: skip
def test_json_figures_match_brute_force(src: str, n: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f"pattern p = {src}\n")
    r = run_json(capsys, path, "-N", str(n), "--heads", "3", "--head-dim", "32", "--batch", "2", "--block", "16x8")
    mask = dense_mask(load(path).patterns[0].body, n)
    b = brute(mask, 16, 8)
    e = r["patterns"][0]
    scale = 32 * 3 * 2
    assert e["pairs"] == b["pairs"] and e["density"] == pytest.approx(b["pairs"] / n**2)
    assert e["cost"]["fwd_flops"] == 4 * b["pairs"] * scale and e["cost"]["bwd_flops"] == 10 * b["pairs"] * scale
    assert e["cost"]["visited_blocks"] >= b["visited"]
    if "random" not in src and "hops" not in src:
        assert e["cost"]["visited_blocks"] == b["visited"]
    v = e["cost"]["visited_blocks"]
    assert e["cost"]["executed_fwd_flops"] == v * 16 * 8 * 4 * scale
    assert e["cost"]["tile_efficiency"] == pytest.approx(b["pairs"] / (v * 128))
    assert e["cost"]["fwd_bytes"] == 2 * (2 * n * 32 + 2 * v * 8 * 32) * 3 * 2
    cnt = mask.sum(axis=1)
    rows = np.arange(n)[cnt > 0]
    first = mask.argmax(axis=1)[cnt > 0]
    last = n - 1 - mask[:, ::-1].argmax(axis=1)[cnt > 0]
    assert e["rows"]["keys_per_query"] == {
        "min": int(cnt.min()),
        "mean": pytest.approx(cnt.mean()),
        "max": int(cnt.max()),
    }
    assert e["rows"]["reach_back"]["max"] == int((rows - first).max())
    assert e["rows"]["reach_forward"]["max"] == int((last - rows).max())
    assert e["rows"]["empty_rows"] == int((cnt == 0).sum())
    assert r["causal"] == (not np.triu(mask, 1).any())
    assert r["totals"]["pairs"] == 3 * b["pairs"]  # summed over heads, per batch element


def test_heads_and_models_sum_over_heads_and_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "pattern h = heads {\n    0:2 => causal\n    2:6 => causal & window(3)\n}\n"
        "model m = layers(3) {\n    every 2 => causal\n    else => h\n}\n",
    )
    n = 40
    causal = int(np.tril(np.ones((n, n))).sum())
    win = int(dense_mask(load(path).patterns[0].body.ranges[1].pattern, n).sum())  # type: ignore[union-attr]
    r = run_json(capsys, path, "-p", "h", "-N", str(n))
    assert r["heads"] == 6 and r["totals"]["pairs"] == 2 * causal + 4 * win
    r = run_json(capsys, path, "-p", "m", "-N", str(n), "--head-dim", "1")
    # layers 0 and 2: causal on all 6 heads; layer 1: 2 heads causal, 4 heads window
    assert r["totals"]["pairs"] == (12 + 2) * causal + 4 * win
    assert r["totals"]["fwd_flops"] == 4 * r["totals"]["pairs"]
    assert r["receptive_field"]["granularity"].startswith("token")
    assert len(r["receptive_field"]["coverage"]) <= 3
    assert main(["analyze", path, "-p", "h", "-N", "8", "--block", "zz"]) == 2
    assert "--block zz: expected BQxBK" in capsys.readouterr().err
    assert main(["analyze", path, "-p", "h", "-N", "8", "--heads", "5"]) == 2
    assert "defines 6 heads" in capsys.readouterr().err


def test_a_model_of_many_layers_costs_its_distinct_bodies_not_its_depth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """100000 layers (the most a model may have) of three bodies: each body's static part is derived once,
    and the per-pattern layer lists are built without searching them (both were per layer: a minute)."""
    from patterndsl.analysis import analyze as A

    calls = []
    real = A.static_part
    monkeypatch.setattr(A, "static_part", lambda p: calls.append(p) or real(p))
    path = write(tmp_path, "model m = layers(100000) {\n    1:3 => causal\n    7:8 => causal & window(3)\n"
                           "    else => causal & topk(2, block=16)\n}\n")
    r = run_json(capsys, path, "-N", "64")
    assert len(calls) <= 3 + 3  # once per body in the schedule, once per pattern's figures
    used = {u["pattern"]: (u["used_by"], u["head_layers"]) for u in r["patterns"]}
    assert used["causal & window(3)"] == ("layers 7", 1), used
    assert sum(h for _, h in used.values()) == 100000, used


def test_warnings_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "pattern my_causal = window(2)\npattern holes = rows(0:5)\n"
        "model mixed = layers(2) {\n    every 2 => causal\n    else => window(1)\n}\n",
    )
    r = run_json(capsys, path, "-p", "my_causal", "-N", "64")
    assert any("see a later key" in w and "named causal" in w for w in r["warnings"])
    assert any("tile efficiency" in w for w in r["warnings"])
    r = run_json(capsys, path, "-p", "holes", "-N", "64", "--block", "8x8")
    assert any("59 queries have no key (first: row 5)" in w for w in r["warnings"])
    r = run_json(capsys, path, "-p", "mixed", "-N", "64")
    assert any("other layers of 'mixed' are causal" in w for w in r["warnings"])


def test_receptive_field_closed_forms_sit_beside_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "pattern w = causal & window(7)\npattern h = causal & hops(2)\n")
    r = run_json(capsys, path, "-p", "w", "-N", "100", "--layers", "3")
    rf = r["receptive_field"]
    assert rf["depth_full_coverage"] == 15 and "= 15" in rf["closed_form"]
    assert rf["coverage_at_layers"] == pytest.approx(rf["coverage"][2])
    r = run_json(capsys, path, "-p", "h", "-N", "256")
    assert r["receptive_field"]["depth_full_coverage"] == 8 and "log_2 N = 8.0" in r["receptive_field"]["closed_form"]


def test_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.png"
    assert main(["analyze", str(LIBRARY / "longformer.pat"), "-p", "longformer", "-N", "2048", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "allowed pairs (exact)" in text and "545*N - 74256" in text and "receptive field" in text
    assert out.stat().st_size > 10_000


def test_dynamic_pattern_reports_its_static_part_and_the_selection_cost(capsys: pytest.CaptureFixture[str]) -> None:
    n, heads, d = 1000, 2, 64
    r = run_json(capsys, str(LIBRARY / "nsa.pat"), "-p", "nsa", "-N", str(n), "--heads", str(heads), "--head-dim", str(d))
    (e,) = r["patterns"]
    # the static part causal & (window(511) | sink(64)), by brute force
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    assert e["pairs"] == int(((j <= i) & ((i - j <= 511) | (j < 64))).sum())
    s = e["selector"]
    nb = -(-n // 64)  # causal context: query block qb has qb + 1 candidate blocks; topk keeps 16
    kept = sum(min(16, qb + 1) for qb in range(nb))
    assert s["selected_blocks"] == kept and s["candidates_per_query_block"]["max"] == nb
    assert s["extra_fwd_flops_max"] == 4 * kept * 64 * 64 * d * heads
    assert s["scoring_flops"] == 2 * nb * nb * d * heads
    assert s["fwd_flops_max"] == e["cost"]["fwd_flops"] + s["extra_fwd_flops_max"] + s["scoring_flops"]
    r = run_json(capsys, str(LIBRARY / "xattention.pat"), "-N", "1024", "--selected", "3")
    assert r["patterns"][0]["selector"]["selected_blocks"] == 1 + 2 + 3 * 6  # threshold at K = 3
    assert r["patterns"][0]["pairs"] == 0  # nothing static: only what the selector picks


def test_neighborhood_at_a_million_tokens_is_fast(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(
        capsys, str(LIBRARY / "nat.pat"), "-p", "nat", "-D", "height=1024", "-D", "width=1024", "-N", str(1 << 20)
    )
    assert r["patterns"][0]["pairs"] == 49 * (1 << 20) - 2 * 0  # every query has exactly 7 x 7 neighbours
    assert r["patterns"][0]["nnz"]["closed_form"] == "49*N"


def test_analysis_runs_without_torch() -> None:
    """torch is an optional extra: the analyser, its tile builder and `patc analyze` never import it."""
    import subprocess
    import sys

    code = (
        "import sys; import patterndsl.analysis.analyze, patterndsl.tiling, patterndsl.layout\n"
        "from patterndsl.cli import main\n"
        f"assert main(['analyze', {str(LIBRARY / 'longformer.pat')!r}, '-p', 'longformer', '-N', '5000', '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
