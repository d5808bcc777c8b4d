"""docs/language.md stays true: every `pat` example checks, and every mask picture is the pattern's mask.

The reference is read by users as the definition of the language; an example that no longer parses or a
picture that no longer matches the reference mask would teach them something false.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import ROOT

import patterndsl as P

DOC = ROOT / "docs" / "language.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
PICTURE = re.compile(r"^(?P<source>.+) at N = (?P<n>\d+)$")


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text(encoding="utf-8")) if lang == kind]


def _pictures() -> list[tuple[str, int, list[str]]]:
    out = []
    for body in _blocks("text"):
        first, *rows = body.rstrip("\n").split("\n")
        if m := PICTURE.match(first):
            out.append((m["source"], int(m["n"]), rows))
    return out


def test_the_reference_has_examples_and_pictures() -> None:
    assert len(_blocks("pat")) >= 16
    assert len(_pictures()) >= 12


@pytest.mark.parametrize("text", _blocks("pat"), ids=lambda t: t.splitlines()[0][:40])
def test_every_pat_example_checks(text: str) -> None:
    program = P.loads(text, "docs/language.md")
    assert program.names(), "an example should define at least one pattern or model"


@pytest.mark.parametrize("source, n, rows", _pictures(), ids=lambda x: str(x)[:40])
def test_every_mask_picture_is_the_reference_mask(source: str, n: int, rows: list[str]) -> None:
    drawn = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    assert drawn.shape == (n, n), f"{source}: the picture is {drawn.shape}, not {n} x {n}"
    assert set("".join(rows)) <= {"#", "."}
    np.testing.assert_array_equal(drawn, P.dense_mask(P.pattern(source), n), err_msg=source)
