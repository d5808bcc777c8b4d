"""Block tables: per query block the key blocks a kernel visits, FULL (no mask) or PARTIAL (masked).

The tiles come from `patterndsl.tiling`, the one tile builder (the analyser's block counts and
`patterndsl.blocks` use it too), run here with torch on the tables' device; this module lays them out as
the kernels read them (CSR per query block and transposed, work lists, padded rows) and caches them. Time
and memory grow with the listed blocks, never with N^2 unless the pattern is dense.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch

from .. import expr as E
from ..tiling import expand, full_rows, full_tiles, tiling
from ..tiling import refine as refine  # the varlen tables settle their tiles with it
from .common import _csr, _sm_count

if TYPE_CHECKING:
    from ..expr import Expr
    from .spec import PatternSpec, TokenLayout

    # (full_offsets, full_index, partial_offsets, partial_index), int32
    Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def tiles(pred: Expr, n: int, extent: int, bq: int, bk: int,
          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full_q, full_k, partial_q, partial_k) int64: every tile of `pred` (at sequence length n; rows and
    columns 0 .. extent - 1) that holds an allowed pair, FULL where all its pairs are allowed."""
    t = tiling(pred, extent, bq, bk, n=n, xp=torch, device=device)
    fq, fk = full_tiles(t, torch, device)
    return fq, fk, t.part_q, t.part_k


def _layout(spec: PatternSpec, pat: int) -> TokenLayout | None:
    """Predicate `pat`'s token layout or None: `spec.layouts` holds the head patterns' only (the predicates
    serving selectors, past them, keep the plain token order)."""
    return spec.layouts[pat] if pat < len(spec.layouts) else None


def rows(spec: PatternSpec, pat: int, n: int) -> int:
    """Rows the kernel tiles: N, or N padded to whole tiles of the pattern's token layout."""
    lay = _layout(spec, pat)
    return n if lay is None else E.evaluate_int(lay.rows, n)


def _extent(spec: PatternSpec, pat: int, n: int, layout: bool) -> tuple[int, Expr]:
    """(rows, predicate): over physical rows and the predicate in layout space when `layout`."""
    lay = _layout(spec, pat)
    if layout and lay is not None:
        return rows(spec, pat, n), lay.predicate
    return n, spec.predicates[pat].expr


_TABLES: dict[tuple[Any, ...], Tables] = {}
_RUNS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}


def run_tables(spec: PatternSpec, pat: int, n: int, block_m: int, block_n: int,
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The tiles of `tiles` (token order) as runs of consecutive key blocks, for kernels that walk a few
    query rows' key blocks without a per-block list (decoding at any length up to n): (offsets [query
    blocks + 1] int32, runs [R, 4] int32 = (first key block, end, PARTIAL?, blocks the row lists before the
    run), key blocks per query block [query blocks] int32, the most of them). Memory grows with the runs
    (one to three per query block for causal, windows and sinks), never with the blocks. Cached."""
    key = (spec.key, pat, n, block_m, block_n, str(device))
    hit = _RUNS.get(key)
    if hit is None:
        extent, pred = _extent(spec, pat, n, False)
        t = tiling(pred, extent, block_m, block_n, n=n, xp=torch, device=device)
        fq, flo, fhi = full_rows(t, torch, device)
        pq, pk = t.part_q, t.part_k
        q, lo = torch.cat([fq, pq]), torch.cat([flo, pk])
        hi, part = torch.cat([fhi, pk + 1]), torch.cat([torch.zeros_like(fq), torch.ones_like(pq)])
        kn = -(-extent // block_n)
        order = torch.argsort(q * kn + lo)
        q, lo, hi, part = q[order], lo[order], hi[order], part[order]
        cont = torch.zeros_like(q, dtype=torch.bool)  # the tile continues the run before it
        cont[1:] = (q[1:] == q[:-1]) & (hi[:-1] == lo[1:]) & (part[1:] == part[:-1])
        run = torch.cumsum((~cont).long(), 0) - 1
        starts = ~cont
        rq, rlo, rpart = q[starts], lo[starts], part[starts]
        rhi = torch.zeros_like(rlo).scatter_reduce_(0, run, hi, "amax")
        width = rhi - rlo
        qn = -(-extent // block_m)
        off = torch.searchsorted(rq, torch.arange(qn + 1, dtype=torch.int64, device=rq.device))
        done = torch.cumsum(width, 0) - width  # blocks of every run before this one
        first = torch.cat([done, done.new_zeros(1) + width.sum()])  # at each row's start, the runs before it
        before = done - first[off[rq]]
        count = first[off[1:]] - first[off[:-1]]
        runs = torch.stack([rlo, rhi, rpart, before], 1).to(torch.int32).contiguous()
        hit = (off.to(torch.int32), runs, count.to(torch.int32), int(count.max()) if count.numel() else 0)
        if len(_RUNS) >= 64:
            _RUNS.pop(next(iter(_RUNS)))
        _RUNS[key] = hit
    return hit


def block_tables(spec: PatternSpec, n: int, block_m: int, block_n: int, device: torch.device | str, pat: int = 0,
                 layout: bool = True) -> Tables:
    """(full_offsets, full_index, partial_offsets, partial_index) per query block, int32, on `device`.

    FULL tiles are entirely allowed and lie inside the sequence (the ragged last key block is always
    listed PARTIAL, so the kernel's FULL stage needs no bounds check). With the pattern's token layout
    (`layout=False` ignores it) blocks are of physical rows, `rows(spec, pat, n)` of them, and no
    padding row lies in a FULL tile. Cached per argument.
    """
    layout = bool(layout) and _layout(spec, pat) is not None
    key = (spec.key, pat, n, block_m, block_n, str(device), layout)
    hit = _TABLES.get(key)
    if hit is None:
        extent, pred = _extent(spec, pat, n, layout)
        qn, kn = -(-extent // block_m), -(-extent // block_n)
        t = tiling(pred, extent, block_m, block_n, n=n, xp=torch, device=device)
        row, lo, hi = full_rows(t, torch, device)
        pq, pk = t.part_q, t.part_k
        if extent % block_n:  # the ragged last key block goes PARTIAL: the FULL stage needs no bounds check
            cut = hi == kn
            moved = row[torch.nonzero(cut).squeeze(1)]
            pq, pk, hi = torch.cat([pq, moved]), torch.cat([pk, torch.full_like(moved, kn - 1)]), hi - cut.long()
        fq, fk = expand(row, lo, hi, torch, device)
        hit = (*_csr(fq, fk, qn, kn), *_csr(pq, pk, qn, kn))
        if len(_TABLES) >= 64:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = hit
    return hit


_TABLES_T: dict[tuple[Any, ...], Tables] = {}


def block_tables_t(spec: PatternSpec, n: int, block_m: int, block_n: int, device: torch.device | str, pat: int = 0,
                   layout: bool = True) -> Tables:
    """The tables of `block_tables` transposed: (full_offsets, full_index, partial_offsets, partial_index)
    per KEY block, listing query blocks (the dK/dV loop). Same tiles, same FULL / PARTIAL verdicts (over
    physical rows when the pattern has a token layout and `layout`)."""
    layout = bool(layout) and _layout(spec, pat) is not None
    key = (spec.key, pat, n, block_m, block_n, str(device), layout)
    hit = _TABLES_T.get(key)
    if hit is None:
        extent = _extent(spec, pat, n, layout)[0]
        qn, kn = -(-extent // block_m), -(-extent // block_n)
        out: list[torch.Tensor] = []
        for off, idx in zip(*[iter(block_tables(spec, n, block_m, block_n, device, pat, layout=layout))] * 2,
                            strict=True):
            rows = torch.repeat_interleave(torch.arange(qn, dtype=torch.int64, device=off.device), (off[1:] - off[:-1]).long(),
                                           output_size=idx.numel())
            out.extend(_csr(idx.long(), rows, kn, qn))
        if len(_TABLES_T) >= 64:
            _TABLES_T.pop(next(iter(_TABLES_T)))
        hit = _TABLES_T[key] = cast("Tables", tuple(out))  # four: two per _csr
    return hit


_ORDER: dict[tuple[Any, ...], torch.Tensor | None] = {}
HEAVY = 4  # a query block with this many times the mean tiles is far heavier (a global row)


def heavy_first(spec: PatternSpec, n: int, block_m: int, block_n: int, device: torch.device | str,
                pat: int = 0) -> torch.Tensor | None:
    """Program -> query block for the pointer-load kernels (`_attn_fwd`, `_attn_bwd_dq`), int32, or None where
    their own order serves. They run the last query block first, so that the heavy late rows of a causal
    pattern start first; a far heavier block elsewhere (a global row at the start: a DiT's text tokens) would
    then start last and finish alone, long after the rest. Such blocks start first, heaviest first, and the
    others keep the kernels' order. Cached; one read of the tables' offsets when built."""
    device = torch.device(device)
    key = (spec.key, pat, n, block_m, block_n, str(device))
    if key in _ORDER:
        return _ORDER[key]
    f_off, _, p_off, _ = block_tables(spec, n, block_m, block_n, device, pat)
    count = (torch.diff(f_off.long()) + torch.diff(p_off.long())).cpu()
    heavy = torch.nonzero(count > HEAVY * count.float().mean()).squeeze(1)
    order = None
    if heavy.numel():
        rank = torch.argsort(count[heavy], descending=True, stable=True)
        rest = torch.ones(count.numel(), dtype=torch.bool)
        rest[heavy] = False
        last_first = torch.arange(count.numel() - 1, -1, -1)
        order = torch.cat([heavy[rank], last_first[rest[last_first]]]).to(device=device, dtype=torch.int32)
    if len(_ORDER) >= 64:
        _ORDER.pop(next(iter(_ORDER)))
    _ORDER[key] = order
    return order


_WORK: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, int, bool]] = {}


def _split_chunk(count: torch.Tensor, programs: int, device: torch.device) -> int:
    """Tiles per slice for the heavy query blocks (0: none is split). Heavy blocks start first, so one
    only delays the end when it alone holds more than twice an even share of the work per SM (few heads
    and a global row: Longformer at H = 1); then it is cut into slices of about one share."""
    if count.numel() == 0:
        return 0
    share = float(count.sum()) * programs / _sm_count(device, 132)
    top = int(count.max())
    if top < 32 or top <= 2 * share:
        return 0
    return max(16, int(math.ceil(share)))


def work_list(spec: PatternSpec, n: int, block_m: int, block_n: int, device: torch.device | str, pat: int = 0,
              split: int | None = None, programs: int = 1) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """(work, splits, slots, contig): the kernel's work items, heaviest first.

    work [W, 7] int32: query block, FULL range (lo, hi, first key block), PARTIAL range (lo, hi), slot
    (-1: the item is the whole query block; else it is one slice, written to workspace `slot`).
    splits [S, 3] int32: query block, first slot, end slot (merged by _attn_combine); contig: every
    item's FULL key blocks are consecutive. `programs`: (batch, head) pairs sharing each item. Cached.
    """
    device = torch.device(device)
    key = (spec.key, pat, n, block_m, block_n, str(device), split, programs)
    hit = _WORK.get(key)
    if hit is not None:
        return hit
    f_off, f_idx, p_off, p_idx = (t.cpu().long() for t in block_tables(spec, n, block_m, block_n, device, pat))
    rows = f_off.numel() - 1
    nf, npart = f_off[1:] - f_off[:-1], p_off[1:] - p_off[:-1]
    count = nf + npart
    chunk = _split_chunk(count, programs, device) if split is None else int(split)
    pieces = torch.ones(rows, dtype=torch.int64)
    if chunk > 0:
        pieces = torch.clamp((count + chunk - 1) // chunk, min=1)
    r = torch.repeat_interleave(torch.arange(rows), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    part = torch.arange(r.numel()) - first[r]
    if chunk > 0:
        a = part * chunk
        e = torch.minimum(a + chunk, count[r])
    else:
        a, e = torch.zeros_like(r), count[r]
    f_lo, f_hi = f_off[r] + torch.minimum(a, nf[r]), f_off[r] + torch.minimum(e, nf[r])
    p_lo, p_hi = p_off[r] + torch.clamp(a - nf[r], min=0), p_off[r] + torch.clamp(e - nf[r], min=0)
    kb0 = f_idx[torch.clamp(f_lo, max=max(f_idx.numel() - 1, 0))] if f_idx.numel() else torch.zeros_like(r)
    kb0 = torch.where(f_lo < f_hi, kb0, 0)
    is_split = pieces[r] > 1
    slot = torch.where(is_split, torch.cumsum(is_split.long(), 0) - 1, -1)
    order = torch.sort(-(e - a), stable=True).indices
    work = torch.stack([r, f_lo, f_hi, kb0, p_lo, p_hi, slot], 1)[order]
    heavy = torch.nonzero(pieces > 1).flatten()
    slot_lo = torch.cumsum(pieces[heavy], 0) - pieces[heavy]
    splits = torch.stack([heavy, slot_lo, slot_lo + pieces[heavy]], 1)
    same_row = torch.repeat_interleave(torch.arange(rows), nf)
    same_row = same_row[1:] == same_row[:-1]
    contig = bool(((f_idx[1:] - f_idx[:-1] == 1) | ~same_row).all())
    hit = (work.to(torch.int32).contiguous().to(device), splits.to(torch.int32).contiguous().to(device),
           int(is_split.sum()), contig)
    if len(_WORK) >= 64:
        _WORK.pop(next(iter(_WORK)))
    _WORK[key] = hit
    return hit


_ROWS: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _static_rows(spec: PatternSpec, pat: int, n: int, bm: int, bn: int,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A static pattern's tiles per query tile, padded (cached): key tiles int32 [query tiles, width] (-1
    padding), their class int8 (0 FULL, 1 PARTIAL), and the FULL and PARTIAL totals."""
    key = (spec.key, "rows", pat, n, bm, bn, str(device))
    hit = _ROWS.get(key)
    if hit is None:
        f_off, f_idx, p_off, p_idx = block_tables(spec, n, bm, bn, device, pat)
        nqt = f_off.numel() - 1
        nf, np_ = (f_off[1:] - f_off[:-1]).long(), (p_off[1:] - p_off[:-1]).long()
        width = max(1, int((nf + np_).max())) if nqt else 1
        kt = torch.full((nqt, width), -1, dtype=torch.int32, device=device)
        cls = torch.zeros((nqt, width), dtype=torch.int8, device=device)
        r = torch.arange(nqt, device=device)
        for off, idx, count, first, c in ((f_off, f_idx, nf, torch.zeros_like(nf), 0), (p_off, p_idx, np_, nf, 1)):
            rows = torch.repeat_interleave(r, count, output_size=idx.numel())
            at = torch.arange(idx.numel(), device=device) - off[:-1].long()[rows] + first[rows]  # FULL, then PARTIAL
            kt[rows, at] = idx
            cls[rows, at] = c
        hit = (kt, cls, f_idx.numel(), p_idx.numel())
        if len(_ROWS) >= 64:
            _ROWS.pop(next(iter(_ROWS)))
        _ROWS[key] = hit
    return hit


def _sorted_tiles(spec: PatternSpec, pat: int, n: int, bm: int, bn: int,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A static pattern's tiles as sorted int64 keys query tile * key tiles + key tile and their class int8
    (0 FULL, 2 PARTIAL), cached: what `_merge_kernel` looks P1's class up in."""
    key = (spec.key, "keys", pat, n, bm, bn, str(device))
    hit = _ROWS.get(key)
    if hit is None:
        f_off, f_idx, p_off, p_idx = block_tables(spec, n, bm, bn, device, pat)
        nkt = -(-n // bn)
        keys: list[torch.Tensor] = []
        cls: list[torch.Tensor] = []
        for off, idx, c in ((f_off, f_idx, 0), (p_off, p_idx, 2)):
            rows = torch.repeat_interleave(torch.arange(off.numel() - 1, device=device),
                                           (off[1:] - off[:-1]).long(), output_size=idx.numel())
            keys.append(rows * nkt + idx.long())
            cls.append(torch.full((idx.numel(),), c, dtype=torch.int8, device=device))
        sorted_keys, order = torch.sort(torch.cat(keys))
        hit = (sorted_keys.contiguous(), torch.cat(cls)[order].contiguous())
        if len(_ROWS) >= 64:
            _ROWS.pop(next(iter(_ROWS)))
        _ROWS[key] = hit
    return hit


# --- buffers whose rows are runs of a longer sequence (attention at given positions, context parallelism)
# A buffer holds the tokens of `runs` (global (start, stop) intervals) one after another. Cut at documents'
# edges and at multiples of the block inside each document, its rows fall into segments of at most one
# block, each inside one block of its document's tiling: the kernels read a segment's rows at its own
# positions, and the tiles of the document's block tables say which segments meet.

Segments = Any  # numpy int64 [S, 6] per segment: (row - position, position in its document, rows, document
# length, document, block of the document)


def segments(runs: tuple[tuple[int, int], ...], n: int, docs: tuple[int, ...] | None, block: int) -> Segments:
    """The segments of a buffer holding `runs` of a sequence of n tokens (packed documents: `docs`, their
    cu_seqlens boundaries), in buffer order. Host work grows with the segments (one per block held, plus
    two per run)."""
    import numpy as np

    iv = np.array(runs, dtype=np.int64).reshape(-1, 2)
    iv = iv[iv[:, 1] > iv[:, 0]]
    cu = np.array((0, n) if docs is None else docs, dtype=np.int64)
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    cuts = np.unique(np.concatenate([cu, *(s + np.arange(0, m, block) for s, m in zip(starts, lens, strict=True) if m)]))
    first = np.searchsorted(cuts, iv[:, 0], side="right")  # the cuts strictly inside each run
    last = np.searchsorted(cuts, iv[:, 1], side="left")
    pieces = last - first + 1
    run = np.repeat(np.arange(iv.shape[0]), pieces)
    k = np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    lo = np.where(k == 0, iv[run, 0], cuts[np.minimum(first[run] + k - 1, cuts.size - 1)])
    hi = np.where(k == pieces[run] - 1, iv[run, 1], cuts[np.minimum(first[run] + k, cuts.size - 1)])
    doc = np.searchsorted(cu, lo, side="right") - 1
    pos = lo - cu[doc]
    size = hi - lo
    row = np.cumsum(size) - size
    return np.stack([row - pos, pos, size, lens[doc], doc, pos // block], 1)


_SPANS: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}


def _seg4(segs: Segments, device: torch.device | str) -> torch.Tensor:
    """The kernels' columns of `segments` (row - position, position, rows, document length), int32."""
    return torch.tensor(segs[:, :4], dtype=torch.int32, device=device).reshape(-1, 4)


def span_tables(spec: PatternSpec, pat: int, q_runs: tuple[tuple[int, int], ...], k_runs: tuple[tuple[int, int], ...],
                n: int, docs: tuple[int, ...] | None, block_m: int, block_n: int, device: torch.device | str,
                transpose: bool = False) -> tuple[torch.Tensor, ...]:
    """Block tables between a query buffer holding `q_runs` and a key buffer holding `k_runs` of one sequence
    (`segments`): (rows, cols, full_offsets, full_index, partial_offsets, partial_index), int32. `rows`
    [R, 4] and `cols` [C, 4]: segments (row - position, position, rows, document length), the kernel's
    programs (query segments, heaviest first; with `transpose`, key segments) and the blocks they list.

    Query segment s and key segment t meet where their documents' tile (block of s, block of t) is listed
    in `block_tables` at the document's length (one table at the longest length when the predicate does
    not read N: its tiles inside a shorter document are the same or, at the document's end, PARTIAL where
    they must be). FULL stays FULL only for whole key segments (a shorter one needs the bounds the PARTIAL
    stage checks). Cached."""
    key = (spec.key, pat, q_runs, k_runs, n, docs, block_m, block_n, str(device), transpose)
    hit = _SPANS.get(key)
    if hit is not None:
        return hit
    import numpy as np

    qs, ks = segments(q_runs, n, docs, block_m), segments(k_runs, n, docs, block_n)
    on: dict[str, Any] = dict(dtype=torch.int64, device=device)
    kn = -(-n // block_n) + 1  # more than any document's key blocks: (document, block) -> one number
    kkey = ks[:, 4] * kn + ks[:, 5]
    korder = np.argsort(kkey, kind="stable")
    kkey_t, korder_t = torch.tensor(kkey[korder], **on), torch.tensor(korder, **on)
    klen = torch.tensor(ks[:, 2], **on)
    lens = qs[:, 3]
    if spec.n_free[pat] and qs.size:
        lens = np.full_like(lens, max(int(qs[:, 3].max()), int(ks[:, 3].max()) if ks.size else 0))
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (query segment, key segment, PARTIAL?)
    for length in np.unique(lens).tolist():
        sel = np.nonzero(lens == length)[0]
        qi, g = torch.tensor(sel, **on), torch.tensor(qs[sel, 5], **on)
        doc = torch.tensor(qs[sel, 4], **on)
        tabs = block_tables(spec, int(length), block_m, block_n, device, pat, layout=False)
        for (off, idx), partial in (((tabs[0], tabs[1]), 0), ((tabs[2], tabs[3]), 1)):
            off = off.long()
            count = off[g + 1] - off[g]
            total = int(count.sum())
            rows = torch.repeat_interleave(torch.arange(qi.numel(), **on), count, output_size=total)
            at = torch.arange(total, **on) - (torch.cumsum(count, 0) - count)[rows] + off[g][rows]
            want = doc[rows] * kn + idx.long()[at]
            a = torch.searchsorted(kkey_t, want)
            m = torch.searchsorted(kkey_t, want, right=True) - a
            hits = int(m.sum())
            e = torch.repeat_interleave(torch.arange(rows.numel(), **on), m, output_size=hits)
            t = korder_t[a[e] + torch.arange(hits, **on) - (torch.cumsum(m, 0) - m)[e]]
            part = torch.full_like(t, partial) | (klen[t] < block_n).long()
            pairs.append((qi[rows[e]], t, part))
    s, t, part = (torch.cat([p[i] for p in pairs]) if pairs else torch.zeros(0, **on) for i in range(3))
    row_seg, col_seg = (ks, qs) if transpose else (qs, ks)
    r, c = (t, s) if transpose else (s, t)
    nr, nc = row_seg.shape[0], col_seg.shape[0]
    work = torch.zeros(nr, **on).index_add_(0, r, torch.ones_like(r))
    order = torch.argsort(work, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(nr, **on)
    full = part == 0
    hit = (_seg4(row_seg, device)[order].contiguous(), _seg4(col_seg, device), *_csr(rank[r[full]], c[full], nr, nc),
           *_csr(rank[r[~full]], c[~full], nr, nc))
    if len(_SPANS) >= 64:
        _SPANS.pop(next(iter(_SPANS)))
    _SPANS[key] = hit
    return hit
