"""Tokens permuted at run time within segments: `pattern p = permute(P, segment=s, by=given)`.

The caller passes, with each call, a permutation `perm` that maps every segment of `s` tokens onto itself
(positions `[a, a + s)` from the sequence's start, or from each document's start with packed documents;
the last segment may be shorter). Position `r` of the permuted sequence holds the caller's token
`perm[r]`, and the call means attention with pattern `P` on `q[perm]`, `k[perm]`, `v[perm]`, its rows
put back in the caller's order: `allowed(i, j) = P(rank(i), rank(j))` with `rank` the inverse of `perm`.
A pair (queries' order, keys' order) permutes q by the first and k, v by the second (PBS-Attn permutes
keys only): `allowed(i, j) = P(rank_q(i), rank_k(j))`. An order may be shared, per batch element, per KV
head (the query heads of a group share it: k and v are gathered once) or per query head (each query head
gathers its own copy of its KV head's k and v).

The permutation is applied around the kernels, as a token layout given as data: q, k and v are gathered
into the permuted order (`take_along_dim`, whose index broadcasts over head_dim, so the extra memory is
one copy of q, k, v and the index, O(N)), the pattern's kernels run on them unchanged (static, selectors,
packed documents), and the outputs and log-sum-exp are gathered back by the inverse permutation. Both
gathers are differentiable, so gradients reach q, k, v in the caller's order through autograd.
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import _check_docs
from .common import _head_patterns
from .options import current_options
from .spec import PatternSpec

__all__ = ["check_permutation", "gather_rows", "permuted", "permuted_qk"]


def check_permutation(spec: PatternSpec, perm: Any, batch: int, heads: int, n: int, device: torch.device,
                      starts: list[int] | None = None, kv_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) as int64 [batch or 1, heads or kv_heads or 1, n], after checking that `perm` is an int
    tensor [batch or 1, n] or [batch or 1, heads or kv_heads or 1, n] (one order per query head, per KV head
    or shared) on `device` that maps each segment onto itself (segments counted from each of `starts`, the
    documents' first tokens; default: the sequence's)."""
    seg = spec.permute
    assert seg is not None
    if not torch.is_tensor(perm):
        raise TypeError(f"permutation must be a torch.Tensor, got {type(perm).__name__}")
    per_head = " or ".join(str(x) for x in dict.fromkeys((heads, kv_heads or heads, 1)))
    want = f"[{batch} or 1, {n}] or [{batch} or 1, {per_head}, {n}]"
    if perm.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"permutation must be an int32 or int64 tensor {want}, got {perm.dtype}")
    if perm.device != device:
        raise ValueError(f"permutation must be on q's device ({device}), got {perm.device}")
    p = perm[:, None] if perm.dim() == 2 else perm
    if p.dim() != 3 or p.shape[0] not in (1, batch) or p.shape[1] not in (1, heads, kv_heads) or p.shape[2] != n:
        raise ValueError(f"permutation must have shape {want}, got {list(perm.shape)}")
    p = p.long()
    pos = torch.arange(n, device=device)
    first = torch.zeros(n, dtype=torch.long, device=device)  # the first token of each position's document
    if starts:
        lengths = torch.tensor([b - a for a, b in zip(starts, [*starts[1:], n], strict=True)], device=device)
        first = torch.repeat_interleave(torch.tensor(starts, device=device), lengths, output_size=n)
    segment_of = first + (pos - first) // seg * seg  # the first token of each position's segment
    inside = (p >= 0) & (p < n)
    same = inside & (segment_of[p.clamp(0, max(n - 1, 0))] == segment_of)
    inverse = torch.zeros_like(p).scatter_(2, torch.where(same, p, pos), pos.expand_as(p))
    onto = same & (torch.gather(p, 2, inverse) == pos)
    if current_options().async_checks:  # the caller asked for no host synchronisation
        torch._assert_async(onto.all(), f"permutation must map each segment of {seg} tokens onto itself")
        return p, inverse
    if n and not bool(onto.all()):
        b, h, r = (int(x) for x in torch.nonzero(~onto)[0])
        where = f"(batch {b}, head {h}) " if p.shape[0] * p.shape[1] > 1 else ""
        if not bool(same[b, h, r]):
            t = int(p[b, h, r])
            raise ValueError(f"permutation must map each segment of {seg} tokens onto itself, but position {r} "
                             f"{where}holds token {t}, outside the segment {int(segment_of[r])}:"
                             f"{min(int(segment_of[r]) + seg, _doc_end(starts or [], n, r))}")
        raise ValueError(f"permutation must map each segment of {seg} tokens onto itself, but token {r} {where}"
                         "is not reached (another token appears twice)")
    return p, inverse


def _doc_end(starts: list[int], n: int, r: int) -> int:
    return next((s for s in starts if s > r), n)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, ...] with rows taken at `index` [B or 1, H or 1, N] (broadcast over batch, heads and the
    trailing dimensions: no index as large as x)."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 3)))
    return torch.take_along_dim(x, idx, dim=2)


def permuted(spec: PatternSpec, q: Any, k: Any, v: Any, perm: Any, *, cu_seqlens: Any, max_seqlen: Any,
             layer: Any, run: Any) -> tuple[Any, Any]:
    """(out, lse) of a permuted pattern in the caller's order: `run(q, k, v)` is the unpermuted call on the
    permuted tensors (same options, `cu_seqlens` included), returning (out, lse)."""
    _head_patterns(spec, layer)
    packed, (qp, kp, vp), inverse = _gathered(spec, q, k, v, perm, cu_seqlens, max_seqlen)
    o, lse = run(qp, kp, vp)
    o4 = o.transpose(0, 1)[None] if packed else o
    l3 = lse[None] if packed else lse
    o4, l3 = gather_rows(o4, inverse), gather_rows(l3, inverse)
    return (o4[0].transpose(0, 1), l3[0]) if packed else (o4, l3)


def permuted_qk(spec: PatternSpec, q: Any, k: Any, perm: Any) -> tuple[Any, Any]:
    """q and k [B, H, N, D] in the permuted order (what a permuted pattern's selectors score)."""
    qp, kp, _ = _gathered(spec, q, k, None, perm, None, None)[1]
    return qp, kp


def _gathered(spec: PatternSpec, q: Any, k: Any, v: Any, perm: Any, cu_seqlens: Any,
              max_seqlen: Any) -> tuple[bool, tuple[Any, Any, Any], torch.Tensor]:
    """(packed, q, k and v in the permuted order, the queries' inverse permutation), after checking the
    inputs' shapes and the permutation (one tensor, or a pair: queries' order, keys' order). v None (what
    selectors score needs no values): none is gathered, None comes back in its place."""
    if v is None:
        packed, (qp, kp, _), inverse = _gathered(spec, q, k, k[..., :0], perm, cu_seqlens, max_seqlen)
        return packed, (qp, kp, None), inverse
    if spec.permute is None:
        raise ValueError(f"pattern '{spec.name}' has no permute(...): it takes no permutation")
    if perm is None:
        raise ValueError(f"pattern '{spec.name}' permutes tokens within segments of {spec.permute}: pass "
                         f"permutation=perm, an int tensor [batch or 1, (heads or kv_heads or 1,) N]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    packed = cu_seqlens is not None and q.dim() == 3
    if not (q.dim() == k.dim() == v.dim() and q.dim() in ((3, 4) if cu_seqlens is not None else (4,))):
        raise ValueError(f"q, k, v must be [B, heads, N, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    q4, k4, v4 = (t.permute(1, 0, 2)[None] if packed else t for t in (q, k, v))
    if q4.shape[2] != k4.shape[2] or k4.shape[2] != v4.shape[2]:
        raise ValueError(f"a permuted pattern needs as many queries as keys, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    B, H, N = q4.shape[:3]
    hkv = k4.shape[1]
    if hkv < 1 or H % hkv or k4.shape[0] != B or v4.shape[:2] != k4.shape[:2]:
        raise ValueError(f"k, v must be [{B}, kv_heads, {N}, head_dim] with kv_heads dividing {H}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    starts = _check_docs(spec, q4, cu_seqlens, max_seqlen)[0] if cu_seqlens is not None else None
    if isinstance(perm, tuple | list):
        if len(perm) != 2:
            raise ValueError(f"permutation must be one tensor or a pair (queries' order, keys' order), got "
                             f"{len(perm)} items")
        p, inverse = check_permutation(spec, perm[0], B, H, N, q4.device, starts, hkv)
        pk = check_permutation(spec, perm[1], B, H, N, q4.device, starts, hkv)[0]
    else:
        p, inverse = check_permutation(spec, perm, B, H, N, q4.device, starts, hkv)
        pk = p
    if p.shape[1] == hkv < H:  # an order per KV head: its query heads share it
        p, inverse = (t.repeat_interleave(H // hkv, dim=1) for t in (p, inverse))
    if pk.shape[1] == H > hkv:  # an order per query head: each reads its own copy of its KV head
        k4, v4 = (t.repeat_interleave(H // hkv, dim=1) for t in (k4, v4))
    got = gather_rows(q4, p), gather_rows(k4, pk), gather_rows(v4, pk)
    if packed:
        got = tuple(t[0].transpose(0, 1) for t in got)  # type: ignore[assignment]
    return packed, got, inverse
