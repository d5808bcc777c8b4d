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
