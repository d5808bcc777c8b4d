"""Pictures of masks: Unicode in the terminal, PNG with axes for papers and READMEs."""

from __future__ import annotations

from typing import Any

import numpy as np

# Quadrant blocks: one character shows 2 x 2 cells (bit 1: top-left, 2: top-right, 4: bottom-left, 8: bottom-right).
_QUADRANTS = " ▘▝▀▖▌▞▛▗▚▐▜▄▙▟█"


def downsample(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Fraction of allowed pairs in each cell of a rows x cols grid over the mask."""
    n, m = mask.shape
    ri = (np.arange(n) * rows) // n
    ci = (np.arange(m) * cols) // m
    counts = np.zeros((rows, cols))
    np.add.at(counts, (ri[:, None], ci[None, :]), mask.astype(np.float64))
    sizes = np.bincount(ri, minlength=rows)[:, None] * np.bincount(ci, minlength=cols)[None, :]
    fraction: np.ndarray = counts / np.maximum(sizes, 1)
    return fraction


def terminal_cells(n: int, m: int, width: int = 64) -> tuple[int, int]:
    """(rows, cols) of cells for a picture `width` characters wide (two cells per character each way)."""
    cols = min(2 * width, m)
    rows = min(max(1, round(n * cols / m)), 2 * width)
    return rows + rows % 2, cols + cols % 2


def unicode_picture(mask: np.ndarray, width: int = 64) -> str:
    """A mask as quadrant characters; a cell is drawn when any pair in it is allowed."""
    n, m = mask.shape
    rows, cols = terminal_cells(n, m, width)
    return unicode_cells(downsample(mask, rows, cols) > 0)


def unicode_cells(cells: np.ndarray) -> str:
    """A grid of booleans (even sides) as quadrant characters, 2 x 2 cells each."""
    rows, cols = cells.shape
    lines = []
    for r in range(0, rows, 2):
        line = []
        for c in range(0, cols, 2):
            bits = cells[r, c] | cells[r, c + 1] << 1 | cells[r + 1, c] << 2 | cells[r + 1, c + 1] << 3
            line.append(_QUADRANTS[int(bits)])
        lines.append("".join(line).rstrip() or " ")
    return "\n".join(lines)


def png_cells(n: int, m: int, max_pixels: int = 1024) -> tuple[int, int]:
    return min(n, max_pixels), min(m, max_pixels)


def picture(image: np.ndarray, n: int, m: int, title: str) -> Any:
    """Cell densities (from `downsample` or `mask.cell_density`) over an n x m mask, as a matplotlib figure
    with axes and a title; the caller saves it (`cli.output.save_figure`) and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6 * n / max(m, 1) + 0.6), dpi=150)
    ax.imshow(image, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", extent=(0, m, n, 0))
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
