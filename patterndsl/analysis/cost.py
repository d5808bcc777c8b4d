"""What a pattern costs: FLOPs (useful and executed by a block-sparse kernel), bytes moved, tile efficiency.

Counting conventions (stated once here, repeated in the report):
- forward: 4 * D FLOPs per allowed pair and head (2 * D for q . k, 2 * D for p * v);
- backward: 10 * D per pair, FlashAttention-2 style with recomputation (q . k again, dV, dP, dQ, dK:
  2 * D each), i.e. 2.5 x the forward;
- tiles are classified by interval reasoning, and PARTIAL tiles then checked pair by pair (up to
  REFINE_ELEMENTS pairs in all), as the kernel's block tables settle them;
- a block-sparse kernel with BQ x BK tiles computes every pair of every tile it visits (FULL or
  PARTIAL), padded tiles included: executed = visited * BQ * BK * 4 * D per head;
- bytes (forward, bf16 = 2 bytes per element): every query row of Q read once and of O written once,
  and the K and V tiles (BK x D each) read once per visited tile. Softmax statistics are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import expr as E
from ..expr import Expr
from ..intervals import ALL, NONE, SOME, classify
from ..mask import eval_numpy
from ..semantics import random_keys
from .bound import Value, ratio
from .count import _is_plain_random, block_form, classify_cost, draw_width
from .limits import ARRAY_LIMIT, Budget

FWD_PER_PAIR = 4
BWD_PER_PAIR = 10
BYTES_PER_ELEMENT = 2
REFINE_ELEMENTS = 1 << 23  # pairs of PARTIAL tiles settled one by one


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


@dataclass(frozen=True, slots=True)
class TileRects:
    """Rectangles of the block grid (block indices, half-open) whose tiles are all FULL, or one PARTIAL tile each."""

    q_lo: np.ndarray
    q_hi: np.ndarray
    k_lo: np.ndarray
    k_hi: np.ndarray
    full: np.ndarray  # bool: the rectangle is FULL; else it is a single tile that may be partial


def tile_rects(pred: Expr, n: int, block_q: int, block_k: int, budget: Budget | None = None) -> TileRects:
    """Every non-empty tile of the BQ x BK grid, by quad-tree subdivision of the block grid.

    The same tables as `blocks.block_tables` (a test holds them equal), computed differently because
    the analyser must answer at N = 2**20 in well under a second, on CPU, without importing torch:
    the quad tree splits both block axes at once, a `blockwise` pattern is asked on its own block grid,
    and `| random(r)` adds the drawn tiles instead of classifying the draws by intervals.

    The classification is the sound one of `intervals.classify` (what the kernel's block tables use):
    a tile it cannot prove empty counts as visited, one it cannot prove full as partial. With a budget,
    a quad tree that outgrows it raises OverBudget.
    """
    blocked = block_form(pred)
    if blocked is not None and block_q % blocked[0] == 0 and block_k % blocked[0] == 0:
        b = blocked[0]  # the same tiles, asked of the pattern's own block grid (far fewer rows per tile)
        return tile_rects(blocked[1], -(-n // b), block_q // b, block_k // b, budget)
    if isinstance(pred, E.Or) and any(_is_plain_random(a) for a in pred.args) and n <= ARRAY_LIMIT:
        return _random_tiles(pred, n, block_q, block_k, budget)  # past ARRAY_LIMIT the draws stay SOME
    nq, nk = -(-n // block_q), -(-n // block_k)
    size = 1 << max(0, (max(nq, nk) - 1).bit_length())
    qb = np.zeros(1, dtype=np.int64)
    kb = np.zeros(1, dtype=np.int64)
    out: list[tuple[np.ndarray, ...]] = []
    while qb.size:
        q_hi = np.minimum(qb + size, nq)  # exclusive, in blocks
        k_hi = np.minimum(kb + size, nk)
        if budget is not None:
            budget.spend(int(qb.size) * classify_cost(pred))
        verdict = classify(
            pred, qb * block_q, np.minimum(q_hi * block_q, n) - 1, kb * block_k, np.minimum(k_hi * block_k, n) - 1
        )
        keep = verdict == ALL if size > 1 else verdict != NONE
        out.append((qb[keep], q_hi[keep], kb[keep], k_hi[keep], verdict[keep] == ALL))
        if size == 1:
            break
        some = verdict == SOME
        qb, kb = qb[some], kb[some]
        half = size // 2
        kids_q = np.concatenate([qb, qb, qb + half, qb + half])
        kids_k = np.concatenate([kb, kb + half, kb, kb + half])
        inside = (kids_q < nq) & (kids_k < nk)
        qb, kb, size = kids_q[inside], kids_k[inside], half
    q_lo, q_hi_all, k_lo, k_hi_all, full = (np.concatenate(parts) for parts in zip(*out, strict=True))
    rects = TileRects(q_lo, q_hi_all, k_lo, k_hi_all, full)
    return _refine(pred, n, block_q, block_k, rects)


def _refine(pred: Expr, n: int, block_q: int, block_k: int, r: TileRects) -> TileRects:
    """Settle PARTIAL tiles pair by pair, while their pairs fit REFINE_ELEMENTS: an empty one is dropped,
    a full one promoted (as `blocks.py` settles them for the kernel). Tiles past the budget stay PARTIAL.
    Evaluating `random` draws a row's keys into a bitmap as wide as the draw, so with draws the budget
    counts that width per query row instead."""
    part = np.flatnonzero(~r.full)
    per_tile = block_q * max(block_k, draw_width(pred))
    take = part[: max(0, REFINE_ELEMENTS // per_tile)]
    if take.size == 0:
        return r
    keep = np.ones(r.full.size, dtype=bool)
    full = r.full.copy()
    aq = np.arange(block_q, dtype=np.int64)
    ak = np.arange(block_k, dtype=np.int64)
    step = max(1, (1 << 21) // per_tile)
    for s in range(0, take.size, step):
        t = take[s : s + step]
        ii = r.q_lo[t, None, None] * block_q + aq[None, :, None]
        jj = r.k_lo[t, None, None] * block_k + ak[None, None, :]
        m = np.broadcast_to(
            eval_numpy(pred, np.minimum(ii, n - 1), np.minimum(jj, n - 1), n), (t.size, block_q, block_k)
        )
        valid = (ii < n) & (jj < n)
        keep[t] = (m & valid).any(axis=(1, 2))
        full[t] = (m | ~valid).all(axis=(1, 2))
    return TileRects(r.q_lo[keep], r.q_hi[keep], r.k_lo[keep], r.k_hi[keep], full[keep])


def _random_tiles(pred: E.Or, n: int, block_q: int, block_k: int, budget: Budget | None) -> TileRects:
    """`rest | random(r)`: the tiles of the rest, plus the tiles of the drawn keys that the rest misses.

    PARTIAL tiles are then settled against the whole predicate (the draws may fill one up).
    """
    draws = [a for a in pred.args if isinstance(a, E.RandomMember) and _is_plain_random(a)]
    rest = E.disj(*(a for a in pred.args if a not in draws))
    base = tile_rects(rest, n, block_q, block_k, budget)
    rows = np.arange(n, dtype=np.int64)
    keys = np.concatenate([random_keys(rows, E.evaluate_int(d.n), E.evaluate_int(d.r), d.seed) for d in draws], axis=1)
    nk = -(-n // block_k)
    tiles = np.sort((rows[:, None] // block_q * nk + keys // block_k).reshape(-1))  # sorted, then distinct:
    tiles = tiles[np.concatenate([[True], tiles[1:] != tiles[:-1]])]  # far faster than np.unique's hashing
    tq, tk = tiles // nk, tiles % nk
    verdict = classify(
        rest, tq * block_q, np.minimum((tq + 1) * block_q, n) - 1, tk * block_k, np.minimum((tk + 1) * block_k, n) - 1
    )
    new = verdict == NONE
    both = TileRects(
        np.concatenate([base.q_lo, tq[new]]), np.concatenate([base.q_hi, tq[new] + 1]),
        np.concatenate([base.k_lo, tk[new]]), np.concatenate([base.k_hi, tk[new] + 1]),
        np.concatenate([base.full, np.zeros(int(new.sum()), dtype=bool)]),
    )  # fmt: skip
    return _refine(pred, n, block_q, block_k, both)  # the draws may fill a tile up


def block_counts(pred: Expr, n: int, block_q: int, block_k: int, budget: Budget | None = None) -> BlockCounts:
    """FULL and PARTIAL key blocks per query block (arrays over query blocks: N <= ARRAY_LIMIT)."""
    nq = -(-n // block_q)
    r = tile_rects(pred, n, block_q, block_k, budget)
    diff = np.zeros(nq + 1, dtype=np.int64)
    width = r.k_hi[r.full] - r.k_lo[r.full]
    np.add.at(diff, r.q_lo[r.full], width)
    np.add.at(diff, r.q_hi[r.full], -width)
    full = np.cumsum(diff[:nq])
    partial = np.bincount(r.q_lo[~r.full], minlength=nq).astype(np.int64)
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
