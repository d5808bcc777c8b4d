"""`patc fmt`: canonical formatting."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..check import check
from ..fmt import format_module
from ..parse import parse
from ..source import read_source
from .output import write_text


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fmt",
        help="print a file in canonical form",
        description="Print each file in canonical form (comments kept). The result checks to the same "
        "patterns as the input. With --write, rewrite the files; with --check, exit 1 if any would change.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    mode.add_argument("--check", action="store_true", help="only report files that are not formatted")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    changed = 0
    for path in args.files:
        text = read_source(path)
        module = parse(text, path)
        check(module, path)  # never format a file that does not check
        out = format_module(module)
        if out != text:
            changed += 1
        if args.check:
            if out != text:
                print(f"{path}: would reformat")
        elif args.write:
            if out != text:
                write_text(path, out)  # in place: that is its job
                print(f"reformatted {path}")
        else:
            sys.stdout.write(out)
    return 1 if args.check and changed else 0
