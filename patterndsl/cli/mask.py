"""`patc mask`: the reference mask as a numpy file."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from .. import ir
from ..mask import dense_mask
from .common import add_file_options, heads_given, load_program, no_heads, positive_int, select_pattern
from .output import MASK, add_force_option, claim, write_atomically


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mask",
        help="write the dense boolean mask of a pattern (.npy)",
        description="Evaluate a static pattern at sequence length N and write a numpy bool array: "
        "[N, N], or [H, N, N] for a heads pattern. mask[i, j] says whether query i may attend to key j.",
    )
    add_file_options(p)
    p.add_argument("-N", dest="n", type=positive_int, required=True, help="sequence length")
    p.add_argument("--heads", type=positive_int, help="for a heads { } pattern: its head count (optional, checked)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npy", help="the file to write, exactly as named")
    add_force_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    claim(args.output, "-o", MASK, [args.file], args.force)
    program = load_program(args)
    item = select_pattern(program, args.pattern, "mask")
    if not isinstance(item.body, ir.Heads) and args.heads is not None:
        raise no_heads(item, "--heads", args.heads)
    m = dense_mask(item.body, args.n, heads_given(item, args.heads))
    write_atomically(args.output, lambda f: np.save(f, m, allow_pickle=False))  # np.save(name) adds '.npy'
    allowed = int(m.sum())
    print(f"{args.output}: {'x'.join(map(str, m.shape))} bool, {allowed} allowed pairs ({allowed / m.size:.4%})")
    return 0
