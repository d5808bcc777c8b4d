"""A spy on a runtime kernel, put back after the test: the runtime modules are shared by every compiled
pattern, so a spied-on kernel left in place would leak into every later test. (Kernel options need no
helper: `with attn.options(...)` sets them for one block and restores them on exit.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def spy_launches(monkeypatch: Any, module: Any, name: str, log: list[Any], record: Callable[[dict[str, Any]], Any]) -> None:
    """Kernel `name` of runtime module `module` (e.g. `patterndsl.runtime.forward`, which launches
    `_attn_fwd_fast`) launched as before, each launch first appending `record(its keyword arguments)` to
    `log`; undone with the test's monkeypatch."""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                log.append(record(kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Spy())
