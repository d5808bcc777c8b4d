"""What one decode step costs and what the cache must hold, as the context grows (`patc analyze --decode`).

For a decode-consistent pattern at context N the step's query is row N - 1. Its allowed keys are
counted exactly from that one row (O(N) work, hence sizes up to ARRAY_LIMIT); a block-sparse decode
kernel reads every key block of `block` tokens holding an allowed key, so the keys (and bytes) read are
those blocks' tokens. The cache holds the retained keys of `retention` (a closed form, any N), in pages
of the cache's default page size. A dynamic pattern's row is its static part plus what the selector may
add (topk: n blocks; threshold: every candidate), so its figures are upper bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ir
from ..mask import evaluate_mask
from ..selectors import split, token_split
from .count import bound_predicate
from .limits import ARRAY_LIMIT
from .retention import decode_consistent, retention

DECODE_SIZES = (1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22)  # 1k, 8k, 64k, 512k, 4M
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


def decode_figures(
    p: ir.Pattern, sizes: tuple[int, ...], head_dim: int, elem_bytes: int, block: int
) -> dict[str, Any]:
    """Decode consistency and retention of p; per size in `sizes`, the step's keys and the cache's size
    (bytes per KV head and sequence: keys and values of `head_dim` elements of `elem_bytes` each)."""

    ok, why = decode_consistent(p)
    out: dict[str, Any] = {"consistent": ok, "reason": why}
    if not ok:
        return out
    r = retention(p)
    out["retained"] = r.text()
    if not sizes:
        return out
    page = r.page_size()
    per_key = 2 * head_dim * elem_bytes
    steps = []
    for n in (m for m in sizes if m <= ARRAY_LIMIT):
        keys, read = _step(p, n, block)
        cached = sum(min(b * page, n) - a * page for a, b in r.pages(n, page))
        steps.append({
            "N": n,
            "keys": keys,
            "keys_read": read,
            "bytes_read": read * per_key,
            "retained_keys": r.count(n),
            "cache_bytes": cached * per_key,
        })  # fmt: skip
    out.update({
        "head_dim": head_dim, "bytes_per_element": elem_bytes, "page_size": page, "block": block,
        "upper_bounds": ir.is_dynamic(p), "steps": steps,
    })  # fmt: skip
    return out


def _step(p: ir.Pattern, n: int, block: int) -> tuple[int, int]:
    """(allowed keys, keys in the blocks read) of row n - 1 at length n."""
    row = _row(p, n)
    blocks = np.unique(np.nonzero(row)[0] // block)
    read = int(np.minimum(block, n - blocks * block).sum())
    return int(row.sum()), read


def _row(p: ir.Pattern, n: int) -> np.ndarray:
    if not ir.is_dynamic(p):
        row: np.ndarray = evaluate_mask(bound_predicate(p, n), n, slice(n - 1, n))[0]
        return row
    if ir.token_selectors(p):  # at most every key some column or diagonal could add
        ts = token_split(p)
        bound: np.ndarray = _row(ts.static, n) | _row(ts.cases[3], n)
        return bound
    sp = split(p)
    static, reach = _row(sp.static, n), _row(sp.selected, n)
    if isinstance(sp.selector, ir.TopK):
        extra = reach & ~static  # the selector's candidates; it keeps the n fullest blocks at most
        b = sp.selector.block
        per_block = np.bincount(np.nonzero(extra)[0] // b, minlength=-(-n // b))
        keep = np.zeros(per_block.size, dtype=bool)
        keep[np.argsort(-per_block, kind="stable")[: sp.selector.count]] = True
        picked: np.ndarray = static | (extra & np.repeat(keep, b)[:n])
        return picked
    return reach
