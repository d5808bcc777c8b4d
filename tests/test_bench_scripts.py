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
