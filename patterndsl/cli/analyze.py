"""`patc analyze`: exact and symbolic cost, tile efficiency and receptive field of a pattern or model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import ir
from ..analysis.decode_cost import DECODE_SIZES, DTYPE_BYTES
from ..analysis.limits import ARRAY_LIMIT, MAX_N
from ..analysis.reach import BLOCK_UNITS, TOKEN_LIMIT
from ..source import PatternError
from .common import add_file_options, heads_given, load_program, positive_int, select
from .output import PICTURE, add_force_option, claim, picture_format, write_atomically


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="pairs, FLOPs, bytes, tile efficiency and receptive field of a pattern or model",
        description="Count the allowed pairs of a static pattern at sequence length N exactly (no N x N "
        "mask), give nnz(N) in closed form where one exists, the FLOPs and bytes of a block-sparse kernel "
        "at the given tile size, and how far information travels through a stack of layers.",
        epilog=LIMITS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_file_options(p)
    p.add_argument(
        "-N", dest="n", type=positive_int, required=True, help="sequence length, 1 to 2**60 (see limits below)"
    )
    p.add_argument("--heads", type=positive_int, help="heads per layer (default: the heads block's count, else 1)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dimension D (default 128)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size B (default 1)")
    p.add_argument("--block", default="128x128", metavar="BQxBK", help="kernel tile size (default 128x128)")
    p.add_argument("--layers", type=positive_int, help="report coverage after L layers of the same pattern")
    p.add_argument(
        "--selected",
        type=positive_int,
        metavar="K",
        help="key blocks a dynamic selector keeps per query block (default: topk's n; threshold: all candidates)",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="per-token decode cost (keys and bytes read) and cache size kept, at N = 1k, 8k, 64k, 512k, 4M",
    )
    p.add_argument(
        "--kv-dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="cached key/value type for --decode (bf16)"
    )
    p.add_argument(
        "--ranks", type=positive_int, metavar="R",
        help="context parallelism over R ranks: per-rank pairs, imbalance and bytes sent, ours beside a ring",
    )  # fmt: skip
    p.add_argument(
        "--docs", metavar="COUNT|L1,L2,..",
        help="with --ranks: packed documents, a count of random lengths (see --seed) or the lengths",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="with --docs COUNT: the random lengths' seed (default 0)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON instead of tables")
    p.add_argument("--plot", metavar="OUT.png", help="write coverage-vs-depth and density-vs-N plots")
    add_force_option(p)
    p.set_defaults(run=run)


LIMITS = f"""limits:
  N               at most 2**60 = {MAX_N:,}: the analysis computes in 64-bit integers. A pattern
                  whose own arithmetic (e.g. q * k) would pass 2**62 at that N is refused, with the
                  largest N it allows.
  exact at any N  in time and memory that do not grow with N: patterns built from conditions on
                  q - k, on q and on k (causal, window, sink, global, rows, cols, hops, dilations and
                  the set operations on them, and blockwise of those), neighborhoods with axes up to
                  {ARRAY_LIMIT:,}, and every closed form nnz(N).
  exact up to N = {ARRAY_LIMIT:,}
                  any other static pattern whose rows can be counted within a fixed work budget
                  (O(N) memory).
  bounds          otherwise: each such figure is printed lo..hi (JSON: {{"lower": .., "upper": ..}}) and a
                  warning says which figures are bounded and why.
  receptive field at most {BLOCK_UNITS} blocks a side past N = {TOKEN_LIMIT:,}, unless exact through the
                  offset structure (windows at any N).
"""


def _block(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        q, k = (int(x) for x in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise PatternError(f"--block {text}: expected BQxBK, e.g. 128x64") from None
    if q < 1 or k < 1:
        raise PatternError(f"--block {text}: tile sides must be at least 1")
    return q, k


def run(args: argparse.Namespace) -> int:
    from ..analysis.analyze import Options, analyze, density_curves
    from ..analysis.report import plot, render, to_json

    if args.plot:
        claim(args.plot, "--plot", PICTURE, [args.file], args.force)
        picture_format(args.plot, "--plot")
    program = load_program(args)
    item = select(program, args.pattern)
    bq, bk = _block(args.block)
    heads_given(item, args.heads)  # a contradiction reads as in every command
    opts = Options(args.n, args.heads, args.head_dim, args.batch, bq, bk, args.layers, args.selected,
                   DECODE_SIZES if args.decode else (), DTYPE_BYTES[args.kv_dtype])  # fmt: skip
    result = analyze(item, opts)
    result["file"] = args.file
    if args.docs is not None and args.ranks is None:
        raise PatternError("--docs describes the documents of a context-parallel run: it needs --ranks")
    if args.ranks is not None:
        result["context_parallel"] = _ranks(item, args)
    if args.plot:
        patterns = ir.body_patterns(item.body) if isinstance(item, ir.PatternDef) else tuple(
            p for body in item.distinct() for p in ir.body_patterns(body)
        )  # fmt: skip
        curves = density_curves(patterns, args.n)
        write_atomically(args.plot, lambda f: plot(result, curves, f.name))  # plot() writes to a path
        result["plot"] = args.plot
    if args.json:
        sys.stdout.write(to_json(result) + "\n")
    else:
        render(result)
        if args.ranks is not None:
            from ..distributed.report import render_ranks

            render_ranks(result["context_parallel"])
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _ranks(item: ir.PatternDef | ir.Model, args: argparse.Namespace) -> dict[str, Any]:
    """The `--ranks` figures (tiles of --block's query side)."""
    from ..analysis.analyze import _head_count
    from ..analysis.limits import ARRAY_LIMIT as ROWS
    from ..distributed.report import parse_docs, ranks_report, terms_of

    if args.n > ROWS:
        raise PatternError(f"--ranks counts every row's pairs: N up to {ROWS:,}, got {args.n:,}")
    docs = None if args.docs is None else parse_docs(args.docs, args.n, args.seed)
    heads = _head_count(item, args.heads)
    return ranks_report(terms_of(item, args.heads), args.n, args.ranks, docs, _block(args.block)[0], heads,
                        args.head_dim, args.batch)
