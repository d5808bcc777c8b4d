"""`patc compile`: a pattern becomes a small Python module (its predicates and one call into the runtime), or
with --standalone a package that carries the runtime and imports only torch and triton."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..check import kernel_limits
from ..source import PatternError
from .common import add_file_options, load_program, parse_defines, select
from .output import MODULE, add_force_option, claim, claim_folder, write_text


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compile",
        help="write a Python module with the pattern's attention kernel",
        description="Compile one pattern of a .pat file to a readable module holding the pattern's predicates, "
        "which imports patterndsl's runtime (or, with --standalone, a copy of it) and exposes attention(q, k, v) "
        "with SDPA's [B, H, N, D] convention.",
    )
    add_file_options(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.py", help="where to write the module")
    p.add_argument(
        "--standalone",
        action="store_true",
        help="write OUT as a package folder that imports only torch and triton (the runtime's files copied in)",
    )
    add_force_option(p)
    p.add_argument("--block-m", type=int, help="query block size (default: tuned per head_dim)")
    p.add_argument("--block-n", type=int, help="key block size (default: tuned per head_dim)")
    p.add_argument(
        "--bwd-tiles",
        metavar="BM1,BN1,BM2,BN2,W,S[,W2,S2]",
        help="backward tiles: dK/dV's query and key blocks, dQ's query and key blocks, warps and stages (one pair "
        "for both kernels, or dK/dV's then dQ's); default: per head_dim, measured on the H100",
    )
    p.set_defaults(run=run)


def _bwd_tiles(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise PatternError(
            f"--bwd-tiles takes comma-separated integers (BM1,BN1,BM2,BN2,warps,stages), got '{text}'"
        ) from None


def run(args: argparse.Namespace) -> int:
    from ..compile import compile_source

    if args.standalone:
        claim_folder(args.output, "-o", [args.file], args.force)
    else:
        claim(args.output, "-o", MODULE, [args.file], args.force)
    # the file's errors, and what a kernel cannot do, pointed at in the file before compile_source runs
    kernel_limits(select(load_program(args), args.pattern))
    try:
        compiled = compile_source(
            Path(args.file),
            args.pattern,
            parse_defines(args.defines),
            block_m=args.block_m,
            block_n=args.block_n,
            bwd_config=_bwd_tiles(args.bwd_tiles),
            standalone=args.standalone,
        )
    except ValueError as e:
        if isinstance(e, PatternError):
            raise
        raise PatternError(str(e)) from None
    if args.standalone:
        from ..compile import write_standalone

        try:
            write_standalone(compiled, Path(args.output))
        except OSError as e:
            raise PatternError(f"cannot write {args.output}: {e.strerror}") from None
    else:
        write_text(args.output, compiled.text)
    print(f"{args.output}: attention kernel for '{compiled.name}' (source sha256 {compiled.sha256[:12]})")
    return 0
