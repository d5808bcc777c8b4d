"""The backward pass: gradients over the same block tables as the forward.

dS = P * (dP - delta) with delta = rowsum(dO * O) (- dlse when the log-sum-exp has a gradient too);
dQ = scale * dS K per query block over FULL then PARTIAL key blocks; dK = scale * dS^T Q and dV = P^T dO
per key block over the transposed tables (query blocks per key block), summed inside the program over
the query heads that share the key/value head (GQA/MQA): no atomics, no [B, H, N, D] float32 buffers. A key
block far heavier than the rest is the exception: its pieces run in several programs that add into float32
workspace rows (`_static_split`, `_dynamic_split`), at most an eighth of [B, kv heads, N, D] (automatic).
A row with no allowed key has lse = -inf; the preprocessing stores +inf there, so P = exp2(S - inf) = 0.
Backward tiles per head_dim: (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps1, stages1, warps2, stages2):
dK/dV use BLOCK_N1 keys x BLOCK_M1 queries, dQ BLOCK_M2 queries x BLOCK_N2 keys.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import bwd_kernels, layout_order, plans, tables
from .bwd_kernels import _attn_bwd_dkdv, _attn_bwd_dkdv_merge, _attn_bwd_dq, _attn_bwd_pre
from .common import (
    _INTERPRET,
    _LOG2E,
    _by_width,
    _d_pad,
    _descriptor,
    _docs,
    _dot_prec,
    _head_patterns,
    _heads,
    _heads_of,
    _layout4,
    _on_device_of,
    _pow2,
    _tma_mode,
    _torch_path,
    layout_kernel,
    pred_kernel,
)
from .cpu import _attention_cpu_bwd
from .options import current_options
from .selection import _dynamic_tables, _tiles, sel_kernel
from .tables import HEAVY, block_tables, block_tables_t, heavy_first
from .tuning import _tuned
from .varlen import varlen_tables

if TYPE_CHECKING:
    from .spec import PatternSpec


def _full_bwd_tiles(cfg: Iterable[int]) -> tuple[int, ...]:
    """A backward config of six (one warps/stages pair for both kernels) or eight integers, as eight."""
    cfg = tuple(int(x) for x in cfg)
    if len(cfg) == 6:
        return (*cfg[:6], cfg[4], cfg[5])
    return cfg


_KV_GROUPS: dict[tuple[Any, ...], Any] = {}  # _kv_groups' triples and _qh_rank's ranks


def _kv_groups(pat: int, patterns: int | tuple[int, ...], H: int, group: int,
               device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(kv heads with a query head using predicate `pat`, CSR offsets, those query heads), int32."""
    key = (pat, patterns, H, group, str(device))
    hit: tuple[torch.Tensor, ...] | None = _KV_GROUPS.get(key)
    if hit is None:
        kv, off, idx = [], [0], []
        for g in range(H // group):
            hs = [h for h in _heads_of(patterns, pat, H) if h // group == g]
            if hs:
                kv.append(g)
                idx.extend(hs)
                off.append(len(idx))
        hit = _KV_GROUPS[key] = tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (kv, off, idx))
    return hit


def _bwd_config(spec: PatternSpec, D: int, itemsize: int = 2, tma: int = 0) -> tuple[int, ...]:
    """Backward tiles for a padded head_dim: the `bwd_tiles` option, else the TMA path's or the pointer loads'."""
    fixed = current_options().bwd_tiles
    if fixed is not None:
        return _full_bwd_tiles(fixed)
    return _by_width(spec.bwd_tma_configs if tma else spec.bwd_configs, D, itemsize)


def _bwd_tiles(spec: PatternSpec, fields: tuple[Any, ...], itemsize: int, run_dq: Callable[[tuple[int, ...]], object],
               run_dkdv: Callable[[tuple[int, ...]], object]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dK/dV tile, dQ tile), each (BLOCK_M, BLOCK_N, warps, stages): the configured tiles, or on a CUDA GPU
    the fastest of the tuning rows' dK/dV halves and, on its own, of their dQ halves (the two kernels
    share nothing, so 3 + 3 timings choose among 9 combinations). `run_*` launch into scratch outputs."""
    _, d_pad, _, tma, device, _, _ = fields
    cfg = _bwd_config(spec, d_pad, itemsize, tma)
    dkdv, dq = (cfg[0], cfg[1], cfg[4], cfg[5]), (cfg[2], cfg[3], cfg[6], cfg[7])
    opts = current_options()
    if (opts.bwd_tiles is not None or _INTERPRET or device is None or not spec.bwd_autotune or not opts.autotune
            or os.environ.get("PATTERNDSL_AUTOTUNE") == "0"):
        return dkdv, dq
    def halves(first: tuple[int, ...], parts: tuple[int, ...]) -> Callable[[], list[tuple[int, ...]]]:
        # the default first, then the tune rows' halves, each once
        return lambda: list(dict.fromkeys([first, *(tuple(c[i] for i in parts)
                                                     for c in _by_width(spec.bwd_tune_configs, d_pad, itemsize))]))

    return (_tuned(spec, ("bwd-dkdv", *fields[1:]), halves(dkdv, (0, 1, 4, 5)), run_dkdv, dkdv),
            _tuned(spec, ("bwd-dq", *fields[1:]), halves(dq, (2, 3, 6, 7)), run_dq, dq))


def _delta_pass(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                d_pad: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(delta, lse2, the dQ kernel's extra arguments): with BWD_FUSE_PRE the dQ kernel fills delta and lse2
    for the dK/dV kernel after it; otherwise `_attn_bwd_pre` does, here. o, do: [B, H, N, D]; lse: [B, H, N]."""
    B, H, N = lse.shape
    delta = torch.empty((B, H, N), dtype=torch.float32, device=lse.device)
    lse2 = torch.empty((B, H, N), dtype=torch.float32, device=lse.device)
    if current_options().bwd_fuse_pre:
        return delta, lse2, dict(O=o, LSE=lse, DLSE=lse if dlse is None else dlse, s_ob=o.stride(0),
                                 s_oh=o.stride(1), s_on=o.stride(2), PRE=True, HAS_DLSE=dlse is not None)
    _attn_bwd_pre[(-(-N // 64), B * H)](
        o, do, lse, lse if dlse is None else dlse, delta, lse2,
        *o.stride()[:3], *do.stride()[:3], N, H,
        BLOCK_M=64, HEAD_DIM=o.shape[-1], D_PAD=d_pad, HAS_DLSE=dlse is not None,
    )
    return delta, lse2, {}


def _launch_dq(spec: PatternSpec, tile: tuple[int, ...], pat: int, rows: int, n: int, layout: bool, gathered: bool,
               tma: int, heads: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
               lse2: torch.Tensor, delta: torch.Tensor, group: int, scale: float, prec: str, d_pad: int,
               pre: dict[str, Any], dq: torch.Tensor) -> None:
    """The dQ kernel of pattern `pat` over n tokens: q.shape[2] == n, or with `gathered` the `rows` of its
    token layout's order (`layout_order.backward_rows`)."""
    key = ("dq", spec.key, pat, tile, rows, n, layout, gathered, tma, heads.numel(), group, scale, q.shape, k.shape,
           q.stride(), k.stride(), v.stride(), do.stride(), dq.stride(), q.dtype, q.device,
           tuple(x for x in pre.items() if not isinstance(x[1], torch.Tensor)))
    launch = plans.cached(key, lambda: _dq_plan(spec, tile, pat, rows, n, layout, gathered, tma, heads, q, k, v, do,
                                                lse2, delta, group, scale, prec, d_pad, pre, dq))
    kd = vd = None
    if tma:  # dQ walks K/V tiles of BLOCK_N rows
        kd, vd = _descriptor(k, tile[1], d_pad), _descriptor(v, tile[1], d_pad)
    launch(_attn_bwd_dq, (q, k, v, do, dq, lse2, delta, heads, kd, vd, pre.get("O"), pre.get("LSE"), pre.get("DLSE")))


def _dq_plan(spec: PatternSpec, tile: tuple[int, ...], pat: int, rows: int, N: int, layout: bool, gathered: bool,
             tma: int, heads: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
             lse2: torch.Tensor, delta: torch.Tensor, group: int, scale: float, prec: str, d_pad: int,
             pre: dict[str, Any], dq: torch.Tensor) -> plans.Plan:
    B, H, _, D = q.shape
    bm, bn, warps, stages = tile
    f_off, f_idx, p_off, p_idx = block_tables(spec, N, bm, bn, q.device, pat)
    return plans.make(bwd_kernels._attn_bwd_dq, (-(-rows // bm), B * heads.numel()), (
        q, k, v, do, dq, lse2, delta, heads, f_off, f_idx, p_off, p_idx,
        *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3],
        N, H, heads.numel(), group, scale * _LOG2E, scale,
    ), dict(
        PRED=pred_kernel(spec, pat), BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
        IDX64=spec.idx64, INTERPRET=_INTERPRET, NP=rows, LAYOUT=layout_kernel(spec, pat) if layout else None,
        TMA=tma, ORDER=heavy_first(spec, N, bm, bn, q.device, pat), GATHERED=gathered,
        num_warps=warps, num_stages=stages, **pre,
    ), (*range(8), "k_desc", "v_desc", "O", "LSE", "DLSE"))


def _launch_dkdv(spec: PatternSpec, tile: tuple[int, ...], pat: int, rows: int, n: int, layout: bool, gathered: bool,
                 tma: int, kv_ids: torch.Tensor, qh_off: torch.Tensor, qh_idx: torch.Tensor, sizes: tuple[int, ...],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse2: torch.Tensor,
                 delta: torch.Tensor, scale: float, accum: bool, prec: str, d_pad: int, dk: torch.Tensor,
                 dv: torch.Tensor) -> None:
    """The dK/dV kernel of pattern `pat` (then the merge of its split rows), n and `gathered` as `_launch_dq`."""
    key = ("dkdv", spec.key, pat, tile, rows, n, layout, gathered, tma, kv_ids.numel(), sizes, scale, accum, q.shape,
           k.shape, q.stride(), k.stride(), v.stride(), do.stride(), dk.stride(), dv.stride(), q.dtype, q.device,
           current_options().bwd_split)
    launch, extra = plans.cached(key, lambda: _dkdv_plan(spec, tile, pat, rows, n, layout, gathered, tma, kv_ids,
                                                         qh_off, qh_idx, sizes, q, k, v, do, lse2, delta, scale, accum,
                                                         prec, d_pad, dk, dv))
    qd = dod = None
    if tma:  # dK/dV walks Q/dO tiles of BLOCK_M rows
        qd, dod = _descriptor(q, tile[0], d_pad), _descriptor(do, tile[0], d_pad)
    if extra:  # a workspace of the split rows' dK, dV per call
        ws = torch.zeros((2, extra["NSLOT"], tile[1], d_pad), dtype=torch.float32, device=q.device)
        extra = {**extra, "WS_K": ws[0], "WS_V": ws[1]}
    launch(_attn_bwd_dkdv, (q, k, v, do, dk, dv, lse2, delta, kv_ids, qh_off, qh_idx, qd, dod, *((extra["WS_K"], extra["WS_V"]) if extra else ())))
    _merge_split(extra, kv_ids, dk, dv, n, scale, tile[1], q.shape[3], d_pad, accum,
                 layout_kernel(spec, pat) if layout else None, gathered)


def _dkdv_plan(spec: PatternSpec, tile: tuple[int, ...], pat: int, rows: int, N: int, layout: bool, gathered: bool,
               tma: int, kv_ids: torch.Tensor, qh_off: torch.Tensor, qh_idx: torch.Tensor, sizes: tuple[int, ...],
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse2: torch.Tensor,
               delta: torch.Tensor, scale: float, accum: bool, prec: str, d_pad: int, dk: torch.Tensor,
               dv: torch.Tensor) -> tuple[plans.Plan, dict[str, Any]]:
    """(the dK/dV kernel's plan, its split's arguments (their workspace is each call's), or {})."""
    B, H, _, D = q.shape
    bm, bn, warps, stages = tile
    f_off, f_idx, p_off, p_idx = block_tables_t(spec, N, bm, bn, q.device, pat)
    nkt = -(-rows // bn)
    split = _static_split(spec, pat, N, bm, bn, nkt, q.device, B, sizes)
    lay = layout_kernel(spec, pat) if layout else None
    extra, grid = _split_args(split, nkt, bn, d_pad, q.device, B * kv_ids.numel())
    launch = plans.make(bwd_kernels._attn_bwd_dkdv, grid, (
        q, k, v, do, dk, dv, lse2, delta, kv_ids, qh_off, qh_idx, f_off, f_idx, p_off, p_idx,
        *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3],
        N, H, kv_ids.numel(), scale * _LOG2E, scale,
    ), dict(
        PRED=pred_kernel(spec, pat), BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
        IDX64=spec.idx64, ACCUM=accum, INTERPRET=_INTERPRET, NP=rows,
        LAYOUT=lay, TMA=tma, GATHERED=gathered,
        num_warps=warps, num_stages=stages, **extra,
    ), (*range(11), "q_desc", "do_desc", *(("WS_K", "WS_V") if extra else ())))
    return launch, extra


@_on_device_of
def _backward(spec: PatternSpec, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, scale: float,
              layer: int, picks: dict[int, torch.Tensor] | None = None,
              grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_lse at (q, k, v) for output gradient `do` (and `dlse`, or None).
    `picks`: the blocks each dynamic pattern selected in the forward pass (`_selection`), reused here.
    `grads`: (dq, dk, dv) to write into (contiguous, the inputs' shapes and dtypes), else new tensors."""
    patterns = _head_patterns(spec, None if layer < 0 else layer)
    B, H, N, D = q.shape
    group = H // k.shape[1]
    if _torch_path(q):
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        delta = (do.to(work) * o.to(work)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(work)
        got = _attention_cpu_bwd(spec, do, q, k, v, lse, delta, scale, group, patterns, picks)
        if grads is None:
            return got
        for dst, src in zip(grads, got, strict=True):
            dst.copy_(src)
        return grads
    q, k, v, o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, o, do))
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    d_pad = _d_pad(D)
    prec = _dot_prec(q)
    delta, lse2, pre = _delta_pass(o, do, lse, dlse, d_pad)
    accum = not isinstance(patterns, int) and len(set(patterns)) > 1
    if grads is None:
        alloc = torch.zeros if accum else torch.empty
        dq = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)
        dk = alloc(tuple(k.shape), dtype=k.dtype, device=k.device)
        dv = alloc(tuple(v.shape), dtype=v.dtype, device=v.device)
    else:
        dq, dk, dv = grads
        if accum:
            dk.zero_()
            dv.zero_()
    for pat in range(spec.patterns):
        heads = _heads(pat, patterns, H, q.device)
        nh = heads.numel()
        if nh == 0:
            continue
        if spec.selectors[pat] is not None:
            _dynamic_backward(spec, pat, picks[pat], q, k, v, do, dq, dk, dv, lse2, delta, heads, patterns, group, scale,  # type: ignore[index]
                              accum, prec, d_pad, _bwd_config(spec, d_pad, q.element_size()), pre)
            continue
        if spec.layouts[pat] is not None and not accum and current_options().layout_gather is True:
            _gathered_backward(spec, pat, q, k, v, o, do, lse, dlse, heads, patterns, group, scale, prec, d_pad,
                               (dq, dk, dv))
        else:
            _static_backward(spec, pat, q, k, v, do, lse2, delta, pre, (dq, dk, dv), heads, patterns, group, scale,
                             accum, prec, d_pad)
    return dq, dk, dv


def _gathered_backward(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                       heads: torch.Tensor, patterns: int | tuple[int, ...], group: int, scale: float, prec: str,
                       d_pad: int, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Gradients of pattern `pat`, which has a token layout and alone writes its heads' dK/dV, into `grads`
    (`layout_gather=True`): on buffers gathered into the layout's row order (`layout_order`), where the
    kernels take TMA tiles and map rows to tokens only for the predicate, the gradients gathered back
    after. Reading the layout in place is the default: the gathered way's eight passes over [B, H, N, D]
    tensors cost more than its TMA tiles save (docs/decisions.md)."""
    kv_heads = _kv_groups(pat, patterns, q.shape[1], group, q.device)[0]
    qr, kr, vr, or_, dor, lse_r, dlse_r = layout_order.backward_rows(spec, pat, heads, kv_heads, q, k, v, o, do, lse,
                                                                     dlse)
    delta_r, lse2_r, pre_r = _delta_pass(or_, dor, lse_r, dlse_r, d_pad)
    rows = (torch.empty_like(qr), torch.empty_like(kr), torch.empty_like(vr))
    _static_backward(spec, pat, qr, kr, vr, dor, lse2_r, delta_r, pre_r, rows, heads, patterns, group, scale, False,
                     prec, d_pad, tokens=q.shape[2])
    layout_order.grads_to_tokens(spec, pat, heads, kv_heads, rows, grads)


def _static_backward(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     do: torch.Tensor, lse2: torch.Tensor, delta: torch.Tensor, pre: dict[str, Any],
                     grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], heads: torch.Tensor,
                     patterns: int | tuple[int, ...], group: int, scale: float, accum: bool, prec: str, d_pad: int,
                     tokens: int | None = None) -> None:
    """dQ and dK/dV of static pattern `pat` over its block tables, with tuned tiles, into `grads`. The buffers
    are in token order (a token layout read in place through its function), or with `tokens` they hold the
    layout's rows for that many tokens (`layout_order.backward_rows`)."""
    dq, dk, dv = grads
    B, H, N, D = q.shape
    gathered = tokens is not None
    n = N if tokens is None else tokens
    rows, layout = tables.rows(spec, pat, n), spec.layouts[pat] is not None  # physical rows of its token layout
    tma = 0 if layout and not gathered else _tma_mode((q, k, v, do), d_pad, 1 if current_options().bwd_tma else 0)
    kv_ids, qh_off, qh_idx = _kv_groups(pat, patterns, H, group, q.device)
    dq_args = (pat, rows, n, layout, gathered, tma, heads, q, k, v, do, lse2, delta, group, scale, prec, d_pad, pre)
    sizes = _group_sizes(pat, patterns, H, group)
    dkdv_args = (pat, rows, n, layout, gathered, tma, kv_ids, qh_off, qh_idx, sizes, q, k, v, do, lse2, delta, scale,
                 accum, prec, d_pad)
    dkdv_tile, dq_tile = _bwd_tiles(
        spec, ("bwd", d_pad, q.dtype, tma, q.device.index, _pow2(n), (pat, patterns, *(("gathered",) if gathered else ()))),
        q.element_size(),
        lambda t, a=dq_args: _launch_dq(spec, t, *a, torch.empty_like(dq)),  # type: ignore[misc, call-arg]
        lambda t, a=dkdv_args: _launch_dkdv(spec, t, *a, torch.empty_like(dk), torch.empty_like(dv)),  # type: ignore[misc, call-arg]
    )
    _launch_dq(spec, dq_tile, *dq_args, dq)
    _launch_dkdv(spec, dkdv_tile, *dkdv_args, dk, dv)


def _dynamic_backward(spec: PatternSpec, pat: int, picked: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                      dv: torch.Tensor, lse2: torch.Tensor, delta: torch.Tensor, heads: torch.Tensor, patterns: int | tuple[int, ...], group: int, scale: float,
                      accum: bool, prec: str, d_pad: int, cfg: tuple[int, ...], pre: dict[str, Any]) -> None:
    """dQ and dK/dV of a dynamic pattern's heads over the per-(batch, head) tables of its forward picks."""
    B, H, N, D = q.shape
    bm1, bn1, bm2, bn2, w1, s1, w2, s2 = cfg
    nh = heads.numel()
    bm2, bn2 = _tiles(spec, pat, bm2, bn2)
    sel_pred, sel_vars = sel_kernel(spec, pat)
    f_off, f_idx, p_off, p_idx = _dynamic_tables(spec, pat, picked, B, nh, N, bm2, bn2, q.device)
    _attn_bwd_dq[(-(-N // bm2), B * nh)](
        q, k, v, do, dq, lse2, delta, heads, f_off, f_idx, p_off, p_idx,
        *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3],
        N, H, nh, group, scale * _LOG2E, scale,
        PRED=pred_kernel(spec, pat), BLOCK_M=bm2, BLOCK_N=bn2, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
        IDX64=spec.idx64, INTERPRET=_INTERPRET, SEL_PRED=sel_pred, SEL_VARS=sel_vars, num_warps=w2 if bm2 >= 64 else min(w2, 4),
        num_stages=s2, **pre,
    )
    bm1, bn1 = _tiles(spec, pat, bm1, bn1)
    nqt, nkt = -(-N // bm1), -(-N // bn1)
    tables = _transpose_dynamic(_dynamic_tables(spec, pat, picked, B, nh, N, bm1, bn1, q.device), B * nh, nqt, nkt,
                                16777215 if sel_vars else 1073741823)
    kv_ids, qh_off, qh_idx = _kv_groups(pat, patterns, H, group, q.device)
    qh_rank = _qh_rank(pat, patterns, H, group, q.device)
    split = _dynamic_split(tables, B, nh, nqt, nkt, qh_rank, _group_sizes(pat, patterns, H, group),
                           _kv_slot_of(pat, patterns, H, group, q.device))
    extra, grid = _split_args(split, nkt, bn1, d_pad, q.device, B * kv_ids.numel())
    _attn_bwd_dkdv[grid](
        q, k, v, do, dk, dv, lse2, delta, kv_ids, qh_off, qh_idx, *tables,
        *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3],
        N, H, kv_ids.numel(), scale * _LOG2E, scale,
        PRED=pred_kernel(spec, pat), BLOCK_M=bm1, BLOCK_N=bn1, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
        IDX64=spec.idx64, ACCUM=accum, INTERPRET=_INTERPRET, QH_RANK=qh_rank, NH_SEL=nh,
        SEL_PRED=sel_pred, SEL_VARS=sel_vars,
        num_warps=w1, num_stages=s1, **extra,
    )
    _merge_split(extra, kv_ids, dk, dv, N, scale, bn1, D, d_pad, accum)


# --- dK/dV rows split into pieces: a key block read by every query block (a sink's, a global token's, a
# block every query selects), times the group's query heads, would run in one program long after the rest;
# its pieces run in several programs, started first, adding into float32 workspace rows that
# `_attn_bwd_dkdv_merge` writes out. Other rows run whole and write dK/dV themselves, as without splitting.

_SPLIT_MIN = 32  # tile iterations: a lighter piece is not worth its workspace round trip
_SPLIT_CAP = 64  # programs per key block at most: a heavier row takes longer pieces
_SPLIT_ROWS = 8  # at most one row in 8 split (automatic): the rest wait for at most 8 times the mean row


class Split(NamedTuple):
    """How a dK/dV launch splits its heavy rows."""

    slots: torch.Tensor  # per (batch, kv slot, key block) row its workspace row, -1: run whole (int32)
    rows: torch.Tensor  # per workspace row its row (the inverse of slots), -1: no row took it (int32)
    chunk: int  # tile iterations per piece
    chunks: int  # programs per key block


def _split_chunk(mean: float, top: int) -> int:
    """Tile iterations per piece of a split row (0: no row is split), for rows of `mean` work on average and
    at most `top`: the `bwd_split` option, else HEAVY times the mean (at least _SPLIT_MIN), where a row may
    hold more than that: such a row alone would end the launch long after the others."""
    fixed = current_options().bwd_split
    chunk = max(0, fixed) if fixed is not None else max(_SPLIT_MIN, math.ceil(HEAVY * mean))
    return chunk if top > chunk else 0


def _slot_cap(rows: int) -> int:
    """How many of `rows` dK/dV rows may be split: all where `bwd_split` asks, else one in _SPLIT_ROWS. Were
    more rows heavy, the others (run whole) hold at most _SPLIT_ROWS times the mean work (the heaviest
    rows are split first), and the workspace stays an eighth of a float32 dK/dV at most (automatic)."""
    return rows if current_options().bwd_split is not None else max(1, rows // _SPLIT_ROWS)


def _slots(work: torch.Tensor, chunk: int, cap: int) -> torch.Tensor:
    """Each row's workspace slot (rows: `work` flattened, (batch, kv slot, key block)) where it holds more
    than `chunk` tile iterations and is among the `cap` heaviest: its rank by work, heaviest first (so the
    slots run 0 .. split rows - 1); -1 for the others (they run whole). int32."""
    flat = work.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    return torch.where((flat > chunk) & (rank < cap), rank, -1).to(torch.int32)


def _slot_rows(slots: torch.Tensor, used: int) -> torch.Tensor:
    """The inverse of `_slots`: per workspace slot 0 .. used - 1 (used >= 1) its row, -1 where no row took
    it (int32), built on the slots' device without reading it."""
    out = torch.full((used + 1,), -1, dtype=torch.int32, device=slots.device)
    rows = torch.arange(slots.numel(), dtype=torch.int32, device=slots.device)
    out.scatter_(0, torch.where(slots >= 0, slots, out.numel() - 1).long(), rows)  # unsplit rows: the spare entry
    return out[:-1]


@functools.cache
def _group_sizes(pat: int, patterns: int | tuple[int, ...], H: int, group: int) -> tuple[int, ...]:
    """Query heads using `pat` per kv slot of `_kv_groups` (the kv heads with at least one); cached, as
    every backward call asks."""
    per = [0] * (H // group)
    for h in _heads_of(patterns, pat, H):
        per[h // group] += 1
    return tuple(c for c in per if c)


_SPLITS: dict[tuple[Any, ...], Split | None] = {}


def _static_split(spec: PatternSpec, pat: int, n: int, bm: int, bn: int, nkt: int, device: torch.device, B: int,
                  sizes: tuple[int, ...]) -> Split | None:
    """The split of a static pattern's dK/dV rows, the first `nkt` key blocks' (None: none is split). Its
    tables give every key block's query blocks on the host (read once; cached): a row's work is those times
    the kv slot's query heads (`sizes`)."""
    key = (spec.key, pat, n, bm, bn, nkt, str(device), B, sizes, current_options().bwd_split)
    if key in _SPLITS:
        return _SPLITS[key]
    f_off, _, p_off, _ = block_tables_t(spec, n, bm, bn, device, pat)
    count = (torch.diff(f_off.long()) + torch.diff(p_off.long())).cpu()[:nkt]
    work = torch.tensor(sizes, dtype=torch.int64)[:, None] * count[None, :]  # [kv slots, key blocks]
    top = int(work.max())
    chunk = _split_chunk(float(work.float().mean()), top)
    hit = None
    if chunk:
        slots = _slots(work.expand(B, -1, -1), chunk, _slot_cap(B * work.numel()))
        hit = Split(slots.to(device), _slot_rows(slots, int((slots >= 0).sum())).to(device), chunk,
                    min(_SPLIT_CAP, -(-top // chunk)))
    if len(_SPLITS) >= 64:
        _SPLITS.pop(next(iter(_SPLITS)))
    _SPLITS[key] = hit
    return hit


def _dynamic_split(tables: Sequence[torch.Tensor], B: int, nh: int, nqt: int, nkt: int, qh_rank: torch.Tensor,
                   sizes: tuple[int, ...], kv_of: torch.Tensor) -> Split | None:
    """The split of a dynamic pattern's dK/dV rows, without reading the device: the tables' sizes bound
    the mean work (their index arrays hold at most every entry) and a row lists each query block at most
    once per head; the rows to split are numbered on the device. Workspace rows: no more than the entries
    allow, (entries) / (chunk + 1), nor than `_slot_cap`."""
    f_off, f_idx, p_off, p_idx = tables
    nkv = len(sizes)
    rows = B * nkv * nkt
    top = max(sizes, default=0) * nqt
    chunk = _split_chunk(max(f_idx.numel(), p_idx.numel()) / max(1, rows), top)
    cap = min(_slot_cap(rows), (f_idx.numel() + p_idx.numel()) // (chunk + 1))  # heavy rows: at most that
    if not chunk or not cap:  # (no entries for a heavy row: nothing to split, no workspace nor merge)
        return None
    per = B * nh * nkt
    count = (f_off[1:per + 1] - f_off[:per] + p_off[1:per + 1] - p_off[:per]).view(B, nh, nkt)
    work = torch.zeros((B, nkv, nkt), dtype=torch.int32, device=count.device)
    work.index_add_(1, kv_of, count[:, qh_rank.long()])  # summed over each kv slot's query heads
    slots = _slots(work, chunk, cap)
    return Split(slots, _slot_rows(slots, cap), chunk, min(_SPLIT_CAP, -(-top // chunk)))


def _split_args(split: Split | None, nkt: int, bn: int, d_pad: int, device: torch.device,
                rows: int) -> tuple[dict[str, Any], tuple[int, ...]]:
    """(`_attn_bwd_dkdv`'s split arguments, its grid) for `rows` (batch * kv slots) of nkt key blocks: without
    a split none and a program per (key block, row); with one a single axis, the split rows' pieces, then a
    program per row (the split ones exit), so no program is launched for pieces no row has."""
    if split is None:
        return {}, (nkt, rows)
    slots = split.rows.numel()
    ws = torch.zeros((2, slots, bn, d_pad), dtype=torch.float32, device=device)  # dK's, dV's
    return (dict(SPLIT=True, SLOTS=split.slots, SLOT_ROWS=split.rows, NSLOT=slots, WS_K=ws[0], WS_V=ws[1], NKT=nkt,
                 CHUNK=split.chunk, CHUNKS=split.chunks), (slots * split.chunks + nkt * rows,))


def _merge_split(extra: dict[str, Any], kv_ids: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, n: int,
                 scale: float, bn: int, d: int, d_pad: int, accum: bool, layout: Any = None,
                 gathered: bool = False) -> None:
    """Write the split rows' dK/dV from their workspace rows (nothing without a split)."""
    if not extra:
        return
    _attn_bwd_dkdv_merge[(extra["NSLOT"],)](
        dk, dv, extra["WS_K"], extra["WS_V"], extra["SLOT_ROWS"], kv_ids, *dk.stride()[:3], *dv.stride()[:3],
        n, kv_ids.numel(), extra["NKT"], scale, BLOCK_N=bn, HEAD_DIM=d, D_PAD=d_pad, ACCUM=accum, LAYOUT=layout,
        GATHERED=gathered,
    )


def _qh_rank(pat: int, patterns: int | tuple[int, ...], H: int, group: int, device: torch.device | str) -> torch.Tensor:
    """Per entry of `_kv_groups`' query heads, the head's rank among the heads running `pat` (cached)."""
    key = ("rank", pat, patterns, H, group, str(device))
    hit: torch.Tensor | None = _KV_GROUPS.get(key)
    if hit is None:
        heads = _heads_of(patterns, pat, H)
        ranks = [r for g in range(H // group) for r, h in enumerate(heads) if h // group == g]
        hit = _KV_GROUPS[key] = torch.tensor(ranks, dtype=torch.int32, device=device)
    return hit


def _kv_slot_of(pat: int, patterns: int | tuple[int, ...], H: int, group: int,
                device: torch.device | str) -> torch.Tensor:
    """Per entry of `_kv_groups`' query heads, its kv slot (int64, cached: no copy from the host per call)."""
    key = ("slot", pat, patterns, H, group, str(device))
    hit: torch.Tensor | None = _KV_GROUPS.get(key)
    if hit is None:
        sizes = _group_sizes(pat, patterns, H, group)
        hit = _KV_GROUPS[key] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
    return hit


def _transpose_dynamic(tables: Sequence[torch.Tensor], rows_bh: int, nqt: int, nkt: int,
                       low: int = 1073741823) -> tuple[torch.Tensor, ...]:
    """Per-(batch, head) tables by query tile -> by key tile (entries: query tiles, the flag bits above
    `low`, the tile's mask, kept), without a
    host round trip: the index arrays may run past their offsets' last entry (`_dynamic_tables` sizes them
    by a bound); those entries go to a bucket past the last row. Within a row, ascending query tile."""
    out: list[torch.Tensor] = []
    rows = rows_bh * nkt
    for off, idx in zip(*[iter(tables)] * 2, strict=True):
        dev = idx.device
        off = off.long()
        t = torch.arange(idx.numel(), device=dev)
        r = torch.searchsorted(off, t, right=True) - 1  # the query row of entry t
        e = idx.long()
        flag = e & (0x7FFFFFFF ^ low)
        to = torch.where(t < off[-1], r // nqt * nkt + (e - flag), rows)
        order = torch.argsort(to * (2 * 1073741824) + r % nqt + flag)
        o = torch.zeros(rows + 2, dtype=torch.int64, device=dev)  # counts at row + 1; the bucket last
        o.index_add_(0, to + 1, torch.ones_like(to))
        out += [torch.cumsum(o[:-1], 0).to(torch.int32), (r % nqt + flag)[order].to(torch.int32)]
    return tuple(out)


def _kernel_layout(rows: Sequence[torch.Tensor], lse: torch.Tensor,
                   dlse: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """What the kernels read: rows of unit stride, a contiguous lse and a contiguous float32 dlse."""
    rows = [t if t.stride(-1) == 1 else t.contiguous() for t in rows]
    return rows, lse.contiguous(), None if dlse is None else dlse.to(torch.float32).contiguous()


@_on_device_of
def _varlen_backward(spec: PatternSpec, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                     cu_seqlens: torch.Tensor, scale: float, layer: int,
                     grads: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's layout ([total, H, D] or [1, H, total, D]); lse, dlse: [1, H, total]. `grads`:
    (dq, dk, dv) to write into, else new tensors."""
    patterns = _head_patterns(spec, None if layer < 0 else layer)
    starts, lengths = _docs(cu_seqlens)
    q4, k4, v4, o4, do4 = _layout4(q, k, v, o, do)
    _, H, total, D = q4.shape
    group = H // k4.shape[1]
    if grads is None:
        grads = tuple(torch.empty(tuple(t.shape), dtype=t.dtype, device=t.device) for t in (q, k, v))
    dq, dk, dv = grads
    dq4, dk4, dv4 = _layout4(dq, dk, dv)
    if _torch_path(q):
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        delta = (do4.to(work) * o4.to(work)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(work)
        for s, n in zip(starts, lengths, strict=True):
            if n:
                part = slice(s, s + n)
                g = _attention_cpu_bwd(spec, do4[:, :, part], q4[:, :, part], k4[:, :, part], v4[:, :, part],
                                       lse[:, :, part], delta[:, :, part], scale, group, patterns)
                dq4[:, :, part], dk4[:, :, part], dv4[:, :, part] = g
        return dq, dk, dv
    (q4, k4, v4, o4, do4), lse, dlse = _kernel_layout((q4, k4, v4, o4, do4), lse, dlse)
    d_pad = _d_pad(D)
    bm1, bn1, bm2, bn2, w1, s1, w2, s2 = _bwd_config(spec, d_pad, q.element_size())
    prec = _dot_prec(q)
    delta, lse2, pre = _delta_pass(o4, do4, lse, dlse, d_pad)
    accum = not isinstance(patterns, int) and len(set(patterns)) > 1
    if accum:
        dk4.zero_()
        dv4.zero_()
    cu = cu_seqlens.to(torch.int32)
    strides = (0, q4.stride(1), q4.stride(2), 0, k4.stride(1), k4.stride(2), 0, v4.stride(1), v4.stride(2),
               0, do4.stride(1), do4.stride(2))
    for pat in range(spec.patterns):
        heads = _heads(pat, patterns, H, q.device)
        nh = heads.numel()
        if nh == 0 or total == 0:
            continue
        table, f_off, f_idx, p_off, p_idx = varlen_tables(spec, cu, lengths, bm2, bn2, pat)
        _attn_bwd_dq[(table.numel() // 2, nh)](
            q4, k4, v4, do4, dq4, lse2, delta, heads, f_off, f_idx, p_off, p_idx,
            *strides, 0, dq4.stride(1), dq4.stride(2),
            total, H, nh, group, scale * _LOG2E, scale,
            PRED=pred_kernel(spec, pat), BLOCK_M=bm2, BLOCK_N=bn2, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
            IDX64=spec.idx64, INTERPRET=_INTERPRET, CU=cu, TILES=table, LSE_N=total, VARLEN=True,
            num_warps=w2, num_stages=s2, **pre,
        )
        kv_ids, qh_off, qh_idx = _kv_groups(pat, patterns, H, group, q.device)
        table, f_off, f_idx, p_off, p_idx = varlen_tables(spec, cu, lengths, bm1, bn1, pat, transpose=True)
        _attn_bwd_dkdv[(table.numel() // 2, kv_ids.numel())](
            q4, k4, v4, do4, dk4, dv4, lse2, delta, kv_ids, qh_off, qh_idx, f_off, f_idx, p_off, p_idx,
            *strides, 0, dk4.stride(1), dk4.stride(2), 0, dv4.stride(1), dv4.stride(2),
            total, H, kv_ids.numel(), scale * _LOG2E, scale,
            PRED=pred_kernel(spec, pat), BLOCK_M=bm1, BLOCK_N=bn1, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
            IDX64=spec.idx64, ACCUM=accum, INTERPRET=_INTERPRET, CU=cu, TILES=table, LSE_N=total, VARLEN=True,
            num_warps=w1, num_stages=s1,
        )
    return dq, dk, dv


@_on_device_of
def _spans_backward(spec: PatternSpec, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, dlse: torch.Tensor | None, q_runs: tuple[tuple[int, int], ...],
                    k_runs: tuple[tuple[int, int], ...], n: int, docs: tuple[int, ...] | None, scale: float,
                    patterns: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `forward._spans_forward`'s queries and keys, given the queries' final out and lse
    (merged over every key set, so each key set's share comes out on its own)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    if Nq == 0 or Nk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    (q, k, v, o, do), lse, dlse = _kernel_layout((q, k, v, o, do), lse, dlse)
    d_pad = _d_pad(D)
    bm1, bn1, bm2, bn2, w1, s1, w2, s2 = _bwd_config(spec, d_pad, q.element_size())
    prec = _dot_prec(q)
    delta, lse2, pre = _delta_pass(o, do, lse, dlse, d_pad)
    accum = not isinstance(patterns, int) and len(set(patterns)) > 1  # a heads { } group mixing predicates
    # every segment's program writes its rows (dK/dV: added up over the predicates of a key head's group)
    dq, dk, dv = torch.empty_like(q), *((torch.zeros_like if accum else torch.empty_like)(t) for t in (k, v))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    for pat in range(spec.patterns):
        heads = _heads(pat, patterns, H, q.device)
        nh = heads.numel()
        if nh == 0:
            continue
        qseg, kseg, f_off, f_idx, p_off, p_idx = tables.span_tables(spec, pat, q_runs, k_runs, n, docs, bm2, bn2,
                                                                    q.device)
        _attn_bwd_dq[(qseg.shape[0], B * nh)](
            q, k, v, do, dq, lse2, delta, heads, f_off, f_idx, p_off, p_idx, *strides, *dq.stride()[:3],
            Nq, H, nh, group, scale * _LOG2E, scale,
            PRED=pred_kernel(spec, pat), BLOCK_M=bm2, BLOCK_N=bn2, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
            IDX64=spec.idx64, INTERPRET=_INTERPRET, LSE_N=Nq, QSEG=qseg, KSEG=kseg,
            num_warps=w2, num_stages=s2, **pre,
        )
        kv_ids, qh_off, qh_idx = _kv_groups(pat, patterns, H, group, q.device)
        kseg, qseg, f_off, f_idx, p_off, p_idx = tables.span_tables(spec, pat, q_runs, k_runs, n, docs, bm1, bn1,
                                                                    q.device, transpose=True)
        _attn_bwd_dkdv[(kseg.shape[0], B * kv_ids.numel())](
            q, k, v, do, dk, dv, lse2, delta, kv_ids, qh_off, qh_idx, f_off, f_idx, p_off, p_idx,
            *strides, *dk.stride()[:3], *dv.stride()[:3],
            Nq, H, kv_ids.numel(), scale * _LOG2E, scale,
            PRED=pred_kernel(spec, pat), BLOCK_M=bm1, BLOCK_N=bn1, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=prec,
            IDX64=spec.idx64, ACCUM=accum, INTERPRET=_INTERPRET, LSE_N=Nq, QSEG=qseg, KSEG=kseg,
            num_warps=w1, num_stages=s1,
        )
    return dq, dk, dv
