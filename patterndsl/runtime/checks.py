"""Argument checks of the run-time API, in one place: each misuse is one clear sentence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .evaluate import evaluate

if TYPE_CHECKING:
    from .spec import PatternSpec


def _requirements(spec: PatternSpec, N: int) -> None:
    """The pattern's own requirements at N (its arguments' ranges, a grid layout's size)."""
    try:
        for req in spec.requirements:
            value = evaluate(req.value, 0, 0, N)
            if req.exact and value != req.minimum:
                raise ValueError(f"{req.message} but N = {N}")
            if not req.exact and value < req.minimum:
                raise ValueError(f"{req.message} must be at least {req.minimum}, got {value} at N = {N}")
    except ZeroDivisionError:
        raise ValueError(f"the pattern divides by zero at N = {N}") from None


def check_n(spec: PatternSpec, N: int) -> None:
    """Raise ValueError when this pattern cannot run at sequence length N (its arguments, its layout)."""
    if N < 1:
        raise ValueError(f"N must be at least 1, got {N}")
    if N > spec.max_n:
        raise ValueError(f"N = {N} is beyond this pattern's proven index range (N <= {spec.max_n})")
    _requirements(spec, N)


def check_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str = "q, k, v") -> None:
    """One dtype for the three, one the kernels take (float64 on the CPU path only)."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{names} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if q.device.type == "cpu" else ())
    if q.dtype not in allowed:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in allowed)}, got {q.dtype}")


def _check(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
           patterns: int | tuple[int, ...], check_length: bool = True) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, N, head_dim], got shape {tuple(t.shape)}")
    check_dtypes(q, k, v)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k, v must be [{B}, kv_heads, {N}, {D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[1] < 1 or H % k.shape[1] != 0:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({H})")
    if not isinstance(patterns, int) and H != len(patterns):
        where = "this pattern" if spec.model_layers is None else "this layer of the model"
        raise ValueError(f"{where} defines {len(patterns)} heads, got {H} query heads")
    if B < 1 or H < 1 or D < 1:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
    if q.device.type != "cpu" and D > 256:
        raise ValueError(f"head_dim must be at most 256 on the GPU kernel, got {D}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if check_length:
        check_n(spec, N)
    return H // k.shape[1]


def _check_docs(spec: PatternSpec, q: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int | None) -> tuple[list[int], list[int]]:
    """(starts, lengths) of the documents as Python ints, after checking cu_seqlens against q [1, H, total, D]."""
    if (not torch.is_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        got = f"shape {tuple(cu_seqlens.shape)}, {cu_seqlens.dtype}" if torch.is_tensor(cu_seqlens) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [0, n1, n1 + n2, ..., total], got {got}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device ({q.device}), got {cu_seqlens.device}")
    cu = cu_seqlens.tolist()
    total = q.shape[2]
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got {cu[0]} ... {cu[-1]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    for d, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cu_seqlens must not decrease, got {cu[d]} then {cu[d + 1]} (document {d})")
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < max(lengths):
            d = lengths.index(max(lengths))
            raise ValueError(f"max_seqlen = {max_seqlen} but document {d} holds {lengths[d]} tokens")
    seen: set[int] = set()
    for d, n in enumerate(lengths):
        if n and n not in seen:
            seen.add(n)
            try:
                check_n(spec, n)
            except ValueError as e:
                raise ValueError(f"document {d} (tokens {cu[d]}:{cu[d + 1]}): {e}") from None
    return cu[:-1], lengths


def _need_scores(spec: PatternSpec, q: torch.Tensor, scores: torch.Tensor | None) -> None:
    given = any(s.given for sel in spec.selectors if sel is not None for s in sel.all)
    if given and scores is None:
        raise ValueError("this pattern's topk has score=given: pass scores=[batch, heads, blocks, blocks]")
    if not given and scores is not None:
        raise ValueError("this pattern takes no scores (no topk(..., score=given))")
    if given:
        _check_scores(spec, scores, q)


def _check_scores(spec: PatternSpec, scores: object, q: torch.Tensor) -> None:
    if not torch.is_tensor(scores):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    B, H, N, D = q.shape
    for sel in (s for x in spec.selectors if x is not None for s in x.all):
        if sel.given:
            nb, nk = -(-N // sel.block), -(-N // sel.kblock)
            if tuple(scores.shape) != (B, H, nb, nk):
                raise ValueError(f"scores must be [batch, heads, ceil(N/{sel.block}), ceil(N/{sel.kblock})] = "
                                 f"{[B, H, nb, nk]}, got {list(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if scores.device != q.device:
        raise ValueError(f"scores must be on q's device ({q.device}), got {scores.device}")
