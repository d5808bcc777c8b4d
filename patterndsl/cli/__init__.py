"""`patc`: the command line. One module per command; each has `register(subparsers)` and `run(args)`.

Every user mistake reaches the terminal as a PatternError (`file:line:col: error: ...`) and exit
status 2; a traceback means a bug in patterndsl, and says so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from ..source import PatternError

COMMANDS = ("check", "show", "mask", "fmt", "analyze", "compile", "bench", "from-hf")

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patc",
        description="patterndsl: check, show, analyse and compile sparse-attention patterns.",
        epilog="Run 'patc COMMAND --help' for the options of one command.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"patc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name.replace('-', '_')}", __name__)
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name.replace('-', '_')}":
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
    except PatternError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except RecursionError:
        print("error: the pattern is nested too deeply for patc", file=sys.stderr)
        print("  hint: name parts of it with 'let' and keep chains of 'let' shallow", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if isinstance(e, OSError) and e.filename is not None:
            # a path the user named cannot be read or written: their environment, not our bug
            print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
            print("  hint: check that the folder exists and that you may write there", file=sys.stderr)
            return EXIT_USER_ERROR
        if os.environ.get("PATC_DEBUG"):
            raise
        print("patc: internal error, a bug in patterndsl; please report it with this output:", file=sys.stderr)
        traceback.print_exc()
        return 70
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
