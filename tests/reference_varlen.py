"""Packed documents read the obvious way: the block-diagonal mask of documents packed end to end (each
document's brute-force mask of `reference.py`, nothing across documents), and packed-document tables assembled
the slow way (Python lists) from a pattern's block table at one length that covers every document (an N-free
predicate: a document's tiles are that table's cut to the document), the reference the device builder
(`patterndsl.runtime.varlen._free_tables`) must match bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from reference import reference_mask

from patterndsl import ir


def doc_mask(body: ir.Body, lengths: list[int]) -> np.ndarray:
    """[total, total] (or [H, total, total]): each document's brute-force mask on the diagonal."""
    total = sum(lengths)
    heads = body.count if isinstance(body, ir.Heads) else None
    mask = np.zeros((total, total) if heads is None else (heads, total, total), dtype=bool)
    s = 0
    for n in lengths:
        if n:
            mask[..., s : s + n, s : s + n] = reference_mask(body, n)
        s += n
    return mask


def packed_tables(shared: Any, lengths: list[int], block_m: int, block_n: int, transpose: bool) -> list[Any]:
    """`shared`: (full_offsets, full_index, partial_offsets, partial_index) per query block at a length >= every
    document. Returns (tiles, full_offsets, full_index, partial_offsets, partial_index), int32 tensors:

    - rows: per document, in order, its query blocks (transposed: its key blocks); a row lists the key
      (query) blocks inside the document, FULL and PARTIAL as the shared table says, ascending;
    - a document's ragged last key block (its length not a multiple of block_n) needs bounds: listed
      PARTIAL (forward: moved from the FULL list's end to the PARTIAL list's; transposed: that key block's
      row lists everything PARTIAL);
    - rows ordered heaviest first (FULL + PARTIAL entries), ties in document order.
    """
    import torch

    f_off, f_idx, p_off, p_idx = (t.tolist() for t in shared)
    full = [f_idx[f_off[q] : f_off[q + 1]] for q in range(len(f_off) - 1)]
    part = [p_idx[p_off[q] : p_off[q + 1]] for q in range(len(p_off) - 1)]
    if transpose:  # per key block, the query blocks listing it (ascending)
        cols = 1 + max(f_idx + p_idx, default=0)
        full_t: list[list[int]] = [[] for _ in range(cols)]
        part_t: list[list[int]] = [[] for _ in range(cols)]
        for lists, by_key in ((full, full_t), (part, part_t)):
            for q, x in enumerate(lists):
                for c in x:
                    by_key[c].append(q)
    rows = []
    for d, n in enumerate(lengths):
        qt, kt, ragged = -(-n // block_m), -(-n // block_n), n % block_n != 0
        if transpose:
            for b in range(kt):
                f = [q for q in full_t[b] if q < qt] if b < cols else []
                p = [q for q in part_t[b] if q < qt] if b < cols else []
                if ragged and b == kt - 1:
                    f, p = [], sorted(f + p)
                rows.append((d, b, f, p))
        else:
            for b in range(qt):
                f = [c for c in full[b] if c < kt]
                p = [c for c in part[b] if c < kt]
                if ragged and f and f[-1] == kt - 1:
                    p.append(f.pop())
                rows.append((d, b, f, p))
    rows.sort(key=lambda r: -(len(r[2]) + len(r[3])))  # stable: ties keep document order
    tiles = [x for d, b, _, _ in rows for x in (d, b)]
    out = [tiles]
    for lists in ([r[2] for r in rows], [r[3] for r in rows]):
        offsets = [0]
        for x in lists:
            offsets.append(offsets[-1] + len(x))
        out += [offsets, [c for x in lists for c in x]]
    return [torch.tensor(x, dtype=torch.int32) for x in out]
