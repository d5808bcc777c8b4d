"""`patc check FILE...`: parse and check files; say what each defines."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import ir, load
from ..check import kernel_limits
from ..source import PatternError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="parse and check .pat files",
        description="Parse and check each file; print what it defines, or every file's first error. "
        "Exit status 2 when any file has an error.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            program = load(path)
            items: list[ir.PatternDef | ir.Model] = [*program.patterns, *program.models]
            for item in items:
                kernel_limits(item)  # check ok means compile ok
        except PatternError as e:
            print(e.render(), file=sys.stderr)
            failed += 1
            continue
        if not args.quiet:
            print(f"{path}: ok: {_summary(program)}")
            _decode_notes(path, program)
    if len(args.files) > 1 and not args.quiet:
        print(f"{len(args.files) - failed} of {len(args.files)} files ok")
    return 2 if failed else 0


def _decode_notes(path: str, program: ir.Program) -> None:
    """A note (not an error) per pattern that cannot be decoded token by token: its rows read N."""
    from ..analysis.retention import inconsistent_patterns

    for name, why in inconsistent_patterns(program):
        item = program.get(name)
        where = str(item.span) if item is not None and item.span is not None else path
        print(f"{where}: note: '{name}' is not decode-consistent: {why}", file=sys.stderr)


def _summary(program: ir.Program) -> str:
    parts = []
    for p in program.patterns:
        tags = []
        if isinstance(p.body, ir.Heads):
            tags.append(f"{p.body.count} heads")
        if any(ir.is_dynamic(x) for x in ir.body_patterns(p.body)):
            tags.append("dynamic")
        if p.permute is not None:
            tags.append(f"permuted in segments of {p.permute.segment}")
        parts.append(p.name + (f" ({', '.join(tags)})" if tags else ""))
    parts += [f"{m.name} (model, {m.layers} layers)" for m in program.models]
    return ", ".join(parts) or "no patterns"
