"""The README's first command ends in `examples/tour.sh`: it must keep working on a CPU-only machine."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.slow  # the whole tour in a shell, its module run in the interpreter: about 6 s
def test_tour_runs_on_cpu_and_its_module_matches_the_reference(tmp_path: Path) -> None:
    env = dict(
        os.environ, TOUR_OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(ROOT / "examples/tour.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "max |out - dense masked SDPA (float64)|" in run.stdout
    assert (tmp_path / "streaming.png").stat().st_size > 1000
    assert "the standalone package gives the same output" in run.stdout
    assert _imports(tmp_path / "streaming_attn.py") == {"triton", "patterndsl"}
    assert _imports(tmp_path / "streaming_pkg" / "__init__.py") == {"triton", "."}  # the runtime copied beside it


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {"." if n.level else (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return imported - set(sys.stdlib_module_names)
