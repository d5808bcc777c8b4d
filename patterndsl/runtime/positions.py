"""Attention at given positions: query rows and key rows that are any subset of a longer sequence.

The single call's kernels read a row's position from its index in q or k. A rank of a context-parallel run holds its
queries and the keys it gathered from other ranks in buffers whose row order is not the sequence's, so
the predicate must see each row's own position: `Positions` carries them (and, for packed documents,
each row's document), and the PyTorch path evaluates the pattern there. Buffers whose rows are runs of
consecutive tokens (`Spans`: a rank's shard, the keys it received) take the Triton kernels on a GPU or
under TRITON_INTERPRET=1: cut into segments of at most a block, each inside one block of the sequence,
whose tiles in the sequence's block tables say which segments meet (`tables.span_tables`). Static
patterns only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..expr import Expr
from .backward import _spans_backward
from .common import _head_patterns, _torch_path
from .cpu import _attention_cpu, _attention_cpu_bwd
from .evaluate import evaluate
from .forward import _spans_forward
from .spec import PatternSpec


@dataclass(frozen=True)
class Positions:
    """Per query row and per key row: its position inside its document, the document's id and length
    (one document of length N for a plain sequence). int64 tensors on the attention's device."""

    q: torch.Tensor
    k: torch.Tensor
    q_doc: torch.Tensor
    k_doc: torch.Tensor
    q_len: torch.Tensor
    k_len: torch.Tensor

    @staticmethod
    def of(q_pos: torch.Tensor, k_pos: torch.Tensor, n: int, cu_seqlens: torch.Tensor | None = None) -> Positions:
        """From global positions in a sequence of n tokens, or in packed documents `cu_seqlens` (their
        boundaries, FlashAttention's convention: the pattern applies inside each document)."""
        q_pos, k_pos = q_pos.long(), k_pos.long()
        if cu_seqlens is None:
            zq, zk = torch.zeros_like(q_pos), torch.zeros_like(k_pos)
            return Positions(q_pos, k_pos, zq, zk, zq + n, zk + n)
        cu = cu_seqlens.to(device=q_pos.device, dtype=torch.int64)
        parts: list[torch.Tensor] = []
        for g in (q_pos, k_pos):
            doc = torch.searchsorted(cu, g, right=True) - 1
            parts.extend((g - cu[doc], doc, cu[doc + 1] - cu[doc]))
        return Positions(parts[0], parts[3], parts[1], parts[4], parts[2], parts[5])

    def allowed(self, pred: Expr, r0: int, r1: int) -> torch.Tensor:
        """[r1 - r0, keys] bool: query rows r0 .. r1 - 1 against every key row."""
        i, lens = self.q[r0:r1, None], self.q_len[r0:r1]
        same = self.q_doc[r0:r1, None] == self.k_doc[None, :]
        out = torch.zeros_like(same)
        for n in torch.unique(lens).tolist():  # per document length: N a plain integer, as every expression expects
            rows = lens == n
            ok = evaluate(pred, i[rows], self.k[None, :], int(n))
            out[rows] = torch.broadcast_to(torch.as_tensor(ok, device=same.device), (int(rows.sum()), same.shape[1]))
        return out & same


Runs = tuple[tuple[int, int], ...]


def run_positions(runs: Iterable[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Every position of `runs` ((start, stop) pairs, or an int array [m, 2] of them), one run after
    another: int64 [rows]. The one expansion of runs: `Spans`, a placement's shard and a context-parallel
    transfer all go through it (vectorised: no Python loop per run)."""
    iv = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    lengths = np.maximum(iv[:, 1] - iv[:, 0], 0)  # (a run that stops before it starts holds nothing)
    rows: np.ndarray = np.repeat(iv[:, 0] - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    return rows


@dataclass(frozen=True)
class Spans:
    """The tokens a query buffer's rows and a key buffer's rows hold: runs (start, stop) of global positions,
    one after another, in a sequence of n tokens or in packed documents (`docs`: their cu_seqlens
    boundaries; the pattern applies inside each document)."""

    q: Runs
    k: Runs
    n: int
    docs: tuple[int, ...] | None = None

    def positions(self, device: torch.device | str) -> Positions:
        """Every row's position, for the PyTorch path."""
        q, k = (torch.from_numpy(run_positions(runs)).to(device) for runs in (self.q, self.k))
        cu = None if self.docs is None else torch.tensor(self.docs, dtype=torch.int64)
        return Positions.of(q, k, self.n, cu)

    def rows(self) -> tuple[int, int]:
        return sum(b - a for a, b in self.q), sum(b - a for a, b in self.k)


def _kernel(q: torch.Tensor, k: torch.Tensor, at: Positions | Spans) -> bool:
    """Whether the Triton kernels serve this call: runs (`Spans`) off the CPU path. (A pattern's token
    layout, a reordering for the single call's tiles, is left aside: segments keep the token order.)"""
    if not isinstance(at, Spans):
        return False
    if at.rows() != (q.shape[2], k.shape[2]):
        raise ValueError(f"the spans hold {at.rows()[0]} query and {at.rows()[1]} key rows; q has {q.shape[2]} "
                         f"and k {k.shape[2]}")
    return not _torch_path(q)


def _static(spec: PatternSpec) -> None:
    if any(sel is not None for sel in spec.selectors):
        raise ValueError("attention at given positions serves static patterns (a selector picks blocks of "
                         "the whole sequence)")


def attention_at(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: Positions | Spans,
                 scale: float | None = None, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of queries q [B, H, Nq, D] against keys k, v [B, Hkv, Nk, D] whose positions `at` gives.
    A query with no allowed key among these gets zeros and lse -inf, so partial results over disjoint key
    sets merge by log-sum-exp (`merge`)."""
    _static(spec)
    B, H, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    patterns = _head_patterns(spec, layer)
    if _kernel(q, k, at):
        assert isinstance(at, Spans)
        return _spans_forward(spec, q, k, v, at.q, at.k, at.n, at.docs, scale, patterns)
    if k.shape[2] == 0:  # no key at all: every row is empty
        return torch.zeros_like(q), torch.full((B, H, Nq), float("-inf"), device=q.device)
    if isinstance(at, Spans):
        at = at.positions(q.device)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    return _attention_cpu(spec, q, k, v, scale, H // k.shape[1], patterns, out, lse, at=at)


def attention_at_backward(spec: PatternSpec, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, at: Positions | Spans, dlse: torch.Tensor | None = None,
                          scale: float | None = None,
                          layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention_at`. `out` and `lse` are the final ones of the queries (merged over every
    key set), so the key sets' dk, dv may be computed one set at a time and dq summed."""
    _static(spec)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    patterns = _head_patterns(spec, layer)
    if _kernel(q, k, at):
        assert isinstance(at, Spans)
        return _spans_backward(spec, do, q, k, v, out, lse, dlse, at.q, at.k, at.n, at.docs, scale, patterns)
    if k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if isinstance(at, Spans):
        at = at.positions(q.device)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = (do.to(work) * out.to(work)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(work)
    return _attention_cpu_bwd(spec, do, q, k, v, lse, delta, scale, q.shape[1] // k.shape[1], patterns, at=at)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (out, lse) from partial results over disjoint key sets, by log-sum-exp: each part's weight is
    exp(lse_part - lse). Rows no part reaches stay zeros with lse -inf."""
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, 0)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    work = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32
    out = torch.zeros_like(parts[0][0], dtype=work)
    for o, part in parts:
        out += o.to(work) * torch.exp(part.to(work) - safe)[..., None]
    return out.to(parts[0][0].dtype), lse
