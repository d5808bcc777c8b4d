"""Token layouts on the fast kernel (`runtime.layout_order`): q, k, v gathered into the layout's row order,
`_attn_fwd_fast` over those buffers, the output and log-sum-exp gathered back. In Triton's interpreter
(float32) against the float64 reference built from the brute-force mask (tests/reference.py) and against
the pointer-load kernel reading the layout in place (`layout_gather=False`), outputs written into NaN-filled
`out=` / `lse=`; the backward, unchanged, still matches the reference after this forward. Layouts are the
compiler's where it chooses one at these tiles, else given (`layout=`): a DiT-like grid with text tokens
before it, and padding rows in the prefix and the cells."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from helpers import LIBRARY, attention_reference, check_grads, poisoned, spy_launches
from reference import reference_mask

import patterndsl as P
from patterndsl import expr as E
from patterndsl import ir
from patterndsl import layout as L

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
warnings.filterwarnings("ignore", message=".*CPU tensors take a PyTorch reference path.*")

SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))
DIT = {"text": 7, "frames": 3, "height": 4, "width": 5, "kt": 2, "ks": 3}  # 7 text tokens before 3 x 4 x 5 cells
# the DiT's cells in 1 x 4 x 4 boxes: its 7 text tokens padded to a tile, the width (5) padded to 8
DIT_LAYOUT = L.Layout((L.Axis(E.const(3), 1, (1,)), L.Axis(E.const(4), 1, (4,)), L.Axis(E.const(5), 1, (4,))), 7)

# name: (source or library file, pattern, defines, N, a given layout or None: the compiler's)
CASES: dict[str, tuple[str, str, dict[str, int], int, L.Layout | None]] = {
    "nat_2d": ("layout g = grid(8, 16)\npattern p = neighborhood(g, kernel=(3, 3))\n", "p", {}, 128, None),
    "dilated_2d": ("layout g = grid(10, 10)\npattern p = neighborhood(g, kernel=(3, 3), dilation=(2, 2))\n", "p",
                   {}, 100, None),  # fmt: skip  (residue classes, cells padded: 192 rows)
    "video_3d": ("layout g = grid(4, 6, 6)\npattern p = neighborhood(g, kernel=(3, 3, 3))\n", "p", {}, 144, None),
    "dilated_1d": ("pattern p = causal & window(40, dilation=4)\n", "p", {}, 77, None),  # 128 rows
    "video_dit": ("video_dit.pat", "video_dit", DIT, 7 + 60, DIT_LAYOUT),
    "heads": ("layout g = grid(10, 10)\npattern p = heads {\n  0:1 => neighborhood(g, kernel=(3, 3), dilation=(2, 2))"
              "\n  1:2 => causal & window(9)\n}\n", "p", {}, 100, None),  # fmt: skip  (head 0 only has a layout)
}


def _case(name: str) -> tuple[Any, np.ndarray]:
    src, pattern, defines, n, layout = CASES[name]
    program = P.load(LIBRARY / src, defines) if src.endswith(".pat") else P.loads(src, defines=defines)
    item = program.get(pattern)
    assert isinstance(item, ir.PatternDef)
    attn = P.compile(program, pattern, **SMALL, **({} if layout is None else {"layout": layout}))
    assert attn.spec.layouts[0] is not None, f"{name}: no token layout at these tiles"
    return attn, reference_mask(item.body, n)


def _forward(attn: Any, mask: np.ndarray, gather: bool, monkeypatch: Any, d: int = 16) -> tuple[Any, Any, Any, Any]:
    """(out, lse, reference out, reference lse) of one poisoned call with `layout_gather=gather` (query heads
    sharing one KV head), after checking which kernel served the layout (the fast one over n tokens'
    rows, or `_attn_fwd` reading it in place)."""
    from patterndsl.runtime import forward

    n = mask.shape[-1]
    h = attn.spec.heads or 2
    hkv = 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for heads in (h, hkv, hkv))
    fast: list[Any] = []
    general: list[Any] = []
    with monkeypatch.context() as m:
        spy_launches(m, forward, "_attn_fwd_fast", fast, lambda kw: kw.get("NTOK"))
        spy_launches(m, forward, "_attn_fwd", general, lambda kw: kw["LAYOUT"] is not None)
        with attn.options(layout_gather=gather):
            out, lse = poisoned(attn, q, k, v)
    assert (n in fast) == gather and (True in general) != gather, (fast, general)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN) elements"
    want, want_lse = attention_reference(q, k, v, mask, d**-0.5)
    return out, lse, want, want_lse


def _check(out: Any, lse: Any, want: Any, want_lse: Any) -> None:
    assert (out.double() - want).abs().max().item() < 2e-5
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key must have lse = -inf, others finite"
    assert (lse.double()[finite] - want_lse[finite]).abs().max().item() < 1e-4


FAST = ("dilated_1d",)  # the others under slow (a few seconds each in the interpreter)


@pytest.mark.parametrize("name", [pytest.param(c, marks=[] if c in FAST else [pytest.mark.slow]) for c in CASES])
def test_gathered_forward_matches_float64_and_the_pointer_kernel(name: str, monkeypatch: Any) -> None:
    attn, mask = _case(name)
    got = _forward(attn, mask, True, monkeypatch)
    _check(*got)
    pointer = _forward(attn, mask, False, monkeypatch)
    _check(*pointer)
    assert (got[0] - pointer[0]).abs().max().item() < 2e-5
    assert torch.equal(torch.isfinite(got[1]), torch.isfinite(pointer[1]))


@pytest.mark.slow
def test_gathered_forward_returns_zeros_for_queries_without_keys(monkeypatch: Any) -> None:
    """Queries the pattern gives no key (every third one here) get zeros and lse -inf, not NaN, also where
    their rows share tiles with padding rows and with queries that do have keys."""
    src = "causal & window(9, dilation=2) & where(q % 3 != 1)"
    layout = L.Layout((L.Axis(E.N, 2, (16,)),))
    attn = P.compile(f"pattern p = {src}\n", **SMALL, layout=layout)
    n = 45
    mask = P.dense_mask(src, n)
    out, lse, want, want_lse = _forward(attn, mask, True, monkeypatch)
    empty = ~torch.from_numpy(mask.any(-1))
    assert empty.sum() == 15
    assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()
    _check(out, lse, want, want_lse)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dilated_2d", "video_dit"])
def test_gradients_after_a_gathered_forward_match_float64(name: str) -> None:
    """The backward takes the gathered forward's out and lse unchanged."""
    attn, mask = _case(name)
    check_grads(attn, mask, h=2, hkv=1, with_lse=True)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("name", [pytest.param(c, marks=[] if c in FAST else [pytest.mark.slow]) for c in CASES])
def test_backward_gathered_and_in_place_match_float64(name: str, gather: bool, monkeypatch: Any) -> None:
    """The backward of a layout pattern on buffers gathered into the layout's rows (the kernels mapping rows
    to tokens for the predicate only, padding rows with lse = dlse = -inf) and read in place, each into
    poisoned gradients against float64, dlse included. `layout_gather` picks the way for the kernels of the
    pattern with the layout, except in a `heads { }` pattern mixing predicates over one KV head, whose
    dK/dV add up in place."""
    from patterndsl.runtime import backward

    attn, mask = _case(name)
    seen: dict[str, list[Any]] = {"dq": [], "dkdv": []}
    spy_launches(monkeypatch, backward, "_attn_bwd_dq", seen["dq"], lambda kw: (kw["LAYOUT"] is not None, kw["GATHERED"]))
    spy_launches(monkeypatch, backward, "_attn_bwd_dkdv", seen["dkdv"],
                 lambda kw: (kw["LAYOUT"] is not None, kw["GATHERED"]))
    with attn.options(layout_gather=gather):
        check_grads(attn, mask, h=2, hkv=1, with_lse=True)
    want = gather and name != "heads"
    for kind, log in seen.items():
        assert (True, want) in log and (True, not want) not in log, (kind, log)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_and_tokens_are_one_bijection_and_full_tiles_hold_no_padding(name: str) -> None:
    """`layout_index` maps the layout's rows onto the n tokens one to one (padding rows: -1), and the block
    tables the fast kernel walks list no padding row in a FULL tile: FULL tiles need no mapping."""
    from patterndsl.runtime.layout_order import layout_index
    from patterndsl.runtime.tables import block_tables, rows

    attn, mask = _case(name)
    spec, n = attn.spec, mask.shape[-1]
    row_token, token_row = (t.long() for t in layout_index(spec, 0, n, torch.device("cpu")))
    assert row_token.numel() == rows(spec, 0, n) and token_row.numel() == n
    valid = row_token >= 0
    assert torch.equal(torch.sort(row_token[valid]).values, torch.arange(n))
    assert torch.equal(row_token[token_row], torch.arange(n))
    for bm, bn in ((16, 16), (32, 16), (16, 32)):
        f_off, f_idx = block_tables(spec, n, bm, bn, "cpu", 0)[:2]
        for qb in range(f_off.numel() - 1):
            qrows = valid[qb * bm:(qb + 1) * bm]
            for kb in f_idx[f_off[qb]:f_off[qb + 1]].tolist():
                assert qrows.all() and valid[kb * bn:(kb + 1) * bn].all(), (name, bm, bn, qb, kb)


def test_gathered_layouts_are_tuned_over_the_fast_kernels_candidates_their_tiles_first() -> None:
    """With the gather on, a layout pattern's candidates are the fast kernel's configs (BLOCK_M, BLOCK_N, warps,
    stages, tma, one_loop, maxnreg), led by its configured tiles (those its layout was chosen for)."""
    from patterndsl.runtime import forward, tuning

    attn, _ = _case("dilated_1d")
    spec = attn.spec
    default = (*forward._config(spec, 128), 1, 0, 0)
    rows = tuning._tune_candidates(spec, 128, 1)
    cands = tuning._tune_candidates(spec, 128, 1, 2, default)
    assert cands[0] == default and cands[1:] == [c for c in rows if c != default]
    assert all(len(c) == 7 for c in cands) and forward._fast(spec, 0)
