"""The benchmark scripts' variant builders: P.compile returns one cached module per source and tiles, so a
variant's switches must not leak into the next variant built on the same module (a leak timed the H100
sweep's "best" window tile with the persistent kernel of an earlier variant, 0.460 ms instead of 0.366)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_forward_sweep_variants_start_from_the_module_defaults() -> None:
    import bench_forward

    first = bench_forward.build("causal & window(7)", (16, 16, 4, 1), {"ONE_LOOP": True, "TMA_MODE": 0})
    assert first.ONE_LOOP and first.TMA_MODE == 0
    second = bench_forward.build("causal & window(7)", (16, 16, 4, 1), {"FOLD": False})
    assert second is first, "the same cached module, so the reset is what is being tested"
    assert (second.ONE_LOOP, second.TMA_MODE, second.FOLD) == (False, 1, False)


def test_backward_sweep_variants_start_from_the_module_defaults() -> None:
    import sweep_backward

    cfg = (16, 16, 16, 16, 4, 1)
    first = sweep_backward.build("causal & window(7)", cfg, False, {"BWD_FUSE_PRE": False})
    assert not first.BWD_FUSE_PRE and not first.BWD_TMA
    second = sweep_backward.build("causal & window(7)", cfg, True)
    assert second is first
    assert (second.BWD_FUSE_PRE, second.BWD_TMA) == (True, True)


def test_forward_warm_up_compiles_what_the_tuner_will_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without BENCH_SWEEP the workers compile the tuner's candidates ahead: each one's loop and register
    fields become the switches its kernel is launched with."""
    import bench_forward

    from patterndsl.compile import TUNE_CONFIGS

    monkeypatch.setattr(bench_forward, "SWEEP", False)
    cands = next(c for d, c in TUNE_CONFIGS if bench_forward.D <= d)
    got = bench_forward.variants("causal")
    assert [cfg for cfg, _ in got] == [c[:4] for c in cands]
    for c, (_, sw) in zip(cands, got, strict=True):
        assert sw == {"TMA_MODE": c[4], "ONE_LOOP": len(c) > 5 and c[5] == 1, "MAXNREG": c[6] if len(c) > 6 else 0}
    assert any(sw["MAXNREG"] for _, sw in got) and any(sw["ONE_LOOP"] for _, sw in got)


def test_forward_sweep_keep_filters_variants_by_label_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_forward

    monkeypatch.setattr(bench_forward, "SWEEP", True)
    every = [bench_forward.label(c, sw) for c, sw in bench_forward.variants("causal")]
    monkeypatch.setenv("BENCH_SWEEP_KEEP", "128x64w8s2_tma_mode1,64x64w4s2")
    kept = [bench_forward.label(c, sw) for c, sw in bench_forward.variants("causal")]
    assert kept == [x for x in every if x.startswith(("128x64w8s2_tma_mode1", "64x64w4s2"))]
    assert 0 < len(kept) < len(every) and any("maxnreg128" in x for x in kept)


def test_tuner_check_adds_extra_candidates_to_the_d128_row_only() -> None:
    import tuner_vs_bench

    extra = tuner_vs_bench.extra_candidates("128,32,8,2,1; 128,32,8,3,1,0,128;")
    assert extra == ((128, 32, 8, 2, 1), (128, 32, 8, 3, 1, 0, 128))
    table = ((64, ((1, 2),)), (128, ((3, 4),)), (256, ((5, 6),)))
    assert tuner_vs_bench.with_extra(table, extra) == ((64, ((1, 2),)), (128, ((3, 4), *extra)), (256, ((5, 6),)))
    assert tuner_vs_bench.with_extra(table, ()) == table


def test_graph_table_marks_a_peer_that_could_not_be_captured(tmp_path: Path) -> None:
    import bench_graphs

    row = {"pattern": "p", "N": 4096, "D": 64, "ours_ms": 0.5, "flex_ms": 0.4, "ours_graph_ms": 0.2,
           "flex_graph_error": "RuntimeError: capture"}  # fmt: skip
    res = {"machine": "GPU", "date": "d", "torch": "t", "triton": "r", "rows": [row]}
    bench_graphs.write_markdown(res, str(tmp_path / "g.md"))
    assert "| p | 4096 | 64 | 0.500 | 0.400 | 0.80x | 0.200 | failed | - |" in (tmp_path / "g.md").read_text()
