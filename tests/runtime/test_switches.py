"""Kernel options set for a block of code and put back after it, and tests/helpers.py's kernel spy: the
runtime modules are shared by every compiled pattern, so an option or a spied-on kernel left set would leak
into every later test."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from helpers import spy_launches

import patterndsl as P
from patterndsl.runtime.options import Options, current_options, options


def test_options_are_put_back_after_the_block_even_when_it_fails() -> None:
    attn = P.compile("pattern p = causal\n", block_m=16, block_n=16)
    default = current_options()
    assert default == Options()
    with attn.options(one_loop=True) as got:
        assert got is current_options() and current_options().one_loop and current_options().maxnreg == 0
        with options(maxnreg=128):  # nested blocks add to the enclosing one's options
            assert current_options().one_loop and current_options().maxnreg == 128
        assert current_options().maxnreg == 0
    assert current_options() == default
    with pytest.raises(RuntimeError), attn.options(maxnreg=128):
        assert current_options().maxnreg == 128
        raise RuntimeError
    assert current_options() == default
    with attn.options():
        pass
    assert current_options() == default
    with pytest.raises(TypeError, match="unknown option"), attn.options(ONE_LOOP=True):
        pass
    assert current_options() == default


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


def test_a_spied_runtime_kernel_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from patterndsl.runtime import forward

    real = forward._attn_fwd_fast
    with monkeypatch.context() as m:
        spy_launches(m, forward, "_attn_fwd_fast", [], lambda kw: None)
        assert forward._attn_fwd_fast is not real
    assert forward._attn_fwd_fast is real
