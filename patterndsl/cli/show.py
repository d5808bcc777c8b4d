"""`patc show`: look at a pattern."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from .. import ir
from ..draw import save_png, unicode_picture
from ..mask import dense_mask
from ..source import PatternError
from .common import add_file_options, load_program, positive_int, select_pattern


def register(sub: Any) -> None:
    p = sub.add_parser(
        "show",
        help="draw a pattern in the terminal or as a PNG",
        description="Draw the mask of a static pattern at sequence length N: query i down, key j across. "
        "In the terminal each character covers a 2x2 group of cells, drawn when any pair in it is allowed.",
    )
    add_file_options(p)
    p.add_argument("-N", dest="n", type=positive_int, required=True, help="sequence length")
    p.add_argument("--head", type=int, default=None, help="for a heads { } pattern: which head (default: all)")
    p.add_argument("--width", type=positive_int, default=None, help="characters across (default: terminal width)")
    p.add_argument("-o", "--output", metavar="OUT.png", help="write a picture with axes and a title instead")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    program = load_program(args)
    item = select_pattern(program, args.pattern, "show")
    bodies: list[tuple[str, ir.Pattern]]
    if isinstance(item.body, ir.Heads):
        heads = range(item.body.count) if args.head is None else [args.head]
        if args.head is not None and not 0 <= args.head < item.body.count:
            raise PatternError(f"--head {args.head}: '{item.name}' has heads 0..{item.body.count - 1}")
        bodies = []
        for r in item.body.ranges:
            hs = [h for h in heads if r.start <= h < r.stop]
            if hs:
                bodies.append((f"heads {hs[0]}:{hs[-1] + 1}", r.pattern))
    else:
        bodies = [("", item.body)]
    width = args.width or max(16, min(64, shutil.get_terminal_size((80, 24)).columns - 2))
    for k, (label, body) in enumerate(bodies):
        m = dense_mask(body, args.n)
        title = f"{item.name}{' ' + label if label else ''}  N={args.n}  density {m.mean():.2%}"
        if args.output:
            path = args.output if len(bodies) == 1 else _numbered(args.output, k)
            save_png(m, path, f"{program.path}: {title}")
            print(f"wrote {path}")
        else:
            print(title)
            print(unicode_picture(m, width))
    return 0


def _numbered(path: str, k: int) -> str:
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{k}.{ext}" if dot else f"{path}-{k}"
