"""`attn.context_parallel(q, k, v, group)`: attention over a sequence whose rows are spread over ranks.

Each rank holds the rows of its placement (`Placement`) of q, k and v. The forward sends every other rank
the key/value rows its queries need (`plan.plan`), attends its queries to its own keys while they travel,
then to the received keys, and merges the two partial results by log-sum-exp. The backward computes the
gradients of the received rows and sends them back to their owners, who add them to their own. Attention
runs where each row's position is given (`runtime.positions.Spans`: the shard's runs, the received
intervals), so the predicate sees global positions: the Triton kernels on a GPU or under
TRITON_INTERPRET=1, the PyTorch path on CPU tensors otherwise.
A pattern with a selector gathers every rank's q, k and v (its blocks may come from anywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..runtime.positions import Spans, attention_at, attention_at_backward, merge, run_positions
from ..runtime.spec import PatternSpec
from . import exchange
from .placement import Placement, _docs
from .plan import Terms, plan

_PLANS: dict[tuple[Any, ...], RankPlan] = {}


@dataclass(frozen=True)
class RankPlan:
    """One rank's part of a plan: the local rows each peer receives from it (`send`, tensors on its device),
    how many rows it receives from each peer (`recv`), and where its queries and keys lie in the sequence:
    its own rows against its own keys (`local`), against the received ones in peer order (`remote`)."""

    send: dict[int, torch.Tensor]
    recv: dict[int, int]
    local: Spans
    remote: Spans


def _local_index(placement: Placement, rank: int, g: np.ndarray) -> np.ndarray:
    """Rows of rank's shard holding global positions g (all inside its runs)."""
    runs = placement.runs[rank]
    starts = np.array([a for a, _ in runs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([b - a for a, b in runs])])[:-1]
    order = np.argsort(starts)
    run = order[np.searchsorted(starts[order], g, side="right") - 1]
    rows: np.ndarray = offsets[run] + g - starts[run]
    return rows


def rank_plan(spec: PatternSpec, placement: Placement, rank: int, block: int, docs: tuple[int, ...] | None,
              layer: int | None, device: torch.device) -> RankPlan:
    """`rank`'s transfers of the plan for this pattern and placement (cached)."""
    key = (spec.key, placement, rank, block, docs, layer, str(device))
    hit = _PLANS.get(key)
    if hit is None:
        full = plan(Terms.of_spec(spec, layer), placement, block, docs)
        on = dict(dtype=torch.int64, device=device)
        send = {r: torch.tensor(_local_index(placement, rank, run_positions(full.recv[r][rank])), **on)  # type: ignore[arg-type]
                for r in range(placement.world) if full.recv[r][rank].size}
        peers = [s for s in range(placement.world) if full.recv[rank][s].size]
        recv = {s: int((full.recv[rank][s][:, 1] - full.recv[rank][s][:, 0]).sum()) for s in peers}
        mine = placement.runs[rank]
        got = tuple((int(a), int(b)) for s in peers for a, b in full.recv[rank][s])
        hit = RankPlan(send, recv, Spans(mine, mine, placement.n, docs), Spans(mine, got, placement.n, docs))
        if len(_PLANS) >= 64:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = hit
    return hit


class ContextParallel(torch.autograd.Function):
    """The exchange and the two partial attentions, with the gradients of received rows sent home."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rp: RankPlan, spec: PatternSpec,
                scale: float, layer: int | None, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        kv = torch.stack([k, v])
        sends = {p: kv.index_select(3, idx) for p, idx in rp.send.items()}
        receives = {p: kv.new_empty([*kv.shape[:3], m, kv.shape[4]]) for p, m in rp.recv.items()}
        pending = exchange.start(sends, receives, group)
        parts = [attention_at(spec, q, k, v, rp.local, scale, layer)]  # own keys while the rest travel
        got = pending.wait()
        remote = torch.cat([got[p] for p in sorted(got)], 3) if got else kv[:, :, :, :0]
        if got:
            parts.append(attention_at(spec, q, remote[0], remote[1], rp.remote, scale, layer))
        out, lse = merge(parts) if len(parts) > 1 else parts[0]
        ctx.save_for_backward(q, k, v, remote, out, lse)
        ctx.rp, ctx.spec, ctx.scale, ctx.layer, ctx.group = rp, spec, scale, layer, group
        return out, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, remote, out, lse = ctx.saved_tensors
        rp, spec, scale, layer = ctx.rp, ctx.spec, ctx.scale, ctx.layer
        do = torch.zeros_like(out) if do is None else do.contiguous()
        sends: dict[int, torch.Tensor] = {}
        dq_remote = None
        if rp.recv:
            dq_remote, dk_r, dv_r = attention_at_backward(spec, do, q, remote[0], remote[1], out, lse, rp.remote,
                                                          dlse, scale, layer)
            dkv = torch.stack([dk_r, dv_r])
            at = 0
            for p in sorted(rp.recv):
                m = rp.recv[p]
                sends[p] = dkv[:, :, :, at:at + m]
                at += m
        receives = {p: k.new_empty([2, *k.shape[:2], idx.numel(), k.shape[3]]) for p, idx in rp.send.items()}
        pending = exchange.start(sends, receives, ctx.group)
        dq, dk, dv = attention_at_backward(spec, do, q, k, v, out, lse, rp.local, dlse, scale, layer)
        if dq_remote is not None:
            dq = dq + dq_remote
        for p, g in pending.wait().items():
            dk.index_add_(2, rp.send[p], g[0])
            dv.index_add_(2, rp.send[p], g[1])
        return dq, dk, dv, None, None, None, None, None


class _Gathered(torch.autograd.Function):
    """The whole sequence from every rank's shard; the backward sums the ranks' gradients and keeps the
    shard's rows (all_reduce: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, placement: Placement, rank: int, group: Any) -> torch.Tensor:
        ctx.placement, ctx.rank, ctx.group = placement, rank, group
        return placement.unshard(x, 2, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return ctx.placement.shard(g, ctx.rank), None, None, None


def context_parallel(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any = None, *,
                     placement: Placement | None = None, return_lse: bool = False, cu_seqlens: Any = None,
                     layer: int | None = None, scale: float | None = None, block: int = 128) -> Any:
    """See `Attention.context_parallel`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context_parallel needs torch.distributed initialised (init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"context_parallel takes shards [B, H, N_local, D]; {name} is not a 4-d tensor")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"q, k and v shards must hold the same rows, got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if placement is None:
        sizes = torch.tensor([q.shape[2]], dtype=torch.int64, device=q.device)
        every = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(every, sizes, group=group)
        placement = Placement.contiguous(int(sum(int(s) for s in every)), world)
        if [int(s) for s in every] != [placement.length(r) for r in range(world)]:
            raise ValueError(f"without a placement the shards must be x.tensor_split({world}, dim=2), got lengths "
                             f"{[int(s) for s in every]}")
    elif placement.world != world or placement.length(rank) != q.shape[2]:
        raise ValueError(f"the placement is for {placement.world} ranks with {placement.length(min(rank, placement.world - 1))} "
                         f"rows on rank {rank}; the group has {world} ranks and this shard {q.shape[2]} rows")
    docs = _docs(cu_seqlens)
    if docs is not None and (q.shape[0] != 1 or docs[-1] != placement.n or docs[0] != 0):
        raise ValueError(f"with cu_seqlens, the batch is 1 and the documents cover the {placement.n} tokens")
    spec = attn.spec
    if q.shape[1] % k.shape[1] or k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape with heads dividing q's, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)} for q {tuple(q.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if any(sel is not None for sel in spec.selectors):
        if docs is not None:
            raise ValueError("packed documents (cu_seqlens) are not supported for dynamic selectors yet")
        full = [_Gathered.apply(t, placement, rank, group) for t in (q, k, v)]  # type: ignore[no-untyped-call]
        o, lse = attn(*full, return_lse=True, layer=layer, scale=scale)
        out, lse = placement.shard(o, rank), placement.shard(lse, rank)
    else:
        rp = rank_plan(spec, placement, rank, block, docs, layer, q.device)
        out, lse = ContextParallel.apply(q, k, v, rp, spec, scale, layer, group)  # type: ignore[no-untyped-call]
    return (out, lse) if return_lse else out
