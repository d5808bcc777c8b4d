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
query head h reads KV head h // (H / Hkv). Differentiable through autograd.

On a GPU (and in Triton's interpreter) the branch is the pattern `where(k * b + b - 1 <= q)` (without
`causal`: `where(k * b < N)`) run by the block-table attention kernels over the block summaries: summary
c stands at key index c, so that pattern's tables list exactly the summary tiles each query tile sees,
FULL below the diagonal and PARTIAL on it, and the forward and backward kernels are the patterns' own
(flash-style, O(N) memory, tensor cores, no [N, N / b] score matrix). The summaries are padded with zero
rows to whole key tiles (a listed tile never reads past them) and repeated per query head, so that dK/dV
runs one program per (summary tile, query head) instead of looping a KV head's whole group; their
gradients are summed over the group afterwards. On the CPU path: PyTorch operations, memory
O(chunk * N / b).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch

from .backward import _bwd_tiles, _delta_pass, _kv_groups, _launch_dkdv, _launch_dq
from .common import _d_pad, _dot_prec, _pow2, _tma_mode, _torch_path
from .forward import _forward
from .options import current_options, restored
from .selection import _pool_torch

if TYPE_CHECKING:
    from .spec import PatternSpec

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
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    spec = None if _torch_path(q) else _pattern(block, causal)
    if spec is not None:
        out, lse = _KernelPath.apply(q, km.to(q.dtype), vm.to(q.dtype), spec, scale)  # type: ignore[no-untyped-call]
        return out, lse
    km = km.repeat_interleave(H // hkv, 1)
    vm = vm.repeat_interleave(H // hkv, 1)
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


@functools.lru_cache(maxsize=16)
def _pattern(block: int, causal: bool) -> PatternSpec | None:
    """The pattern whose pairs (query i, summary c) are the branch's: c's block ends at or before i (causal),
    else c is a block of the sequence. Its predicate and block tables serve the attention kernels. None in a
    standalone module's runtime, which has no compiler: the PyTorch operations run there."""
    try:
        from ..compile import compile as compile_pattern  # (the compiler imports the runtime)
    except ImportError:
        return None

    rule = f"k * {block} + {block - 1} <= q" if causal else f"k * {block} < N"
    spec: PatternSpec = compile_pattern(f"pattern compressed = where({rule})\n").spec
    return spec


_ROWS = 256  # summaries are padded to a multiple of this: every kernel tile (at most 256 rows) lies inside


class _KernelPath(torch.autograd.Function):
    """The branch on the attention kernels: (out, lse) of q over the summaries km, vm [B, Hkv, nb, D]."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, km: torch.Tensor, vm: torch.Tensor, spec: PatternSpec,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, N, D = q.shape
        group, nb = H // km.shape[1], km.shape[2]
        pad = -(-max(nb, 1) // _ROWS) * _ROWS - nb
        kr, vr = (torch.nn.functional.pad(x, (0, 0, 0, pad)).repeat_interleave(group, 1) for x in (km, vm))
        q = q.contiguous()
        out, lse = _forward(spec, q, kr, vr, scale, 1, 0)
        ctx.save_for_backward(q, kr, vr, out, lse)
        ctx.spec, ctx.scale, ctx.group, ctx.nb = spec, scale, group, nb
        ctx.options = current_options()
        return out, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor | None,
                 dlse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, kr, vr, out, lse = ctx.saved_tensors
        do = torch.zeros_like(out) if do is None else do.contiguous()
        with restored(ctx.options):
            dq, dk, dv = _backward(ctx.spec, q, kr, vr, out, lse, do, dlse, ctx.scale)
        B, H, rows, D = dk.shape
        dkm, dvm = (x.view(B, H // ctx.group, ctx.group, rows, D).sum(2)[:, :, :ctx.nb].to(q.dtype) for x in (dk, dv))
        return dq, dkm, dvm, None, None


def _backward(spec: PatternSpec, q: torch.Tensor, kr: torch.Tensor, vr: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with dk, dv float32 per query head [B, H, padded summaries, D]: the patterns' dQ and
    dK/dV kernels with their tiles (configured, or tuned on a GPU as the patterns' are), dK/dV over the
    key tiles that hold summaries only: those of N's tables (N of them at most) within the padding."""
    B, H, N, D = q.shape
    d_pad = _d_pad(D)
    prec = _dot_prec(q)
    delta, lse2, pre = _delta_pass(out, do, lse, None if dlse is None else dlse.float().contiguous(), d_pad)
    tma = _tma_mode((q, kr, vr, do), d_pad, 1 if current_options().bwd_tma else 0)
    heads, qh_off, qh_idx = _kv_groups(0, 0, H, 1, q.device)  # one program per (key tile, query head)
    dq = torch.empty_like(q)
    dk, dv = (torch.empty(tuple(kr.shape), dtype=torch.float32, device=q.device) for _ in range(2))
    dq_args = (0, N, N, False, False, tma, heads, q, kr, vr, do, lse2, delta, 1, scale, prec, d_pad, pre)
    dkdv_args = (0, min(N, kr.shape[2]), N, False, False, tma, heads, qh_off, qh_idx, (1,) * H, q, kr, vr, do, lse2, delta, scale, False,
                 prec, d_pad)
    dkdv_tile, dq_tile = _bwd_tiles(
        spec, ("bwd", d_pad, q.dtype, tma, q.device.index, _pow2(N), kr.shape[2]), q.element_size(),
        lambda t: _launch_dq(spec, t, *dq_args, torch.empty_like(dq)),
        lambda t: _launch_dkdv(spec, t, *dkdv_args, torch.empty_like(dk), torch.empty_like(dv)),
    )
    _launch_dq(spec, dq_tile, *dq_args, dq)
    _launch_dkdv(spec, dkdv_tile, *dkdv_args, dk, dv)
    return dq, dk, dv
