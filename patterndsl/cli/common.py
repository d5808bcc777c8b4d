"""Options and lookups shared by the commands: which file, which pattern, which params."""

from __future__ import annotations

import argparse

from .. import ir, load
from ..source import PatternError, did_you_mean


def add_file_options(p: argparse.ArgumentParser, pattern_required: bool = False) -> None:
    p.add_argument("file", metavar="FILE", help="a .pat file")
    p.add_argument(
        "-p", "--pattern", metavar="NAME", required=pattern_required,
        help="which pattern or model of the file (default: the only one)",
    )  # fmt: skip
    p.add_argument(
        "-D", dest="defines", metavar="NAME=VALUE", action="append", default=[],
        help="override a param of the file (repeatable), e.g. -D w=2048",
    )  # fmt: skip


def parse_defines(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise PatternError(f"-D {item}: expected NAME=VALUE", None, "e.g. -D w=2048")
        out[name.strip()] = value.strip()
    return out


def load_program(args: argparse.Namespace) -> ir.Program:
    return load(args.file, parse_defines(args.defines))


def select(program: ir.Program, name: str | None) -> ir.PatternDef | ir.Model:
    """The named pattern or model, or the file's only one."""
    names = program.names()
    if name is None:
        if len(names) == 1:
            item = program.get(names[0])
            assert item is not None
            return item
        if not names:
            raise PatternError(f"{program.path} defines no pattern")
        raise PatternError(
            f"{program.path} defines {len(names)} patterns; choose one with -p", None,
            f"one of: {', '.join(names)}",
        )  # fmt: skip
    item = program.get(name)
    if item is None:
        hint = did_you_mean(name, names) or f"it defines: {', '.join(names) or 'nothing'}"
        raise PatternError(f"{program.path} has no pattern or model '{name}'", None, hint)
    return item


def select_pattern(program: ir.Program, name: str | None, what: str) -> ir.PatternDef:
    item = select(program, name)
    if isinstance(item, ir.Model):
        raise PatternError(
            f"'{item.name}' is a model; {what} works on one pattern", None,
            "name one of its layers' patterns with -p, or use 'patc analyze' for the whole model",
        )  # fmt: skip
    return item


def heads_given(item: ir.PatternDef | ir.Model, asked: int | None) -> int | None:
    """The head count a command runs with: the one the file defines (a heads block), which --heads may
    repeat but not contradict; else --heads; else None."""
    schedule = item.schedule if isinstance(item, ir.Model) else (item.body,)
    defined = next((b.count for b in schedule if isinstance(b, ir.Heads)), None)
    if defined is not None and asked is not None and asked != defined:
        raise PatternError(
            f"--heads {asked}: '{item.name}' defines {defined} heads", None,
            f"leave --heads out, or give --heads {defined}",
        )  # fmt: skip
    return defined if defined is not None else asked


def no_heads(item: ir.PatternDef, option: str, value: int) -> PatternError:
    """A per-head option given for a pattern that has no heads block (it is never silently ignored)."""
    return PatternError(
        f"{option} {value}: '{item.name}' has no heads block; it is the same for every head", None, f"drop {option}"
    )


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value
