"""The package type-checks under `mypy --strict` (pyproject's [tool.mypy]): the IR's frozen dataclasses and the
`match` statements over them are only as safe as the checker that reads them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.slow  # mypy over the package: about 15 s
@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.prefix) / "bin" / "mypy").exists(),
                    reason="mypy is not installed (it comes with the test extra)")  # fmt: skip
def test_package_is_clean_under_strict_mypy() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "patterndsl"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
