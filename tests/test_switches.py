"""tests/switches.py, which the test helpers rely on to leave cached modules as they found them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from switches import spy_launches, switched


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


def test_a_spied_kernel_still_launches_and_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[tuple[int, ...], tuple[int, ...], dict[str, int]]] = []

    class Kernel:
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            return lambda *args, **kwargs: ran.append((grid, args, kwargs))

    real = Kernel()
    module = SimpleNamespace(_k=real)
    log: list[int] = []
    with monkeypatch.context() as m:
        spy_launches(m, module, "_k", log, lambda kw: kw["BLOCK_M"])
        module._k[(3,)](1, 2, BLOCK_M=64)
        assert log == [64] and ran == [((3,), (1, 2), {"BLOCK_M": 64})]
    assert module._k is real
