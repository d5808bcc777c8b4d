"""`model` and `heads` as LANGUAGE.md defines them: which layer and which head gets which pattern."""

from __future__ import annotations

import pytest
from helpers import EXAMPLES
from hypothesis import given
from hypothesis import strategies as st

import patterndsl as P
from patterndsl import ir


def test_spec_masformer_schedule() -> None:
    """every 4 => causal (layers 0, 4, 8, ...), else => causal & window(1023)."""
    model = P.load(EXAMPLES / "model.pat").get("masformer")
    assert isinstance(model, ir.Model) and model.layers == 24
    full, local = P.pattern("causal"), P.pattern("causal & window(1023)")
    assert model.schedule == tuple(full if layer % 4 == 0 else local for layer in range(24))
    assert model.distinct() == (full, local)


def test_spec_moa_heads() -> None:
    body = P.load(EXAMPLES / "model.pat").get("moa").body  # type: ignore[union-attr]
    assert isinstance(body, ir.Heads) and body.count == 16
    expected = {0: "causal & window(255)", 4: "causal & window(2047)", 12: "causal & (window(127) | sink(64))"}
    for h in range(16):
        start = max(s for s in expected if s <= h)
        assert body.pattern_for(h) == P.pattern(expected[start])


@given(
    layers=st.integers(1, 40),
    every=st.integers(1, 6),
    start=st.integers(0, 39),
    length=st.integers(1, 10),
    range_first=st.booleans(),
)
def test_first_entry_that_holds_a_layer_wins(
    layers: int, every: int, start: int, length: int, range_first: bool
) -> None:
    start = min(start, layers - 1)
    stop = min(layers, start + length)
    entries = [f"every {every} => sink(1)", f"{start}:{stop} => sink(2)"]
    if range_first:
        entries.reverse()
    text = f"model m = layers({layers}) {{\n    " + "\n    ".join(entries) + "\n    else => sink(3)\n}\n"
    model = P.loads(text).get("m")
    assert isinstance(model, ir.Model)
    for layer, body in enumerate(model.schedule):
        in_every, in_range = layer % every == 0, start <= layer < stop
        if range_first:
            want = 2 if in_range else 1 if in_every else 3
        else:
            want = 1 if in_every else 2 if in_range else 3
        assert body == P.pattern(f"sink({want})"), (layer, text)


def test_a_model_layer_may_name_a_heads_pattern() -> None:
    text = (
        "pattern moa = heads {\n    0:2 => causal\n    2:4 => window(1)\n}\n"
        "pattern same = moa\n"
        "model m = layers(3) {\n    every 2 => moa\n    else => causal\n}\n"
    )
    program = P.loads(text)
    moa = program.get("moa").body  # type: ignore[union-attr]
    assert isinstance(moa, ir.Heads)
    assert program.get("same").body == moa  # type: ignore[union-attr]
    model = program.get("m")
    assert isinstance(model, ir.Model) and model.schedule == (moa, P.pattern("causal"), moa)


def test_a_heads_pattern_cannot_be_combined() -> None:
    with pytest.raises(P.PatternError, match="'moa' is a heads pattern and cannot be combined with others"):
        P.loads("pattern moa = heads {\n    0:2 => causal\n}\npattern p = moa | causal\n")


def test_heads_inside_a_model_entry() -> None:
    text = "model m = layers(2) {\n    0:1 => heads {\n        0:1 => full\n        1:3 => none\n    }\n    else => causal\n}\n"
    model = P.loads(text).get("m")
    assert isinstance(model, ir.Model)
    first = model.schedule[0]
    assert isinstance(first, ir.Heads) and first.count == 3 and first.pattern_for(2) == ir.Empty()
