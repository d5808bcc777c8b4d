"""Which tokens each rank owns in a context-parallel run, and how a data loader applies that.

A placement gives every rank one or more runs of the sequence (half-open token intervals); its shard is
their rows in order. Candidates: contiguous runs balanced by the pattern's cost (windows, packed
documents: only the runs' edges need remote keys) and the head-tail split of causal ring attention (rank
r holds chunks r and 2R - 1 - r, which gives every rank the same share of a causal triangle).
`Placement.choose` keeps the candidate with the fewest bytes sent among the balanced ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ..runtime.api import Attention
    from .plan import Terms

BALANCED = 0.05  # candidates at most this imbalanced (max / mean - 1 of allowed pairs) count as balanced


@dataclass(frozen=True)
class Placement:
    """`runs[r]`: the (start, stop) token intervals rank r owns, in the order of its shard's rows. The
    runs of all ranks tile 0 .. n - 1 exactly."""

    n: int
    runs: tuple[tuple[tuple[int, int], ...], ...]
    strategy: str = "given"

    def __post_init__(self) -> None:
        spans = sorted((a, b) for rr in self.runs for a, b in rr)
        at = 0
        for a, b in spans:
            if a != at or b < a:
                raise ValueError(f"a placement's runs must tile 0 .. {self.n - 1} without overlap, got {spans}")
            at = b
        if at != self.n:
            raise ValueError(f"a placement's runs must tile 0 .. {self.n - 1}, they end at {at}")

    @property
    def world(self) -> int:
        return len(self.runs)

    def length(self, rank: int) -> int:
        return sum(b - a for a, b in self.runs[rank])

    def positions(self, rank: int, device: Any = "cpu") -> torch.Tensor:
        """The global positions of rank's shard rows, int64."""
        import torch

        from ..runtime.positions import run_positions

        return torch.from_numpy(run_positions(self.runs[rank])).to(device)

    def shard(self, x: torch.Tensor, rank: int | None = None, dim: int = 2) -> torch.Tensor:
        """Rank's shard of the whole-sequence tensor x (sequence on `dim`; rank: this process's rank in
        the default group when torch.distributed is initialised)."""
        if x.shape[dim] != self.n:
            raise ValueError(f"the placement is for N = {self.n}, got a tensor of length {x.shape[dim]} on dim {dim}")
        import torch

        rank = _rank() if rank is None else rank
        return torch.cat([x.narrow(dim, a, b - a) for a, b in self.runs[rank]], dim) if self.runs[rank] else \
            x.narrow(dim, 0, 0)

    def unshard(self, shards: Sequence[torch.Tensor] | torch.Tensor, dim: int = 2, group: Any = None) -> torch.Tensor:
        """The whole sequence from every rank's shard: a list in rank order, or this rank's shard alone
        (then gathered from the group's ranks, a collective every rank calls)."""
        import torch

        if torch.is_tensor(shards):
            shards = _gather(shards, [self.length(r) for r in range(self.world)], dim, group)
        if len(shards) != self.world:
            raise ValueError(f"unshard takes {self.world} shards, one per rank, got {len(shards)}")
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, x in enumerate(shards):
            at = 0
            for a, b in self.runs[rank]:
                pieces.append((a, x.narrow(dim, at, b - a)))
                at += b - a
        return torch.cat([p for _, p in sorted(pieces, key=lambda t: t[0])], dim)

    # --- constructors ----------------------------------------------------------------------------------
    @staticmethod
    def contiguous(n: int, world: int) -> Placement:
        """Rank r holds x.tensor_split(world, dim)[r]: the default of `attn.context_parallel`."""
        sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
        edges = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        return Placement(n, tuple(((edges[r], edges[r + 1]),) for r in range(world)), "contiguous")

    @staticmethod
    def balanced(n: int, world: int, row_cost: np.ndarray, block: int) -> Placement:
        """Contiguous runs cut at block edges where the prefix of the rows' cost crosses r / world of it."""
        edges = _cuts(row_cost, world, block, n)
        return Placement(n, tuple(((edges[r], edges[r + 1]),) for r in range(world)), "contiguous by cost")

    @staticmethod
    def head_tail(n: int, world: int, block: int) -> Placement:
        """2 * world chunks of whole blocks; rank r holds chunk r and chunk 2 * world - 1 - r."""
        edges = _cuts(np.ones(n, dtype=np.int64), 2 * world, block, n)
        return Placement(n, tuple(tuple((edges[c], edges[c + 1]) for c in (r, 2 * world - 1 - r))
                                  for r in range(world)), "head-tail")

    @staticmethod
    def choose(attn: Attention, n: int, world: int, *, cu_seqlens: Any = None, block: int = 128,
               layer: int | None = None) -> Placement:
        """The candidate (balanced by cost, head-tail) with the fewest key bytes sent by the busiest rank among
        those balanced within 5 % in allowed pairs, else the best balanced one."""
        from .plan import Terms

        return Placement.best(Terms.of_spec(attn.spec, layer), n, world, _docs(cu_seqlens), block)

    @staticmethod
    def best(terms: Terms, n: int, world: int, docs: tuple[int, ...] | None = None, block: int = 128) -> Placement:
        """`choose` for the pattern's terms (`plan.Terms`) and documents' boundaries `docs`."""
        from .plan import imbalance, plan, rank_costs, row_costs

        if terms.dynamic:
            return Placement.contiguous(n, world)  # a selector's cost depends on the data: even rows
        cost = row_costs(terms, n, docs)
        block = max(1, min(block, n // (2 * world)))
        scored = []
        for cand in (Placement.balanced(n, world, cost, block), Placement.head_tail(n, world, block)):
            sent = plan(terms, cand, block, docs).tokens_sent()
            scored.append((imbalance(rank_costs(cand, cost)), int(sent.max()), cand))
        fine = [s for s in scored if s[0] <= BALANCED]
        best = min(fine, key=lambda s: (s[1], s[0])) if fine else min(scored, key=lambda s: (s[0], s[1]))
        return best[2]


def _docs(cu_seqlens: Any) -> tuple[int, ...] | None:
    """cu_seqlens as a tuple of ints (hashable, for the plans' caches), or None."""
    if cu_seqlens is None:
        return None
    return tuple(int(x) for x in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens))


def _cuts(row_cost: np.ndarray, parts: int, block: int, n: int) -> list[int]:
    """parts + 1 edges at block multiples (and n) splitting the cost evenly, non-decreasing."""
    blocks = -(-n // block)
    per_block = np.add.reduceat(row_cost, np.arange(blocks) * block) if n else np.zeros(0, dtype=np.int64)
    prefix = np.concatenate([[0], np.cumsum(per_block)])
    total = prefix[-1]
    targets = np.arange(1, parts) * (total / parts)
    at = np.searchsorted(prefix, targets)  # first block edge whose prefix reaches the target
    at = np.where((at > 0) & (np.abs(prefix[np.maximum(at - 1, 0)] - targets) < np.abs(prefix[np.minimum(at, blocks)] - targets)),
                  at - 1, at)  # the nearer edge
    edges = [0, *(min(int(e) * block, n) for e in np.maximum.accumulate(at)), n]
    return edges


def _rank() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard() needs rank= when torch.distributed is not initialised")
    return dist.get_rank()


def _gather(x: torch.Tensor, lengths: list[int], dim: int, group: Any) -> list[torch.Tensor]:
    """Every rank's shard (lengths known from the placement; padded to the longest for all_gather)."""
    import torch
    import torch.distributed as dist

    top = max(lengths)
    pad = list(x.shape)
    pad[dim] = top - x.shape[dim]
    full = torch.cat([x, x.new_zeros(pad)], dim).contiguous()
    got = [torch.empty_like(full) for _ in lengths]
    dist.all_gather(got, full, group=group)
    return [g.narrow(dim, 0, m) for g, m in zip(got, lengths, strict=True)]
