"""Grids of many axes and grids with extra tokens, against independent readings of the papers' masks.

Sliding Tile Attention is checked against a reimplementation of attention-gym's
`generate_sta_mask_mod_2d` / `_3d` (tile-major token order, kernels counted in tiles, the window of tiles
clamped inside the canvas, even kernels one tile shorter on the right; text tokens after the video
attend to everything and are attended by every token). The video DiT pattern is checked against its
rule written out over (i, j)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import LIBRARY

import patterndsl as P
from patterndsl import ir
from patterndsl.mask import dense_mask, eval_numpy
from patterndsl.semantics import predicate


def sta_reference(canvas: tuple[int, ...], kernel: tuple[int, ...], tile: tuple[int, ...], text: int = 0,
                  queries: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """attention-gym's STA mask (2-D or 3-D; canvas, kernel and tile in tokens), vision tokens tile-major;
    the rows of `queries` only, when given."""
    tiles = [c // t for c, t in zip(canvas, tile, strict=True)]
    reach = [k // t for k, t in zip(kernel, tile, strict=True)]
    vision = math.prod(canvas)
    idx = np.arange(vision + text)
    rest = idx // math.prod(tile)  # the tile a token sits in, numbered row-major over the tiles
    place = []
    for count in reversed(tiles):
        place.append(rest % count)
        rest = rest // count
    place.reverse()
    q = idx if queries is None else queries
    near = np.ones((q.size, idx.size), dtype=bool)
    for a, count in enumerate(tiles):
        left = reach[a] // 2
        right = reach[a] // 2 + reach[a] % 2 - 1
        centre = np.clip(place[a][q], left, count - 1 - right)
        near &= (place[a][None, :] >= (centre - left)[:, None]) & (place[a][None, :] <= (centre + right)[:, None])
    seen, sees = idx < vision, q < vision
    return (sees[:, None] & seen[None, :] & near) | (sees[:, None] & ~seen[None, :]) | ~sees[:, None]


def _sta_source(canvas: tuple[int, ...], kernel: tuple[int, ...], tile: tuple[int, ...], text: int = 0) -> str:
    outer = [c // t for c, t in zip(canvas, tile, strict=True)]
    reach = [k // t for k, t in zip(kernel, tile, strict=True)]
    suffix = f", suffix={text}" if text else ""
    layout = f"layout v = grid({', '.join(map(str, outer + list(tile)))}{suffix})"
    rule = f"neighborhood(v, kernel=({', '.join(map(str, reach + list(tile)))}))"
    return f"{layout}\npattern p = {rule}{' | global(v.suffix)' if text else ''}\n"


STA_2D = [  # (canvas, kernel, tile) in tokens, as attention-gym takes them
    ((24, 24), (12, 12), (4, 4)),
    ((16, 24), (8, 8), (4, 4)),  # even kernels: two tiles, the window one tile short on the right
    ((12, 20), (6, 16), (2, 4)),
    ((8, 8), (8, 8), (2, 2)),  # the kernel is the whole canvas
]
STA_3D = [
    ((8, 8, 8), (4, 4, 4), (2, 2, 2)),  # even kernel on every axis
    ((12, 8, 8), (6, 4, 8), (2, 2, 2)),
    ((6, 6, 12), (3, 6, 6), (3, 2, 2)),
]


@pytest.mark.parametrize("canvas, kernel, tile", STA_2D + STA_3D)
def test_sta_is_a_neighborhood_on_a_tile_major_grid(canvas: tuple[int, ...], kernel: tuple[int, ...],
                                                    tile: tuple[int, ...]) -> None:  # fmt: skip
    body = P.loads(_sta_source(canvas, kernel, tile)).get("p")
    assert isinstance(body, ir.PatternDef)
    n = math.prod(canvas)
    assert (dense_mask(body.body, n) == sta_reference(canvas, kernel, tile)).all()


@pytest.mark.parametrize("name, canvas, kernel, tile", [
    ("sta_2d", (64, 64), (24, 24), (8, 8)),
    ("sta_3d", (16, 32, 32), (12, 24, 24), (4, 8, 8)),
])  # fmt: skip
def test_library_sta_matches_attention_gym_at_its_defaults(name: str, canvas: tuple[int, ...],
                                                           kernel: tuple[int, ...], tile: tuple[int, ...]) -> None:  # fmt: skip
    item = P.load(LIBRARY / "sta.pat").get(name)
    assert isinstance(item, ir.PatternDef)
    n = math.prod(canvas)
    rows = np.arange(0, n, 97)  # every 97th query: the full 16k x 16k masks are slow to build
    got = eval_numpy(predicate(item.body), rows[:, None], np.arange(n)[None, :], n)
    assert (got == sta_reference(canvas, kernel, tile, queries=rows)).all()


@pytest.mark.parametrize("canvas, kernel, tile, text", [
    ((8, 8), (4, 4), (2, 2), 5),
    ((12, 8), (6, 8), (2, 4), 3),
    ((4, 8, 8), (2, 4, 4), (2, 2, 2), 7),
])  # fmt: skip
def test_sta_with_text_after_the_video_is_a_suffix(canvas: tuple[int, ...], kernel: tuple[int, ...],
                                                   tile: tuple[int, ...], text: int) -> None:  # fmt: skip
    """attention-gym's text_seq_len: text tokens after the video see every token and are seen by all."""
    body = P.loads(_sta_source(canvas, kernel, tile, text)).get("p")
    assert isinstance(body, ir.PatternDef)
    n = math.prod(canvas) + text
    assert (dense_mask(body.body, n) == sta_reference(canvas, kernel, tile, text)).all()


def video_dit_reference(text: int, dims: tuple[int, int, int], kernel: tuple[int, int, int]) -> np.ndarray:
    """Text tokens (the first `text`) see all and are seen by all; video tokens see a NATTEN 3-D
    neighborhood: per axis, `kernel` positions starting at clamp(x - kernel // 2, 0, n - kernel)."""
    n = text + math.prod(dims)
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            if i < text or j < text:
                out[i, j] = True
                continue
            x = np.unravel_index(i - text, dims)
            y = np.unravel_index(j - text, dims)
            ok = True
            for a in range(3):
                start = min(max(int(x[a]) - kernel[a] // 2, 0), dims[a] - kernel[a])
                ok = ok and start <= int(y[a]) < start + kernel[a]
            out[i, j] = ok
    return out


@pytest.mark.parametrize("defines", [
    {"text": 10, "frames": 4, "height": 6, "width": 5, "kt": 3, "ks": 3},
    {"text": 3, "frames": 3, "height": 4, "width": 8, "kt": 2, "ks": 4},  # even kernels
])  # fmt: skip
def test_video_dit_text_is_global_and_video_is_a_3d_neighborhood(defines: dict[str, int]) -> None:
    item = P.load(LIBRARY / "video_dit.pat", defines).get("video_dit")
    assert isinstance(item, ir.PatternDef)
    dims = (defines["frames"], defines["height"], defines["width"])
    n = defines["text"] + math.prod(dims)
    want = video_dit_reference(defines["text"], dims, (defines["kt"], defines["ks"], defines["ks"]))
    assert (dense_mask(item.body, n) == want).all()
