"""Point-to-point exchange of key/value rows (and of their gradients) between the ranks of a group.

Every transfer's size is known on both sides from the plan, so one batch of isend / irecv per step
carries it (torch.distributed's `batch_isend_irecv`: NCCL groups the calls, gloo runs them as they come);
the caller computes on its own rows while the batch is in flight and waits only before it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Pending:
    """Transfers in flight: `wait()` returns the received tensors by the peer's rank in the group."""

    requests: list[Any]
    received: dict[int, torch.Tensor]

    def wait(self) -> dict[int, torch.Tensor]:
        for req in self.requests:
            req.wait()
        return self.received


def _peer(group: Any, rank: int) -> int:
    """The global rank of `rank` in `group` (P2P calls take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


_READY: set[Any] = set()  # groups whose communicator a collective has set up


def start(sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor], group: Any) -> Pending:
    """Send `sends[peer]` to each peer and receive into `receives[peer]` (contiguous buffers of the sizes
    both sides' plans give), without waiting. Every rank of the group calls it, with or without transfers:
    the first call is a barrier, since NCCL needs every rank in a group's first call (a rank whose plan
    has nothing to send could otherwise leave a peer's first batch of transfers waiting)."""
    key = dist.group.WORLD if group is None else group  # a new default group after re-initialisation
    if key not in _READY:
        dist.barrier(group=group)
        _READY.add(key)
    ops = [dist.P2POp(dist.isend, t.contiguous(), _peer(group, p), group) for p, t in sorted(sends.items())]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, p), group) for p, t in sorted(receives.items())]
    return Pending(dist.batch_isend_irecv(ops) if ops else [], receives)
