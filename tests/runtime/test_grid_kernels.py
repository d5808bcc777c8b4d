"""log2, tile-major grids and grids with extra tokens through the kernels: the CPU path (float64) and
Triton's interpreter (float32), forward and gradients, against the float64 reference built from the brute-
force mask (tests/reference.py). Outputs are poisoned (NaN-filled) so an unwritten element shows; the
interpreted cases use the token layout the compiler chooses (the extra tokens around tiled cells)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from helpers import LIBRARY, check_attention, check_grads
from reference import reference_mask

import patterndsl as P
from patterndsl import ir

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
warnings.filterwarnings("ignore", message=".*CPU tensors take a PyTorch reference path.*")

SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))

# (source or library file, pattern, defines, N)
CASES: dict[str, tuple[str, str, dict[str, int], int]] = {
    "log2": ("pattern p = causal & where(q == k or log2(q - k) % 2 == 0) | cols(log2(N))\n", "p", {}, 31),
    "tile_major": ("layout g = grid(2, 3, 2, 4)\npattern p = neighborhood(g, kernel=(2, 2, 2, 4))\n", "p", {}, 48),
    "suffix": ("layout g = grid(3, 2, 2, 2, suffix=6)\npattern p = neighborhood(g, kernel=(2, 1, 2, 2)) "
               "| global(g.suffix)\n", "p", {}, 30),  # fmt: skip
    "video_dit": ("video_dit.pat", "video_dit", {"text": 7, "frames": 3, "height": 4, "width": 5, "kt": 2, "ks": 3},
                  7 + 60),  # fmt: skip
    "radial": ("radial.pat", "radial_causal", {"frames": 4, "tokens": 12, "w0": 4}, 48),
    # 16 text tokens that see everything before an 8 x 8 x 8 latent: a text block far heavier than the rest
    "heavy_dit": ("video_dit.pat", "video_dit", {"text": 16, "frames": 8, "height": 8, "width": 8, "kt": 2, "ks": 3},
                  16 + 512),  # fmt: skip
    "sta_3d": ("sta.pat", "sta_3d", {"tiles_t": 3, "tiles_h3": 3, "tiles_w3": 3, "tt": 1, "th": 2, "tw": 2,
                                     "tiles_h": 3, "tiles_w": 3}, 108),  # fmt: skip
}


def _case(name: str) -> tuple[Any, Any, int]:
    src, pattern, defines, n = CASES[name]
    source: Any = LIBRARY / src if src.endswith(".pat") else src
    program = P.load(source, defines) if src.endswith(".pat") else P.loads(src, defines=defines)
    item = program.get(pattern)
    assert isinstance(item, ir.PatternDef)
    return P.compile(program, pattern, **SMALL), reference_mask(item.body, n), n


FAST_CPU = ("log2", "suffix")  # the others under slow (a second or two each)


@pytest.mark.parametrize("name", [pytest.param(c, marks=[] if c in FAST_CPU else [pytest.mark.slow]) for c in CASES])
def test_cpu_path_forward_and_gradients_match_float64(name: str) -> None:
    attn, mask, _ = _case(name)
    check_grads(attn, mask, h=2, hkv=1, dtype=torch.float64, with_lse=True)


@pytest.mark.parametrize("name", ["log2", pytest.param("video_dit", marks=pytest.mark.slow)])
def test_interpreted_kernel_forward_matches_float64(name: str) -> None:
    attn, mask, _ = _case(name)
    check_attention(attn, mask, h=2, hkv=1)


@pytest.mark.slow  # a few seconds each in the interpreter (tile-major layouts: tests/compiler/test_layout.py)
@pytest.mark.parametrize("name", ["log2", "suffix", "video_dit"])
def test_interpreted_kernel_gradients_match_float64(name: str) -> None:
    attn, mask, _ = _case(name)
    check_grads(attn, mask, h=2, hkv=1, with_lse=True)


@pytest.mark.slow  # choosing the tiling of a 16 x 32 x 32 latent takes about two seconds
def test_video_dit_tiles_its_cells_and_keeps_the_text_contiguous() -> None:
    """At its default size the library's video DiT gets boxes of cells, the 226 text tokens before them."""
    from patterndsl import layout as L

    item = P.load(LIBRARY / "video_dit.pat").get("video_dit")
    assert isinstance(item, ir.PatternDef)
    lay = L.choose(item.body, 128, 64)
    assert lay is not None and lay.prefix == 226 and len(lay.axes) == 3
    assert L.describe(lay).startswith("226 tokens before the grid, tiles ")
    pred = L.predicate(item.body)
    assert L.visited_tiles(pred, lay, 16610, 128, 64) < L.visited_tiles(pred, None, 16610, 128, 64)



def test_heavy_query_blocks_start_first_and_the_rest_keep_the_kernels_order() -> None:
    """Global rows at the start visit every key block: they launch first, heaviest first; the other blocks
    keep the kernels' own order (the last first), and patterns without such rows keep it whole."""
    from patterndsl.runtime import tables

    n, spec = 512, P.compile("pattern p = window(2) | global(0:4)\n", **SMALL).spec
    order = tables.heavy_first(spec, n, 16, 16, "cpu")
    f_off, _, p_off, _ = tables.block_tables(spec, n, 16, 16, "cpu")
    count = torch.diff(f_off.long()) + torch.diff(p_off.long())
    assert order is not None and sorted(order.tolist()) == list(range(count.numel()))
    heavy = [r for r in range(count.numel()) if count[r] > tables.HEAVY * count.float().mean()]
    assert heavy == [0] and order[:1].tolist() == heavy
    assert order[1:].tolist() == list(range(count.numel() - 1, 0, -1))
    for src in ("causal", "causal & window(5) | sink(2)"):
        plain = P.compile(f"pattern p = {src}\n", **SMALL)
        assert tables.heavy_first(plain.spec, n, 16, 16, "cpu") is None  # their own order serves


@pytest.mark.slow  # about 15 s in the interpreter
def test_heavy_first_kernels_match_float64() -> None:
    """A DiT whose text block visits several times the mean key blocks: the token-layout forward and dQ,
    launched in tables.heavy_first's order, give the reference's outputs and gradients."""
    from patterndsl.runtime import tables

    attn, mask, n = _case("heavy_dit")
    assert tables.heavy_first(attn.spec, n, 16, 16, "cpu") is not None
    check_grads(attn, mask, h=2, hkv=1, with_lse=True)
