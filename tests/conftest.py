"""Test-wide settings: hypothesis profiles sized so the whole suite stays fast on two cores.

`HYPOTHESIS_PROFILE=thorough` runs ten times the examples (for a bug hunt, not for CI).

The tests mirror the package: language/, analysis/, compiler/, runtime/, gpu/ (the `gpu` marker), cli/ and
benchmarks/ (the scripts in benchmarks/). No test module imports another: shared code lives in helpers.py,
strategies.py (hypothesis strategies), reference.py and reference_varlen.py (brute-force readings of the
language). They import by bare name because this file sits in tests/: pytest's default (prepend) import mode
puts tests/ on sys.path to import it. Test module basenames stay unique (there is no __init__.py).
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@functools.cache
def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in the CPU interpreter. It is set once, here, for the whole process:
# set by one test module on a GPU machine it leaked into every module collected after it (2026-11-25: the
# gpu tests ran their kernels interpreted, bf16 dots wrong, errors of 1e9).
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`gpu` tests need compiled kernels on a CUDA GPU; `interpreter` tests need Triton's CPU interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = _has_cuda()
    for item in items:
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif item.get_closest_marker("gpu") and interpret:
            item.add_marker(pytest.mark.skip(reason="gpu tests run compiled kernels; TRITON_INTERPRET=1 is set"))
        if item.get_closest_marker("interpreter") and not interpret:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (set on machines without a GPU)"))


@pytest.fixture(autouse=True)
def _default_tiles_on_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU tests launch the default tiles unless marked `autotune`: tuning compiles and times every candidate
    in every test (minutes per file on the H100) and picks by timing, so a failure would depend on noise.
    gpu/test_gpu_kernels.py runs each candidate on its own against the reference instead."""
    if request.node.get_closest_marker("gpu") and not request.node.get_closest_marker("autotune"):
        monkeypatch.setenv("PATTERNDSL_AUTOTUNE", "0")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """PATTERNDSL_FAILURE_LOG=path appends each failure as it happens: a time-boxed GPU call that is killed
    before pytest's summary still brings back why its tests failed."""
    path = os.environ.get("PATTERNDSL_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # once, from the controller
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext[-4000:]}\n")
