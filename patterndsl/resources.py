"""Where the grammar and the kernel templates live, installed or in a checkout.

The wheel carries `grammar/` and `codegen/` inside the package (as `patterndsl/_grammar` and
`patterndsl/_codegen`, see pyproject.toml); a source checkout or an editable install reads the
top-level folders of the repository. Nothing else in the package knows the difference.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _folder(name: str) -> Path:
    installed = _PACKAGE / f"_{name}"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"patterndsl is installed without its {name}/ folder (looked in {installed} and {checkout})")


def grammar_text() -> str:
    return (_folder("grammar") / "patterndsl.lark").read_text(encoding="utf-8")


def codegen_template(name: str) -> str:
    return (_folder("codegen") / name).read_text(encoding="utf-8")


def codegen_dir() -> Path:
    return _folder("codegen")
