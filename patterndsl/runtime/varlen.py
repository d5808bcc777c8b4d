"""Packed documents (cu_seqlens): tiles never straddle two documents.

Tile t is query block qb[t] of document doc[t]; its key blocks are counted from the document's start, so
the pattern's tables at the document's length apply unchanged. A predicate that does not read N has one
table for every length: the tiles' rows are cut out of the (cached) table at a power of two >= the
longest document (`_free_tables`: per document shape, row templates kept on the device; per call a small
descriptor from the host, then a sort and three kernels on the device, no host sync). Otherwise all tiles
are classified together by the one tile builder (`tiling.doc_tiles`), each document a grid with its own N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from ..tiling import Tiling, doc_tiles, full_tiles
from ..tiling import partition as _partition
from .common import _INTERPRET, _csr, _pow2
from .tables import block_tables, refine

if TYPE_CHECKING:
    from .spec import PatternSpec

    # (tiles, full_offsets, full_index, partial_offsets, partial_index), int32
    VarlenTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    # one orientation of _free_source: (offsets, keys, cols, rows, cols, start in src)
    Side = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]
    Store = dict[str, Any]  # _free_plan's row templates of one orientation


_VARLEN: dict[tuple[Any, ...], VarlenTables] = {}


def varlen_tables(spec: PatternSpec, cu_seqlens: torch.Tensor, lengths: Sequence[int], block_m: int, block_n: int,
                  pat: int = 0, transpose: bool = False) -> VarlenTables:
    """`_varlen_tables`, kept for the last few distinct document splits: the layers of a model (and their
    backward) see the same cu_seqlens in one step and share one build. Keyed by the lengths themselves."""
    key = (spec.key, pat, block_m, block_n, transpose, str(cu_seqlens.device), tuple(lengths))
    hit = _VARLEN.get(key)
    if hit is None:
        hit = _VARLEN[key] = _varlen_tables(spec, cu_seqlens, lengths, block_m, block_n, pat, transpose)
        if len(_VARLEN) > 16:
            _VARLEN.pop(next(iter(_VARLEN)))
    return hit


_FREE: dict[tuple[Any, ...], tuple[list[Side], torch.Tensor, tuple[Store, Store]]] = {}


_ALIGN = 16  # int32 entries (64 bytes): every table is a slice of one buffer, aligned as a fresh tensor is for Triton


def _keyed(rows: torch.Tensor, cols: torch.Tensor, nrows: int,
           ncols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSR with its sorted keys `row * ncols + col`: (offsets, keys, cols in key order), int64."""
    keys, order = torch.sort(rows * ncols + cols)
    off = torch.zeros(nrows + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.bincount(rows, minlength=nrows), 0)
    return off, keys, cols[order]


def _free_source(spec: PatternSpec, pat: int, top: int, bm: int, bn: int,
                 device: torch.device) -> tuple[list[Side], torch.Tensor, tuple[Store, Store]]:
    """The N-free table at length `top` as _free_tables reads it (cached): per orientation, its lists
    (by query block: FULL, PARTIAL; by key block: FULL, PARTIAL, both) merged into one search structure.

    Per orientation, on the host: (offsets [lists, rows + 1] into `keys`, `keys` (list i's keys
    `row * cols + col` plus i * rows * cols: sorted), the columns in that order, rows, cols, where the
    orientation's columns start in `src`). `src` on `device`: both orientations' columns, int32. Last, per
    orientation, the row templates of the document shapes seen so far (_free_plan)."""
    key = (spec.key, pat, top, bm, bn, str(device))
    hit = _FREE.get(key)
    if hit is None:
        f_off, f_idx, p_off, p_idx = (t.cpu().long() for t in block_tables(spec, top, bm, bn, device, pat, layout=False))
        qn, kn = f_off.numel() - 1, -(-top // bn)
        fr = torch.repeat_interleave(torch.arange(qn), f_off.diff(), output_size=f_idx.numel())
        pr = torch.repeat_interleave(torch.arange(qn), p_off.diff(), output_size=p_idx.numel())
        by_query = [(f_off, fr * kn + f_idx, f_idx), (p_off, pr * kn + p_idx, p_idx)]
        by_key = [_keyed(f_idx, fr, kn, qn), _keyed(p_idx, pr, kn, qn),
                  _keyed(torch.cat([f_idx, p_idx]), torch.cat([fr, pr]), kn, qn)]
        sides, at = [], 0
        for lists, rows, cols in ((by_query, qn, kn), (by_key, kn, qn)):
            sizes = [0] + [c.numel() for _, _, c in lists]
            base = torch.tensor(sizes[:-1]).cumsum(0)
            off = torch.stack([o for o, _, _ in lists]) + base[:, None]
            keys = torch.cat([k + i * rows * cols for i, (_, k, _) in enumerate(lists)])
            sides.append((off, keys, torch.cat([c for _, _, c in lists]), rows, cols, at))
            at += keys.numel()
        src = torch.cat([sides[0][2], sides[1][2]]).to(torch.int32).to(device)
        hit = _FREE[key] = (sides, src, ({}, {}))
        if len(_FREE) >= 16:
            _FREE.pop(next(iter(_FREE)))
    return hit


@triton.jit(do_not_specialize=["rows", "docs", "steps"])  # type: ignore[untyped-decorator]
def _vl_rows(DESC, STORE, KEY, TROW, RDOC, rows, docs, steps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    # rows in document order, BLOCK a program: document (binary search in the first rows), template row, work
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < rows
    lo = tl.zeros_like(r)  # DESC[lo] <= r < DESC[hi]: the last document starting at or before r (the empty
    hi = lo + docs  # ones before it start there too)
    while steps > 0:
        mid = (lo + hi) // 2
        go = tl.load(DESC + mid, mask=ok, other=0) <= r
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
        steps -= 1
    t = tl.load(DESC + docs + 1 + lo, mask=ok, other=0) + r - tl.load(DESC + lo, mask=ok, other=0)
    tl.store(KEY + r, tl.load(STORE + t * 8 + 7, mask=ok), mask=ok)
    tl.store(TROW + r, t, mask=ok)
    tl.store(RDOC + r, lo, mask=ok)


@triton.jit(do_not_specialize=["rows"])  # type: ignore[untyped-decorator]
def _vl_scan(ORDER, TROW, RDOC, STORE, TILES, F_OFF, P_OFF, SORTED, rows, CHUNK: tl.constexpr):  # type: ignore[no-untyped-def]
    # one program: rows in the sorted order, CHUNK at a time: tiles, the offsets (running sums), template rows
    cf = tl.zeros([], dtype=tl.int32)
    cp = tl.zeros([], dtype=tl.int32)
    tl.store(F_OFF, cf)
    tl.store(P_OFF, cp)
    c0 = 0
    while c0 < rows:  # (the CPU interpreter cannot take scalar arguments as range() bounds)
        i = c0 + tl.arange(0, CHUNK)
        ok = i < rows
        o = tl.load(ORDER + i, mask=ok, other=0)
        t = tl.load(TROW + o, mask=ok, other=0)
        s = STORE + t * 8
        fc = tl.load(s + 2, mask=ok, other=0)
        pc = tl.load(s + 4, mask=ok, other=0) + tl.load(s + 6, mask=ok, other=0)
        tl.store(TILES + 2 * i, tl.load(RDOC + o, mask=ok), mask=ok)
        tl.store(TILES + 2 * i + 1, tl.load(s, mask=ok), mask=ok)
        tl.store(SORTED + i, t, mask=ok)
        tl.store(F_OFF + 1 + i, cf + tl.cumsum(fc, 0), mask=ok)
        tl.store(P_OFF + 1 + i, cp + tl.cumsum(pc, 0), mask=ok)
        cf += tl.sum(fc, 0)
        cp += tl.sum(pc, 0)
        c0 += CHUNK


@triton.jit(do_not_specialize=["rows"])  # type: ignore[untyped-decorator]
def _vl_gather(SRC, STORE, SORTED, F_OFF, P_OFF, F_IDX, P_IDX, rows, ROWS: tl.constexpr, ENTRIES: tl.constexpr):  # type: ignore[no-untyped-def]
    # ROWS sorted rows a program: each row's FULL entries, then its two PARTIAL runs, copied from SRC
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = i < rows
    s = STORE + tl.load(SORTED + i, mask=ok, other=0) * 8
    fs = tl.load(s + 1, mask=ok, other=0)[:, None]
    fc = tl.load(s + 2, mask=ok, other=0)[:, None]
    ps = tl.load(s + 3, mask=ok, other=0)[:, None]
    pc = tl.load(s + 4, mask=ok, other=0)[:, None]
    ps2 = tl.load(s + 5, mask=ok, other=0)[:, None] - pc  # the second run continues the first's numbering
    pn = pc + tl.load(s + 6, mask=ok, other=0)[:, None]
    fo = tl.load(F_OFF + i, mask=ok, other=0)[:, None]
    po = tl.load(P_OFF + i, mask=ok, other=0)[:, None]
    most = tl.max(tl.max(tl.maximum(fc, pn), 1), 0)
    e0 = 0
    while e0 < most:  # (the CPU interpreter cannot take loaded scalars as range() bounds)
        e = e0 + tl.arange(0, ENTRIES)[None, :]
        tl.store(F_IDX + fo + e, tl.load(SRC + fs + e, mask=e < fc), mask=e < fc)
        tl.store(P_IDX + po + e, tl.load(SRC + tl.where(e < pc, ps, ps2) + e, mask=e < pn), mask=e < pn)
        e0 += ENTRIES


_TEMPLATE_ROWS = 1 << 19  # template rows kept per orientation of a shared table (int32 x 8 each: 16 MiB, + one call's)


def _doc_rows(side: Side, lengths: Sequence[int], block_m: int, block_n: int, transpose: bool) -> torch.Tensor:
    """Per row of these documents, in order, [rows, 8] int32: (block, FULL start, FULL count, PARTIAL start,
    count, second PARTIAL start, count, work), starts in `src`. A row's values depend only on its
    document's (query blocks, key blocks, ragged?), so _free_plan keeps them per document shape."""
    off, keys, cols, _, ncols, at = side
    i64: dict[str, Any] = dict(dtype=torch.int64)
    lens = torch.tensor(lengths, **i64)
    qt, kt = (lens + block_m - 1) // block_m, (lens + block_n - 1) // block_n
    per, size = (kt, block_n) if transpose else (qt, block_m)
    rows = sum(-(-x // size) for x in lengths)
    # per document: first row, column limit, ragged (its last key block sticks out), that block
    ends = torch.cumsum(per, 0)
    docs = torch.stack([ends - per, qt if transpose else kt, (lens % block_n != 0).long(), kt - 1], 1)
    rdoc = torch.searchsorted(ends, torch.arange(rows, **i64), right=True)
    first, limit, ragged, last_block = docs[rdoc].unbind(1)
    rblock = torch.arange(rows, **i64) - first
    start = off[:, rblock]  # [lists, rows]: where each row's entries start in `keys`
    span = torch.arange(off.shape[0], **i64)[:, None] * (off.shape[1] - 1) * ncols
    count = torch.searchsorted(keys, span + (rblock * ncols + limit)) - start  # entries with column < limit
    ragged = ragged.bool()
    if transpose:  # rows: key blocks; a ragged row's blocks are all PARTIAL (list 2: FULL and PARTIAL merged)
        (fs, ps, as_), (fc, pc, ac) = start.unbind(0), count.unbind(0)
        ragged &= rblock == last_block
        zero = torch.zeros_like(fc)
        segs = [fs, torch.where(ragged, 0, fc), torch.where(ragged, as_, ps), torch.where(ragged, ac, pc), zero, zero]
        work = ac
    else:  # rows: query blocks; the ragged block, the row's last FULL one if any, moves to its PARTIAL end
        (fs, ps), (fc, pc) = start.unbind(0), count.unbind(0)
        end = fs + fc - 1
        r = (ragged & (fc > 0) & (cols[torch.clamp(end, min=0)] == last_block)).long() if cols.numel() else fc * 0
        segs = [fs, fc - r, ps, pc, end, r]
        work = fc + pc
    out = torch.stack([rblock, *segs, work], 1)
    out[:, 1:6:2] += at
    return out.to(torch.int32)


_VL_ROWS, _VL_CHUNK, _VL_GATHER, _VL_ENTRIES = 1024, 2048, 32, 32  # the table kernels' blocks (rows, entries)


def _add_templates(store: Store, side: Side, lengths: Sequence[int], block_m: int, block_n: int, transpose: bool,
                   device: torch.device) -> None:
    """Templates for the shapes of these (unseen) lengths: rows of new shapes computed together (_doc_rows,
    on the host) and appended to the store on `device` (a pinned, non-blocking copy); per shape its
    (first template row, rows, FULL entries, PARTIAL entries) as Python ints, also per length."""
    # one CPU thread: the host ops are small, and a thread pool (searchsorted, gathers) that waits for a busy
    # core costs ms a call (~50 ms on a loaded 2-core box against ~1 ms); OpenMP's setting is the calling thread's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape_of = {n: (-(-n // block_m), -(-n // block_n), n % block_n != 0) for n in lengths}
        new: dict[tuple[int, int, bool], int] = {}
        for n, x in shape_of.items():
            if x not in store["shape"]:
                new.setdefault(x, n)
        if new:
            made = _doc_rows(side, list(new.values()), block_m, block_n, transpose)
            sizes = [x[1] if transpose else x[0] for x in new]
            ends = torch.tensor(sizes).cumsum(0)
            sums = torch.zeros(made.shape[0] + 1, 2, dtype=torch.int64)
            torch.cumsum(torch.stack([made[:, 2], made[:, 4] + made[:, 6]], 1), 0, out=sums[1:])
            totals = (sums[ends] - sums[ends - torch.tensor(sizes)]).tolist()  # host tensors: no sync
            at, t = store["rows"], store["t"]
            if at + made.shape[0] > t.shape[0]:  # grow (the old store stays valid for work already queued)
                size = max(min(2 * t.shape[0], _TEMPLATE_ROWS), at + made.shape[0], 1024)
                grown = torch.empty(size, 8, dtype=torch.int32, device=device)
                grown[:at] = t[:at]
                store["t"] = t = grown
            t[at:at + made.shape[0]].copy_(made.pin_memory() if device.type == "cuda" else made, non_blocking=True)
            for x, k, (f, p) in zip(new, sizes, totals, strict=True):
                store["shape"][x] = (at, k, f, p)
                at += k
            store["rows"] = at
        for n, x in shape_of.items():
            store["len"][n] = store["shape"][x]
    finally:
        torch.set_num_threads(threads)


def _free_plan(store: Store, side: Side, lengths: Sequence[int], block_m: int, block_n: int, transpose: bool,
               device: torch.device) -> tuple[torch.Tensor, int, int, int]:
    """_free_tables' host part, from the lengths as Python ints (no device value read): the descriptor, int32
    (pinned for a GPU): each document's first row in document order, the rows in all, then each document's
    first template row in the store; with the numbers of rows, FULL and PARTIAL entries.

    A document's rows depend only on its shape (query blocks, key blocks, ragged?): the store keeps them as
    [rows, 8] int32 templates (_doc_rows) on the device, so a call is one dict look-up per document (each
    length's template remembered) unless a shape is new."""
    if store.get("rows", 0) > _TEMPLATE_ROWS or len(store.get("len", ())) > _TEMPLATE_ROWS:
        store.clear()  # over budget (at most the budget and one call's rows): start again
    if not store:
        store.update(rows=0, len={0: (0, 0, 0, 0)}, shape={}, t=torch.empty(0, 8, dtype=torch.int32, device=device))
    get = store["len"].get
    infos = [get(n) for n in lengths]
    if None in infos:
        _add_templates(store, side, [n for n, x in zip(lengths, infos, strict=True) if x is None], block_m, block_n, transpose,
                       device)
        get = store["len"].__getitem__
        infos = [get(n) for n in lengths]
    first, rows, nf, npart = [0], 0, 0, 0
    for _, k, f, p in infos:
        rows += k
        first.append(rows)
        nf += f
        npart += p
    first += [x[0] for x in infos]
    return torch.tensor(first, dtype=torch.int32, pin_memory=device.type == "cuda"), rows, nf, npart


def _free_tables(spec: PatternSpec, pat: int, top: int, lengths: Sequence[int], block_m: int, block_n: int,
                 transpose: bool, device: torch.device) -> VarlenTables:
    """_varlen_tables for an N-free predicate: each tile's rows are cut out of the table at length `top`.

    Host (_free_plan): per document its rows' template, as one small descriptor, and every output's size.
    Device: the descriptor's copy (non-blocking), then the rows in document order (_vl_rows: template row,
    document, work), a stable sort by work (heaviest first), the tiles and offsets in that order (_vl_scan,
    one program: running sums) and the listed blocks copied from the shared `src` (_vl_gather). The
    outputs (and the scratch) are 64-byte aligned slices of one buffer. No host sync."""
    sides, src, stores = _free_source(spec, pat, top, block_m, block_n, device)
    store = stores[transpose]
    desc, rows, nf, npart = _free_plan(store, sides[transpose], lengths, block_m, block_n, transpose, device)
    split: list[int] = []
    for n in (2 * rows, rows + 1, rows + 1, nf, npart, rows, rows, rows, rows):
        split += (n, -n % _ALIGN)
    parts = (torch.empty if rows else torch.zeros)(sum(split), dtype=torch.int32, device=device).split(split)  # type: ignore[no-untyped-call]
    table, f_off, p_off, f_idx, p_idx, key, trow, rdoc, by_order = parts[::2]
    if rows:
        docs = len(lengths)
        desc = desc.to(device, non_blocking=True)
        _vl_rows[(-(-rows // _VL_ROWS),)](desc, store["t"], key, trow, rdoc, rows, docs, docs.bit_length(),
                                          BLOCK=_VL_ROWS)
        order = torch.sort(key, descending=True, stable=True).indices
        _vl_scan[(1,)](order, trow, rdoc, store["t"], table, f_off, p_off, by_order, rows, CHUNK=_VL_CHUNK,
                       num_warps=8)
        _vl_gather[(-(-rows // _VL_GATHER),)](src, store["t"], by_order, f_off, p_off, f_idx, p_idx, rows,
                                              ROWS=_VL_GATHER, ENTRIES=_VL_ENTRIES)
    return table, f_off, f_idx, p_off, p_idx


def _varlen_tables(spec: PatternSpec, cu_seqlens: torch.Tensor, lengths: Sequence[int], block_m: int, block_n: int,
                   pat: int = 0, transpose: bool = False) -> VarlenTables:
    """Tiles and block tables for packed documents, built on cu_seqlens' device.

    `cu_seqlens`: [docs + 1] integer tensor; `lengths`: the same documents' lengths as Python ints.
    Returns (tiles, full_offsets, full_index, partial_offsets, partial_index), int32: `tiles` holds
    (document, query block within it) per tile, heaviest tiles first; row r of each table lists tile
    r's key blocks, counted from its document's start. `transpose=True`: the tiles are (document, key
    block) and the tables list query blocks (the dK/dV loop), same verdicts. Time and memory grow with
    the listed blocks.
    """
    longest = max(lengths, default=1)
    top = max(_pow2(longest), block_m, block_n)
    if spec.n_free[pat] and top <= spec.max_n and (cu_seqlens.device.type != "cpu" or _INTERPRET):  # Triton kernels
        return _free_tables(spec, pat, top, lengths, block_m, block_n, transpose, cu_seqlens.device)
    dev = cu_seqlens.device
    i64: dict[str, Any] = dict(dtype=torch.int64, device=dev)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    qt = (lens + block_m - 1) // block_m
    tiles = sum(-(-x // block_m) for x in lengths)
    doc = torch.repeat_interleave(torch.arange(lens.numel(), **i64), qt, output_size=tiles)
    first = torch.cumsum(qt, 0) - qt  # each document's first tile
    qb = torch.arange(tiles, **i64) - first[doc]
    n = lens[doc]
    fq_lo, fq_hi, fk_lo, fk_hi, fd, pq, pk, pd = doc_tiles(spec.predicates[pat].expr, lens, longest, block_m, block_n)
    empty = fq_lo[:0]
    fq, fk = full_tiles(Tiling(fq_lo + first[fd], fq_hi + first[fd], fk_lo, fk_hi, empty, empty), torch, dev)
    pq = pq + first[pd]
    pq, pk, promoted = refine(spec.predicates[pat].expr, n[pq], n[pq], block_m, block_n, qb[pq], pk, tag=pq)
    ragged = (fk + 1) * block_n > n[fq]  # a document's ragged last key block needs bounds: PARTIAL
    ragged_p = (pk + 1) * block_n > n[pq]
    # FULL: FULL not ragged, then promoted not ragged; PARTIAL: PARTIAL, FULL ragged, promoted ragged (one sync)
    code = torch.cat([torch.where(ragged, 3, 0), torch.where(promoted, torch.where(ragged_p, 4, 1), 2)])
    fq_all, fk_all = torch.cat([fq, pq]), torch.cat([fk, pk])
    f0, f1, p0, p1, p2 = _partition(code, 5)
    fq, fk = fq_all[torch.cat([f0, f1])], fk_all[torch.cat([f0, f1])]
    pq, pk = fq_all[torch.cat([p0, p1, p2])], fk_all[torch.cat([p0, p1, p2])]
    if transpose:
        kq = (lens + block_n - 1) // block_n
        rows = sum(-(-x // block_n) for x in lengths)
        kstart = torch.cumsum(kq, 0) - kq
        rdoc = torch.repeat_interleave(torch.arange(lens.numel(), **i64), kq, output_size=rows)
        rblock = torch.arange(rows, **i64) - kstart[rdoc]
        fr, fc, pr, pc = kstart[doc[fq]] + fk, qb[fq], kstart[doc[pq]] + pk, qb[pq]
        cols = -(-longest // block_m)
    else:
        rows, rdoc, rblock, fr, fc, pr, pc, cols = tiles, doc, qb, fq, fk, pq, pk, -(-longest // block_n)
    work = torch.zeros(rows, dtype=torch.int64, device=dev)
    work.index_put_((torch.cat([fr, pr]),), torch.ones_like(work[:1]).expand(fr.numel() + pr.numel()), accumulate=True)
    order = torch.argsort(work, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(rows, **i64)
    table = torch.stack([rdoc[order], rblock[order]], 1).reshape(-1).to(torch.int32)
    return (table, *_csr(rank[fr], fc, rows, cols), *_csr(rank[pr], pc, rows, cols))
