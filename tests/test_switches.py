"""tests/switches.py, which the GPU test helpers rely on to leave cached modules as they found them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from switches import switched


def test_switches_are_put_back_after_the_block_even_when_it_fails() -> None:
    module = SimpleNamespace(ONE_LOOP=False, MAXNREG=0)
    with switched(module, {"ONE_LOOP": True}):
        assert module.ONE_LOOP and module.MAXNREG == 0
    assert module.ONE_LOOP is False
    with pytest.raises(RuntimeError), switched(module, {"MAXNREG": 128}):
        assert module.MAXNREG == 128
        raise RuntimeError
    assert module.MAXNREG == 0
    with switched(module, None):
        pass
    assert vars(module) == {"ONE_LOOP": False, "MAXNREG": 0}
