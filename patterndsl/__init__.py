"""patterndsl: a declarative language and compiler for sparse attention.

The pipeline, one module per stage: `parse` (text -> syntax tree) -> `check` (-> `ir`) -> `semantics`
(each construct's predicate) -> passes (`mask` reference, analysis, block tables) -> codegen -> runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ir
from .source import PatternError

__all__ = ["Analysis", "PatternError", "analyze", "compile", "dense_mask", "ir", "load", "loads", "pattern"]
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


@dataclass(frozen=True)
class Analysis:
    """What `patc analyze` reports, as data: `figures` holds every number (pairs, FLOPs, tile efficiency,
    bytes, receptive field through depth, warnings) under the same keys as `patc analyze --json`."""

    name: str
    n: int
    figures: Mapping[str, Any]

    def to_json(self) -> str:
        import json

        return json.dumps(dict(self.figures), indent=2, sort_keys=True)

    def __getitem__(self, key: str) -> Any:
        return self.figures[key]

    @property
    def decode_consistent(self) -> tuple[bool, str | None]:
        """(True, None) when every pattern analysed can be decoded token by token, else (False, why)."""
        for e in self.figures["patterns"]:
            if not e["decode"]["consistent"]:
                return False, e["decode"]["reason"]
        return True, None


def analyze(
    source: str | Path | ir.Program | ir.Pattern,
    name: str | None = None,
    *,
    N: int,  # noqa: N803 (the papers' name for the sequence length)
    heads: int | None = None,
    head_dim: int = 128,
    batch: int = 1,
    layers: int | None = None,
    block_size: tuple[int, int] = (128, 128),
    defines: Mapping[str, str | int | float] | None = None,
    decode: bool = False,
) -> Analysis:
    """Cost and reach of a pattern at sequence length N: the figures of `patc analyze` as an `Analysis`.
    `source`: a `.pat` path or text, a checked Program, or one pattern (`pattern("causal & window(3)")`).
    `decode=True` adds `patc analyze --decode`'s figures (each pattern's `["decode"]["steps"]`)."""
    from .analysis.analyze import Options
    from .analysis.analyze import analyze as run
    from .cli.common import select

    if isinstance(source, ir.Program):
        item: ir.PatternDef | ir.Model = select(source, name)
    elif ir.is_pattern(source):
        item = ir.PatternDef(name or "pattern", source)  # type: ignore[arg-type]
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith(".pat")):
        item = select(load(source, defines), name)
    elif isinstance(source, str):
        item = select(loads(source, "<string>", defines), name)
    else:
        raise TypeError(f"analyze takes a .pat path or text, a Program or a pattern, got {type(source).__name__}")
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive integer, got {N!r}")
    bq, bk = block_size
    from .analysis.decode_cost import DECODE_SIZES

    opts = Options(n=N, heads=heads, head_dim=head_dim, batch=batch, block_q=bq, block_k=bk, layers=layers,
                   decode=DECODE_SIZES if decode else ())  # fmt: skip
    return Analysis(item.name, N, run(item, opts))
