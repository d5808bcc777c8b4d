"""Module attributes set for a block of a test and put back after it: P.compile caches one module per source,
so a switch (or a stubbed function, or a spied-on kernel) left set would leak into every later test of the same
pattern."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def switched(module: Any, changes: dict[str, Any] | None) -> Iterator[Any]:
    saved = {key: getattr(module, key) for key in changes or {}}
    try:
        for key, value in (changes or {}).items():
            setattr(module, key, value)
        yield module
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


def spy_launches(monkeypatch: Any, module: Any, name: str, log: list[Any], record: Callable[[dict[str, Any]], Any]) -> None:
    """Kernel `name` of `module` launched as before, each launch first appending `record(its keyword arguments)`
    to `log`; undone with the test's monkeypatch."""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                log.append(record(kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Spy())
