"""A token layout as a physical permutation, for the fast kernels.

`_attn_fwd` reads a token layout in place: every tile computes its rows' tokens and loads them by pointer,
which costs far more per visited pair than the fast kernel's TMA tiles (docs/decisions.md, token layouts).
Here q, k and v are instead gathered once into the layout's row order (buffers of `tables.rows` rows; row r
holds token LAYOUT(r), a padding row zeros), the fast kernel runs on those contiguous buffers with the
layout's block tables (which are over rows already), and its output rows and log-sum-exp are gathered back
to token order: the caller gets what `_attn_fwd` gives. The backward may do the same (`backward_rows`: q,
k, v, the output and dO with their log-sum-exp; `grads_to_tokens`) or read the layout in place. The index between rows and tokens comes from the layout's own @triton.jit function (the one
definition the kernels use), evaluated once per (pattern, N, device) and cached: O(N) memory, one extra
copy of q, k, v and the output. The gather is a kernel of its own rather than `permutation.gather_rows`
because it copies only the pattern's heads and brings the log-sum-exp back in the same launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import triton

from .common import _d_pad, layout_kernel
from .fwd_kernels import _gather_rows, _layout_index
from .tables import rows

if TYPE_CHECKING:
    from .spec import PatternSpec

_BLOCK = 64  # rows per program of the index and gather kernels


_INDEX: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def layout_index(spec: PatternSpec, pat: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row -> token int32 [rows], -1 for padding; token -> row int32 [n]) of pattern `pat`'s token layout at
    n tokens. Cached."""
    key = (spec.key, pat, n, str(device))
    hit = _INDEX.get(key)
    if hit is None:
        np_ = rows(spec, pat, n)
        row_token = torch.empty(np_, dtype=torch.int32, device=device)
        token_row = torch.empty(n, dtype=torch.int32, device=device)
        _layout_index[(triton.cdiv(np_, _BLOCK),)](row_token, token_row, np_, n, LAYOUT=layout_kernel(spec, pat),
                                                   BLOCK=_BLOCK)
        if len(_INDEX) >= 64:
            _INDEX.pop(next(iter(_INDEX)))
        hit = _INDEX[key] = (row_token, token_row)
    return hit


def _gather(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, heads: torch.Tensor,
            lse: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """dst's rows (of `heads`) from src's rows at `index` (see `_gather_rows`); lse: (source, destination)."""
    B, _, n_dst, D = dst.shape
    extra: dict[str, Any] = {}
    if lse is not None:
        extra = dict(LSE_SRC=lse[0], LSE_DST=lse[1], H=dst.shape[1], SRC_ROWS=src.shape[2])
    _gather_rows[(triton.cdiv(n_dst, _BLOCK), B * heads.numel())](
        src, dst, index, heads, *src.stride()[:3], *dst.stride()[:3], n_dst, heads.numel(),
        HEAD_DIM=D, D_PAD=_d_pad(D), BLOCK=_BLOCK, num_warps=4, **extra,
    )


def to_rows(spec: PatternSpec, pat: int, heads: torch.Tensor, kv_heads: torch.Tensor, q: torch.Tensor,
            k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ([B, heads, N, D], any strides) as contiguous buffers in the layout's row order, filled for
    the query heads `heads` and the KV heads `kv_heads` (the others are not read)."""
    row_token, _ = layout_index(spec, pat, q.shape[2], q.device)
    out = []
    for t, hs in ((q, heads), (k, kv_heads), (v, kv_heads)):
        buf = t.new_empty((t.shape[0], t.shape[1], row_token.numel(), t.shape[3]))
        _gather(t, buf, row_token, hs)
        out.append(buf)
    return out[0], out[1], out[2]


def backward_rows(spec: PatternSpec, pat: int, heads: torch.Tensor, kv_heads: torch.Tensor, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                  dlse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the backward reads, in the layout's row order: q, k, v (`to_rows`), the output, dO, lse and dlse
    (None stays None). lse and dlse are contiguous float32 [B, H, N]; a padding row gets lse = dlse = -inf,
    zeros elsewhere, so its P is 0."""
    row_token, _ = layout_index(spec, pat, q.shape[2], q.device)
    qr, kr, vr = to_rows(spec, pat, heads, kv_heads, q, k, v)
    R = row_token.numel()
    lse_r = lse.new_empty((*lse.shape[:2], R))
    dlse_r = None if dlse is None else dlse.new_empty((*dlse.shape[:2], R))
    or_ = o.new_empty((*o.shape[:2], R, o.shape[3]))
    dor = do.new_empty((*do.shape[:2], R, do.shape[3]))
    _gather(o, or_, row_token, heads, (lse, lse_r))
    _gather(do, dor, row_token, heads, None if dlse is None or dlse_r is None else (dlse, dlse_r))
    return qr, kr, vr, or_, dor, lse_r, dlse_r


def grads_to_tokens(spec: PatternSpec, pat: int, heads: torch.Tensor, kv_heads: torch.Tensor,
                    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """dq (query heads `heads`), dk and dv (`kv_heads`) computed in row order into `grads`, token order."""
    _, token_row = layout_index(spec, pat, grads[0].shape[2], grads[0].device)
    for src, dst, hs in zip(rows, grads, (heads, kv_heads, kv_heads), strict=True):
        _gather(src, dst, token_row, hs)


def to_tokens(spec: PatternSpec, pat: int, heads: torch.Tensor, out_rows: torch.Tensor, lse_rows: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor) -> None:
    """The kernel's output and log-sum-exp in row order into `out` [B, H, N, D] and `lse` [B, H, N]
    (contiguous), token order, for the query heads `heads`."""
    _, token_row = layout_index(spec, pat, out.shape[2], out.device)
    _gather(out_rows, out, token_row, heads, (lse_rows, lse))
