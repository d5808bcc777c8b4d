"""The run-time half of patterndsl: kernels, block tables, autotuning and autograd, as importable modules.

A compiled pattern is a small module holding only what depends on the pattern (its predicates as
`@triton.jit` functions and as index expressions, its data) and one `Attention(PatternSpec(...))`.
Importing `patterndsl.runtime` loads torch and triton; the compiler and the analysis never import it, except
its torch-free modules `draw` and `evaluate`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Attention", "BlockMask", "Options", "PatternSpec", "Predicate", "Requirement", "Selector",
           "TokenLayout", "TokenSelection", "capture", "compressed_attention"]

_WHERE = {
    "Attention": "api", "BlockMask": "api", "Options": "options", "PatternSpec": "spec",
    "Predicate": "spec", "Requirement": "spec", "Selector": "spec", "TokenLayout": "spec",
    "TokenSelection": "spec",
    "capture": "graphs", "compressed_attention": "compressed",
}


def __getattr__(name: str) -> Any:
    """Load the torch-dependent modules on first use, so `runtime.draw` and `runtime.evaluate` stay light."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
