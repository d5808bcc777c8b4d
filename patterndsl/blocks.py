"""Block tables: which key blocks each query block must visit, FULL (no mask) or PARTIAL (masked).

A kernel tile is `block_q` queries by `block_k` keys. For a static pattern at sequence length N this
module lists, per query block, the key blocks whose pairs are all allowed (FULL: the kernel evaluates
no predicate there) and those where some are (PARTIAL: the kernel evaluates the pattern's predicate per
pair). Empty tiles are never listed, so the kernel never visits them.

How: `runtime.tables.tiles`, i.e. `patterndsl.tiling`, the one tile builder the kernels and the analysis
use too (a quad tree of interval reasoning over the block grid, then refinement of PARTIAL tiles). Time
and memory grow with the tiles on the boundary of the allowed region and the listed blocks, never with
N^2 / (block_q * block_k) unless the pattern is dense. Work happens on `device` (torch), so a GPU builds
its own tables.

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
        x, E.Const | E.Var | E.Arith | E.Abs | E.Log2 | E.Cmp | E.And | E.Or | E.Not | E.IfElse | E.IsPow | E.RandomMember
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
    """The runtime's one table builder (`runtime.tables.tiles`), in both orientations."""
    from .runtime.common import _csr
    from .runtime.tables import tiles

    qn, kn = -(-n // bq), -(-n // bk)
    fq, fk, pq, pk = tiles(pred, n, n, bq, bk, dev)
    lists = [BlockList(*_csr(r, c, nr, nc)) for r, c, nr, nc in
             ((fq, fk, qn, kn), (pq, pk, qn, kn), (fk, fq, kn, qn), (pk, pq, kn, qn))]
    return BlockTables(n=n, block_q=bq, block_k=bk, full=lists[0], partial=lists[1], full_t=lists[2], partial_t=lists[3])
