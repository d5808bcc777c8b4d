"""NSA's compressed branch: attention from every query to block summaries of the keys and values.

Native Sparse Attention mixes three branches per query (compressed, selected, window) with learned gates.
The selected and window branches are patterns (`topk(..., score=compressed, share=kv)`, `window(...)`);
the compressed one attends to other keys altogether, one pooled key and value per block of `b` tokens, so
it is not a mask over the sequence but a short attention of its own. Its output and log-sum-exp come back
so that the caller can gate it against the others.

Meaning: block c's summary is the mean of k (and of v) over tokens c*b .. min(N, (c+1)*b) - 1, or the
caller's pooled tensors (a learned compression); under `causal` query i sees summary c iff the whole block
lies at or before it, (c + 1) * b - 1 <= i, so nothing from i's future leaks through a summary. A query
that sees no block (the first b - 1 under `causal`) gets zeros and lse -inf. Grouped-query attention:
query head h reads KV head h // (H / Hkv). Differentiable through autograd (PyTorch operations; memory
O(chunk * N / b), never N^2).
"""

from __future__ import annotations

import math

import torch

from .selection import _pool_torch

__all__ = ["compressed_attention"]


def compressed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *, causal: bool = True,
                         pooled: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
                         chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D] in q's dtype, lse [B, H, N] float32) of q [B, H, N, D] attending to the block
    summaries of k, v [B, Hkv, N, D]: their block means, or `pooled` = (k_pooled, v_pooled), each
    [B, Hkv, ceil(N / block), D]. `scale` defaults to 1 / sqrt(D); queries go `chunk` at a time."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D] and k, v alike [B, Hkv, N, D], got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    B, H, N, D = q.shape
    hkv = k.shape[1]
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D or H % hkv:
        raise ValueError(f"k and v must be [{B}, Hkv, {N}, {D}] with Hkv dividing {H}, got {list(k.shape)}")
    nb = -(-N // block)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if pooled is None:
        km, vm = _pool_torch(k, block, work), _pool_torch(v, block, work)  # the selectors' block means
    else:
        km, vm = (x.to(work) for x in pooled)
        if km.shape != (B, hkv, nb, D) or vm.shape != (B, hkv, nb, D):
            raise ValueError(f"pooled keys and values must be [{B}, {hkv}, {nb}, {D}] each, got "
                             f"{list(km.shape)} and {list(vm.shape)}")
    km = km.repeat_interleave(H // hkv, 1)
    vm = vm.repeat_interleave(H // hkv, 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    last = (torch.arange(nb, device=q.device) + 1) * block - 1  # each block's last token
    outs, lses = [], []
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        s = torch.matmul(q[:, :, r0:r1].to(work), km.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(last[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # a row of -inf: p = 0
        outs.append(torch.matmul(p, vm))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2).float()
