"""Module attributes set for a block of a test and put back after it: P.compile caches one module per source,
so a switch (or a stubbed function) left set would leak into every later test of the same pattern."""

from __future__ import annotations

from collections.abc import Iterator
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
