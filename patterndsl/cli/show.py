"""`patc show`: look at a pattern."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

import numpy as np

from .. import ir
from ..draw import picture, png_cells, terminal_cells, unicode_cells
from ..mask import cell_density
from ..source import PatternError
from .common import add_file_options, load_program, no_heads, positive_int, select_pattern
from .output import PICTURE, add_force_option, claim, picture_format, save_figure


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
    p.add_argument(
        "-o", "--output", metavar="OUT.png",
        help="write a picture with axes and a title instead (.png, .pdf, .svg, .eps or .ps)",
    )  # fmt: skip
    add_force_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    program = load_program(args)
    item = select_pattern(program, args.pattern, "show")
    bodies: list[tuple[str, ir.Pattern]]
    if args.head is not None and not isinstance(item.body, ir.Heads):
        raise no_heads(item, "--head", args.head)
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
    paths: list[str] = []
    if args.output is not None:
        paths = [args.output] if len(bodies) == 1 else [_numbered(args.output, k) for k in range(len(bodies))]
        for path in paths:
            claim(path, "-o", PICTURE, [args.file], args.force)
        fmt = picture_format(args.output, "-o")
    width = args.width or max(16, min(64, shutil.get_terminal_size((80, 24)).columns - 2))
    n = args.n
    rows, cols = png_cells(n, n) if args.output else terminal_cells(n, n, width)
    drawn = []
    for label, body in bodies:  # every head range first: an error leaves no picture written
        # Cell densities are built a chunk of queries at a time: no N x N mask, whatever N.
        cells = cell_density(body, n, rows, cols)
        density = _overall_density(cells, n, rows, cols)
        order = "  (in the permuted order)" if isinstance(item, ir.PatternDef) and item.permute else ""
        drawn.append((f"{item.name}{' ' + label if label else ''}  N={n}  density {density:.2%}{order}", cells))
    for k, (title, cells) in enumerate(drawn):
        if args.output:
            save_figure(picture(cells, n, n, f"{program.path}: {title}"), paths[k], fmt)
            print(f"wrote {paths[k]}")
        else:
            print(title)
            print(unicode_cells(cells > 0))
    return 0


def _overall_density(cells: np.ndarray, n: int, rows: int, cols: int) -> float:
    ri = np.bincount((np.arange(n) * rows) // n, minlength=rows)
    ci = np.bincount((np.arange(n) * cols) // n, minlength=cols)
    return float((cells * ri[:, None] * ci[None, :]).sum() / (n * n))


def _numbered(path: str, k: int) -> str:
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{k}.{ext}" if dot else f"{path}-{k}"
