"""The CPU path: the same predicates evaluated with torch's (floor) integer semantics, chunked softmax.

Exact in float64 for float64 inputs (the tests' reference precision); otherwise float32 work. The
forward warns once that it is not the fast path.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .common import _heads_of
from .evaluate import evaluate
from .selection import _sel_dense, _selection

if TYPE_CHECKING:
    from .positions import Positions
    from .spec import PatternSpec

_warned_cpu: list[bool] = []


def _caller_level() -> int:
    """The stack level of the first frame outside the patterndsl package, so a warning names the user's line
    (however many runtime frames lie between: the API, autograd, the device guard)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _head_groups(spec: PatternSpec, patterns: int | tuple[int, ...], k: torch.Tensor, v: torch.Tensor, H: int,
                 group: int, work: torch.dtype) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Per predicate some head runs: (predicate, its query heads, their k and v in `work` precision, rows per
    chunk so that a chunk's scores stay near 2**24 elements)."""
    B, _, N, _ = k.shape
    kv_index = torch.arange(H) // group
    for pat in range(spec.patterns):
        heads = torch.tensor(_heads_of(patterns, pat, H), dtype=torch.int64)
        if heads.numel():
            chunk = max(1, (1 << 24) // max(1, B * heads.numel() * N))
            yield pat, heads, k[:, kv_index[heads]].to(work), v[:, kv_index[heads]].to(work), chunk


def _attention_cpu(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int,
                   patterns: int | tuple[int, ...], out: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor | None = None,
                   picks: dict[int, torch.Tensor] | None = None, at: Positions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward on CPU tensors into `out` and `lse`, a chunk of rows at a time (memory O(chunk * N)).
    `at`: the rows' and keys' own positions (`positions.Positions`; static patterns, any device)."""
    if not _warned_cpu:
        _warned_cpu.append(True)
        warnings.warn(f"patterndsl '{spec.name}': CPU tensors take a PyTorch reference path, not the fast Triton kernel",
                      stacklevel=_caller_level())
    B, H, N, D = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    j = torch.arange(N, dtype=torch.int64)[None, :]
    for pat, heads, kh, vh, chunk in _head_groups(spec, patterns, k, v, H, group, work):
        if spec.selectors[pat] is not None and not (picks and pat in picks):
            picks = dict(picks or {})
            picks[pat] = _selection(spec, pat, q, k, scores, heads, group)
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            i = torch.arange(r0, r1, dtype=torch.int64)[:, None]
            ok = _dynamic_ok(spec, pat, i, j, N, B, heads.numel(), picks, r1 - r0) if at is None else at.allowed(
                spec.predicates[pat].expr, r0, r1)
            o, rows_lse = masked_softmax(torch.matmul(q[:, heads, r0:r1].to(work), kh.transpose(-1, -2)) * scale,
                                         ok, vh)
            out[:, heads, r0:r1] = o.to(q.dtype)
            lse[:, heads, r0:r1] = rows_lse
    return out, lse


def masked_softmax(s: torch.Tensor, ok: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(s over the pairs `ok`) @ v, its log-sum-exp as float32): rows with no allowed key give zeros
    and -inf, never NaN."""
    s = s.masked_fill(~ok, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True)
    o = torch.matmul(p, v) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return o, torch.where(denom == 0, float("-inf"), torch.log(denom) + mx).squeeze(-1).float()


def _attention_cpu_bwd(spec: PatternSpec, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lse: torch.Tensor, delta: torch.Tensor, scale: float, group: int, patterns: int | tuple[int, ...],
                       picks: dict[int, torch.Tensor] | None = None,
                       at: Positions | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU path's gradients, a chunk of rows at a time (memory O(chunk * N), never N^2); `at` as in
    `_attention_cpu`."""
    B, H, N, D = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_index = torch.arange(H) // group
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=k.device)
    dv = torch.zeros(v.shape, dtype=work, device=v.device)
    lse = lse.to(work)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # no key: P = exp(S - inf) = 0
    j = torch.arange(N, dtype=torch.int64)[None, :]
    for pat, heads, kh, vh, chunk in _head_groups(spec, patterns, k, v, H, group, work):
        dkh = torch.zeros(kh.shape, dtype=work)
        dvh = torch.zeros(vh.shape, dtype=work)
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            i = torch.arange(r0, r1, dtype=torch.int64)[:, None]
            ok = _dynamic_ok(spec, pat, i, j, N, B, heads.numel(), picks, r1 - r0) if at is None else at.allowed(
                spec.predicates[pat].expr, r0, r1)
            qc = q[:, heads, r0:r1].to(work)
            doc = do[:, heads, r0:r1].to(work)
            s = torch.matmul(qc, kh.transpose(-1, -2)) * scale
            p = torch.exp(s - lse[:, heads, r0:r1, None]).masked_fill(~ok, 0.0)
            ds = p * (torch.matmul(doc, vh.transpose(-1, -2)) - delta[:, heads, r0:r1, None])
            dq[:, heads, r0:r1] = torch.matmul(ds, kh) * scale
            dkh += torch.matmul(ds.transpose(-1, -2), qc) * scale
            dvh += torch.matmul(p.transpose(-1, -2), doc)
        dk.index_add_(1, kv_index[heads].to(dk.device), dkh)  # GQA: the group's query heads sum into their kv head
        dv.index_add_(1, kv_index[heads].to(dv.device), dvh)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _dynamic_ok(spec: PatternSpec, pat: int, i: torch.Tensor, j: torch.Tensor, N: int, B: int, nh: int,
                picks: dict[int, torch.Tensor] | None, rows: int) -> torch.Tensor:
    """The CPU paths' mask rows: the pattern's predicate, or for a dynamic pattern P0 or (picked and P1),
    [B, nh, rows, N] (picks[pat]: `_selection`'s picks, or for vertical / slash `tokens.membership`)."""
    if picks and pat in picks and spec.token_selection(pat) is not None:  # vertical / slash: their membership
        from .tokens import token_cases

        return token_cases(spec, pat, picks[pat], i, j, N).view(B, nh, rows, N)
    ok = torch.broadcast_to(torch.as_tensor(evaluate(spec.predicates[pat].expr, i, j, N)), (rows, N))
    sel = spec.selectors[pat]
    if sel is None:
        return ok
    nb, nk = -(-N // sel.block), -(-N // sel.kblock)
    case = _sel_dense(picks[pat].cpu(), nk, bool(sel.more)).to(torch.int64)  # type: ignore[index]  # a dynamic pattern: picked
    case = case.view(B, nh, nb, nk)[:, :, i[:, 0] // sel.block][..., j[0] // sel.kblock]
    # a picked block takes P_v, v the set of selectors that picked it (one selector: P0 or (picked and P1))
    for v, c in enumerate(sel.cases, 1):
        ok_v = torch.broadcast_to(torch.as_tensor(evaluate(spec.predicates[c].expr, i, j, N)), (rows, N)) if c >= 0 else False
        ok = torch.where(case == v, ok_v, ok)
    return ok
