"""Block tables: which key blocks each query block must visit, FULL (no mask) or PARTIAL (masked).

A kernel tile is `block_q` queries by `block_k` keys. For a static pattern at sequence length N this
module lists, per query block, the key blocks whose pairs are all allowed (FULL: the kernel evaluates
no predicate there) and those where some are (PARTIAL: the kernel evaluates the pattern's predicate per
pair). Empty tiles are never listed, so the kernel never visits them.

How: recursive subdivision over key-block ranges. Every query block starts with the range of all key
blocks; `intervals.classify` judges all (query block, key range) rectangles at once; NONE ranges are
dropped, ALL ranges become FULL blocks wholesale, SOME ranges are halved until they are one block wide
(then PARTIAL). Time and memory grow with the number of listed blocks times log2(key blocks), never
with N^2 / (block_q * block_k) unless the pattern is dense. Work happens on `device` (torch), so a GPU
builds its own tables.

The transposed tables (query blocks per key block) serve the backward pass (dK, dV by key block).
Tables are cached per (predicate, N, block_q, block_k, device).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import expr as E
from . import ir
from .expr import Expr
from .intervals import ALL, NONE, SOME, classify

__all__ = ["BlockList", "BlockTables", "block_tables", "bound_predicate", "clear_cache"]

_CACHE_SIZE = 64
_cache: OrderedDict[tuple[Any, ...], BlockTables] = OrderedDict()


@dataclass(frozen=True)
class BlockList:
    """CSR lists: row r's entries are `indices[offsets[r]:offsets[r + 1]]`, ascending. int32 tensors."""

    offsets: Any  # [rows + 1] int32
    indices: Any  # [nnz] int32

    @property
    def counts(self) -> Any:
        """Entries per row, [rows] int32."""
        return (self.offsets[1:] - self.offsets[:-1]).to(self.offsets.dtype)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def row(self, r: int) -> list[int]:
        return [int(x) for x in self.indices[int(self.offsets[r]) : int(self.offsets[r + 1])].tolist()]


@dataclass(frozen=True)
class BlockTables:
    """Per query block the FULL and PARTIAL key blocks; per key block the same transposed."""

    n: int
    block_q: int
    block_k: int
    full: BlockList  # rows: query blocks, entries: key blocks
    partial: BlockList
    full_t: BlockList  # rows: key blocks, entries: query blocks
    partial_t: BlockList

    @property
    def q_blocks(self) -> int:
        return -(-self.n // self.block_q)

    @property
    def k_blocks(self) -> int:
        return -(-self.n // self.block_k)

    def nbytes(self) -> int:
        lists = (self.full, self.partial, self.full_t, self.partial_t)
        return sum(int(t.offsets.numel() + t.indices.numel()) * 4 for t in lists)


def bound_predicate(pattern_or_pred: ir.Pattern | Expr, n: int) -> Expr:
    """The predicate with N fixed: from a pattern (validated at this N) or an expression."""
    if isinstance(pattern_or_pred, ir.Heads):
        raise TypeError("block_tables takes one pattern; for heads { } build tables per head range")
    if _is_expr(pattern_or_pred):
        return E.bind_n(pattern_or_pred, n)  # type: ignore[arg-type]
    from .mask import _static_predicate

    return _static_predicate(pattern_or_pred, n)  # type: ignore[arg-type]


def _is_expr(x: object) -> bool:
    return isinstance(
        x, E.Const | E.Var | E.Arith | E.Abs | E.Cmp | E.And | E.Or | E.Not | E.IfElse | E.IsPow | E.RandomMember
    )


def block_tables(
    pattern_or_pred: ir.Pattern | Expr, n: int, block_q: int, block_k: int, device: Any = "cpu"
) -> BlockTables:
    """FULL / PARTIAL key blocks per query block (and transposed) for a static pattern at length n.

    `pattern_or_pred` is an `ir.Pattern` or its predicate (`semantics.predicate`, N free or bound).
    Cached: the same arguments return the same object.
    """
    import torch

    if n < 1 or block_q < 1 or block_k < 1:
        raise ValueError(f"n, block_q and block_k must be positive, got {n}, {block_q}, {block_k}")
    dev = torch.device(device)
    pred = bound_predicate(pattern_or_pred, n)
    key = (pred, n, block_q, block_k, str(dev))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    tables = _build(pred, n, block_q, block_k, dev)
    _cache[key] = tables
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return tables


def clear_cache() -> None:
    _cache.clear()


def _build(pred: Expr, n: int, bq: int, bk: int, dev: Any) -> BlockTables:
    import torch

    qn, kn = -(-n // bq), -(-n // bk)
    i64 = dict(dtype=torch.int64, device=dev)
    q = torch.arange(qn, **i64)
    lo = torch.zeros(qn, **i64)
    hi = torch.full((qn,), kn, **i64)
    full_q: list[Any] = []
    full_lo: list[Any] = []
    full_hi: list[Any] = []
    part_q: list[Any] = []
    part_k: list[Any] = []
    while q.numel():
        i_lo = q * bq
        i_hi = torch.clamp((q + 1) * bq, max=n) - 1
        j_lo = lo * bk
        j_hi = torch.clamp(hi * bk, max=n) - 1
        verdict = classify(pred, i_lo, i_hi, j_lo, j_hi, xp=torch)
        is_all = verdict == ALL
        full_q.append(q[is_all])
        full_lo.append(lo[is_all])
        full_hi.append(hi[is_all])
        some = verdict == SOME
        single = some & (hi - lo == 1)
        part_q.append(q[single])
        part_k.append(lo[single])
        split = some & (hi - lo > 1)
        sq, slo, shi = q[split], lo[split], hi[split]
        mid = (slo + shi) // 2
        q = torch.cat([sq, sq])
        lo = torch.cat([slo, mid])
        hi = torch.cat([mid, shi])
        assert NONE == 0  # dropped: neither listed nor split
    fq = torch.cat(full_q)
    flo = torch.cat(full_lo)
    fhi = torch.cat(full_hi)
    width = fhi - flo
    fq = torch.repeat_interleave(fq, width)
    starts = torch.repeat_interleave(flo - (torch.cumsum(width, 0) - width), width)
    fk = starts + torch.arange(fq.numel(), **i64)
    pq, pk = torch.cat(part_q), torch.cat(part_k)
    pq, pk, promoted = _refine(pred, n, bq, bk, pq, pk)
    fq, fk = torch.cat([fq, pq[promoted]]), torch.cat([fk, pk[promoted]])
    pq, pk = pq[~promoted], pk[~promoted]
    return BlockTables(
        n=n,
        block_q=bq,
        block_k=bk,
        full=_csr(fq, fk, qn, kn),
        partial=_csr(pq, pk, qn, kn),
        full_t=_csr(fk, fq, kn, qn),
        partial_t=_csr(pk, pq, kn, qn),
    )


def _refine(pred: Expr, n: int, bq: int, bk: int, pq: Any, pk: Any) -> tuple[Any, Any, Any]:
    """Settle PARTIAL tiles that interval reasoning could not: split each into sub-rectangles until one
    is seen allowed (ALL) and one disallowed (NONE). A tile with no allowed sub-rectangle is dropped, one
    with no disallowed one becomes FULL. Bounded work: refinement stops once the frontier outgrows a
    budget, and the tiles still unsettled stay PARTIAL (sound, only slower).
    Returns the kept tiles and a mask of those promoted to FULL.
    """
    import torch

    tiles = pq.numel()
    dev = pq.device
    seen_true = torch.zeros(tiles, dtype=torch.bool, device=dev)
    seen_false = torch.zeros(tiles, dtype=torch.bool, device=dev)
    unsettled = torch.zeros(tiles, dtype=torch.bool, device=dev)
    t = torch.arange(tiles, dtype=torch.int64, device=dev)
    i_lo, i_hi = pq * bq, torch.clamp((pq + 1) * bq, max=n) - 1
    j_lo, j_hi = pk * bk, torch.clamp((pk + 1) * bk, max=n) - 1
    budget = 8 * tiles + (1 << 16)
    while t.numel():
        if t.numel() > budget:
            unsettled[t] = True
            break
        verdict = classify(pred, i_lo, i_hi, j_lo, j_hi, xp=torch)
        seen_true[t[verdict == ALL]] = True
        seen_false[t[verdict == NONE]] = True
        keep = (verdict == SOME) & ~(seen_true[t] & seen_false[t])
        t, i_lo, i_hi, j_lo, j_hi = t[keep], i_lo[keep], i_hi[keep], j_lo[keep], j_hi[keep]
        # split the longer side in two (a SOME rectangle is never a single pair for an exact leaf test,
        # but guard anyway: single pairs left SOME stay unsettled)
        hgt, wid = i_hi - i_lo, j_hi - j_lo
        single = (hgt == 0) & (wid == 0)
        unsettled[t[single]] = True
        t, i_lo, i_hi, j_lo, j_hi, hgt, wid = (x[~single] for x in (t, i_lo, i_hi, j_lo, j_hi, hgt, wid))
        rows = hgt >= wid
        i_mid = (i_lo + i_hi) // 2
        j_mid = (j_lo + j_hi) // 2
        t = torch.cat([t, t])
        a_i_hi = torch.where(rows, i_mid, i_hi)
        a_j_hi = torch.where(rows, j_hi, j_mid)
        b_i_lo = torch.where(rows, i_mid + 1, i_lo)
        b_j_lo = torch.where(rows, j_lo, j_mid + 1)
        i_lo, i_hi = torch.cat([i_lo, b_i_lo]), torch.cat([a_i_hi, i_hi])
        j_lo, j_hi = torch.cat([j_lo, b_j_lo]), torch.cat([a_j_hi, j_hi])
    empty = ~seen_true & ~unsettled
    promoted = ~seen_false & ~unsettled & seen_true
    keep = ~empty
    return pq[keep], pk[keep], promoted[keep]


def _csr(rows: Any, cols: Any, nrows: int, ncols: int) -> BlockList:
    import torch

    order = torch.argsort(rows * ncols + cols)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=nrows)
    offsets = torch.zeros(nrows + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return BlockList(offsets.to(torch.int32), cols.to(torch.int32))
