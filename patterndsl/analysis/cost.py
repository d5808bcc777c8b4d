"""What a pattern costs: FLOPs (useful and executed by a block-sparse kernel), bytes moved, tile efficiency.

Counting conventions (stated once here, repeated in the report):
- forward: 4 * D FLOPs per allowed pair and head (2 * D for q . k, 2 * D for p * v);
- backward: 10 * D per pair, FlashAttention-2 style with recomputation (q . k again, dV, dP, dQ, dK:
  2 * D each), i.e. 2.5 x the forward;
- tiles are those of the kernel's block tables (`patterndsl.tiling`): classified by interval reasoning,
  PARTIAL ones then settled by splitting them, up to REFINE_PAIRS pairs of them (the kernel's tables settle
  all), so at large N a few tiles may count as PARTIAL (or visited) that the kernel lists FULL (or drops);
- a block-sparse kernel with BQ x BK tiles computes every pair of every tile it visits (FULL or
  PARTIAL), padded tiles included: executed = visited * BQ * BK * 4 * D per head;
- bytes (forward, bf16 = 2 bytes per element): every query row of Q read once and of O written once,
  and the K and V tiles (BK x D each) read once per visited tile. Softmax statistics are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..expr import Expr
from ..tiling import Tiling, tiling
from .bound import Value, ratio
from .count import classify_cost
from .limits import REFINE_PAIRS, Budget

FWD_PER_PAIR = 4
BWD_PER_PAIR = 10
BYTES_PER_ELEMENT = 2


@dataclass(frozen=True, slots=True)
class BlockCounts:
    """Per query block: key blocks that are FULL (every pair allowed) and PARTIAL (some may be)."""

    block_q: int
    block_k: int
    full: np.ndarray
    partial: np.ndarray
    source: str

    @property
    def visited(self) -> int:
        return int(self.full.sum() + self.partial.sum())


def tiles_of(pred: Expr, n: int, block_q: int, block_k: int, budget: Budget | None = None) -> Tiling:
    """Every non-empty tile of the BQ x BK grid (`tiling.tiling`, the kernels' own builder, on numpy).

    A tile interval reasoning and refinement cannot prove empty counts as visited, one they cannot prove
    full as partial. With a budget, a subdivision that outgrows it raises OverBudget.
    """
    spend = None if budget is None else lambda count, p: budget.spend(count * classify_cost(p))
    return tiling(pred, n, block_q, block_k, spend=spend, refine_pairs=REFINE_PAIRS)


def block_counts(pred: Expr, n: int, block_q: int, block_k: int, budget: Budget | None = None) -> BlockCounts:
    """FULL and PARTIAL key blocks per query block (arrays over query blocks: N <= ARRAY_LIMIT)."""
    nq = -(-n // block_q)
    t = tiles_of(pred, n, block_q, block_k, budget)
    diff = np.zeros(nq + 1, dtype=np.int64)
    width = t.k_hi - t.k_lo
    np.add.at(diff, t.q_lo, width)
    np.add.at(diff, t.q_hi, -width)
    full = np.cumsum(diff[:nq])
    partial = np.bincount(t.part_q, minlength=nq).astype(np.int64)
    return BlockCounts(block_q, block_k, full, partial, "interval classification of BQ x BK tiles")


@dataclass(frozen=True, slots=True)
class Cost:
    """Per pattern; pairs and tiles may be bounds (`bound.Bound`), and then so is every figure of them."""

    pairs: Value
    n: int
    heads: int
    head_dim: int
    batch: int
    block_q: int
    block_k: int
    visited: Value
    full_blocks: Value
    partial_blocks: Value

    @property
    def scale(self) -> int:
        return self.head_dim * self.heads * self.batch

    @property
    def fwd_flops(self) -> Value:
        return FWD_PER_PAIR * self.scale * self.pairs

    @property
    def bwd_flops(self) -> Value:
        return BWD_PER_PAIR * self.scale * self.pairs

    @property
    def executed_fwd_flops(self) -> Value:
        return FWD_PER_PAIR * self.block_q * self.block_k * self.scale * self.visited

    @property
    def executed_bwd_flops(self) -> Value:
        return BWD_PER_PAIR * self.block_q * self.block_k * self.scale * self.visited

    @property
    def tile_efficiency(self) -> Value:
        return ratio(self.pairs, self.block_q * self.block_k * self.visited, cap=1.0)

    @property
    def fwd_bytes(self) -> Value:
        elems = 2 * self.n * self.head_dim + 2 * self.block_k * self.head_dim * self.visited
        return BYTES_PER_ELEMENT * self.heads * self.batch * elems

    @property
    def intensity(self) -> Value:
        """Executed forward FLOPs per byte moved."""
        return ratio(self.executed_fwd_flops, self.fwd_bytes, empty=0.0)

    @property
    def dense_fwd_flops(self) -> int:
        return FWD_PER_PAIR * self.n * self.n * self.scale

    def as_dict(self) -> dict[str, Value]:
        return {
            "pairs": self.pairs,
            "fwd_flops": self.fwd_flops,
            "bwd_flops": self.bwd_flops,
            "dense_fwd_flops": self.dense_fwd_flops,
            "visited_blocks": self.visited,
            "full_blocks": self.full_blocks,
            "partial_blocks": self.partial_blocks,
            "executed_fwd_flops": self.executed_fwd_flops,
            "executed_bwd_flops": self.executed_bwd_flops,
            "tile_efficiency": self.tile_efficiency,
            "fwd_bytes": self.fwd_bytes,
            "arithmetic_intensity": self.intensity,
        }


def cost(pairs: Value, blocks: BlockCounts, n: int, heads: int, head_dim: int, batch: int) -> Cost:
    return Cost(
        pairs, n, heads, head_dim, batch, blocks.block_q, blocks.block_k, blocks.visited,
        int(blocks.full.sum()), int(blocks.partial.sum()),
    )  # fmt: skip


def cost_of(pairs: Value, visited: Value, full: Value, partial: Value, n: int, heads: int, head_dim: int,
            batch: int, block_q: int, block_k: int) -> Cost:  # fmt: skip
    """The cost from tile totals (exact or bounded) rather than per-block arrays."""
    return Cost(pairs, n, heads, head_dim, batch, block_q, block_k, visited, full, partial)
