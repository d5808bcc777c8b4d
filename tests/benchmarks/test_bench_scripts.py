"""The benchmark scripts' variant builders: P.compile returns one cached pattern per source and tiles, so a
variant's switches must not leak into the next variant built on the same pattern (a leak timed the H100
sweep's "best" window tile with the persistent kernel of an earlier variant, 0.460 ms instead of 0.366).
Switches are kernel options now (`attn.options(...)`), set per variant and checked where they land: the
kernels' launch arguments (recorded, not run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "benchmarks"))


def _record(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, fields: tuple[str, ...]) -> list[tuple]:
    """Kernel `name` of `module` replaced by a recorder of these launch arguments (nothing runs)."""
    log: list[tuple] = []

    class Recorder:
        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kwargs: log.append(tuple(kwargs.get(f) for f in fields))

    monkeypatch.setattr(module, name, Recorder())
    return log


def _inputs() -> tuple[Any, int]:
    """A small q (and k, v) where the kernels launch (a GPU, else the interpreter conftest.py sets), and the
    TMA mode a launch there takes when asked for one (host descriptors need sm_90)."""
    if torch.cuda.is_available():
        return torch.randn(1, 2, 40, 16, device="cuda"), int(torch.cuda.get_device_capability()[0] >= 9)
    return torch.randn(1, 2, 40, 16), 1


def test_forward_sweep_variants_start_from_the_module_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_forward

    from patterndsl.runtime import forward
    from patterndsl.runtime.options import Options, current_options

    first = bench_forward.build("causal & window(7)", (16, 16, 4, 1), {"one_loop": True, "tma_mode": 0})
    assert first.options["one_loop"] and first.options["tma_mode"] == 0
    second = bench_forward.build("causal & window(7)", (16, 16, 4, 1), {"fold": False})
    assert second.attn is first.attn, "the same cached pattern, so the reset is what is being tested"
    assert (second.options["one_loop"], second.options["tma_mode"], second.options["fold"]) == (False, 1, False)
    launched = _record(monkeypatch, forward, "_attn_fwd_fast", ("BLOCK_M", "ONE_LOOP", "TMA", "FOLD"))
    q, tma = _inputs()
    for var in (first, second, first):
        with var.active():
            var.attn(q, q, q)
    assert launched == [(16, True, 0, True), (16, False, tma, False), (16, True, 0, True)]
    assert current_options() == Options(), "a variant's options end with its block"


def test_backward_sweep_variants_start_from_the_module_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import sweep_backward

    from patterndsl.runtime import backward

    cfg = (16, 16, 16, 16, 4, 1)
    first = sweep_backward.build("pattern p = causal & window(7)\n", cfg, False, {"bwd_fuse_pre": False})
    assert not first.options["bwd_fuse_pre"] and not first.options["bwd_tma"]
    second = sweep_backward.build("pattern p = causal & window(7)\n", cfg, True)
    assert second.attn is first.attn
    assert (second.options["bwd_fuse_pre"], second.options["bwd_tma"]) == (True, True)
    pre = _record(monkeypatch, backward, "_attn_bwd_pre", ("BLOCK_M",))
    dq = _record(monkeypatch, backward, "_attn_bwd_dq", ("BLOCK_M", "PRE", "TMA"))
    _record(monkeypatch, backward, "_attn_bwd_dkdv", ())
    q, tma = _inputs()
    lse = torch.zeros(1, 2, 40, device=q.device)
    for var in (first, second):
        with var.active():
            var.attn.backward(q, q, q, q, q, lse)
    assert len(pre) == 1 and dq == [(16, None, 0), (16, True, tma)]


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
        assert sw == {"tma_mode": c[4], "one_loop": len(c) > 5 and c[5] == 1, "maxnreg": c[6] if len(c) > 6 else 0}
    assert any(sw["maxnreg"] for _, sw in got) and any(sw["one_loop"] for _, sw in got)


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
