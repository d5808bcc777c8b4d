"""patterndsl: a declarative language and compiler for sparse attention.

The pipeline, one module per stage: `parse` (text -> syntax tree) -> `check` (-> `ir`) -> `semantics`
(each construct's predicate) -> passes (`mask` reference, analysis, block tables) -> codegen -> runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from . import ir
from .source import PatternError

__all__ = ["PatternError", "ir", "load", "loads", "pattern", "dense_mask", "compile"]
__version__ = "0.1.0"


def loads(text: str, path: str = "<string>", defines: Mapping[str, str | int | float] | None = None) -> ir.Program:
    """Parse and check the text of a `.pat` file."""
    from .check import check
    from .parse import parse

    return check(parse(text, path), path, {k: str(v) for k, v in (defines or {}).items()})


def load(path: str | Path, defines: Mapping[str, str | int | float] | None = None) -> ir.Program:
    """Parse and check a `.pat` file."""
    from .source import read_source

    return loads(read_source(path), str(Path(path)), defines)


def pattern(text: str, **params: int | float) -> ir.Pattern:
    """One pattern expression from Python: `pattern("causal & window(w)", w=1023)`."""
    head = "".join(f"param {k} = {v}\n" for k, v in params.items())
    program = loads(f"{head}pattern _ = {text}\n", "<pattern>")
    body = program.patterns[0].body
    if isinstance(body, ir.Heads):
        raise PatternError("pattern() takes a single pattern expression, not heads { }")
    return body


def dense_mask(body: ir.Body | str, n: int, heads: int | None = None):  # type: ignore[no-untyped-def]
    """The dense boolean mask [N, N] (or [H, N, N]) of a static pattern: the reference semantics."""
    from .mask import dense_mask as build

    return build(pattern(body) if isinstance(body, str) else body, n, heads)



# The driver, bound to the package name `compile` (this import also keeps the submodule
# `patterndsl.compile` from shadowing the function).
from .compile import compile  # noqa: E402, A004
