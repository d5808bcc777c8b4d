"""The forward pass: per head pattern one launch over its block tables (the fast work-list kernel, or the
general kernel for token layouts, selectors and packed documents), with autotuned tiles."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import fwd_kernels, layout_order, plans, tables
from .backward import _kv_groups
from .common import (
    _INTERPRET,
    _LOG2E,
    _by_width,
    _d_pad,
    _descriptors,
    _docs,
    _dot_prec,
    _heads,
    _layout4,
    _on_device_of,
    _pow2,
    _tma_mode,
    _torch_path,
    layout_kernel,
    pred_kernel,
)
from .cpu import _attention_cpu
from .fwd_kernels import _attn_combine, _attn_fwd, _attn_fwd_fast
from .options import Options, current_options, options
from .selection import _dynamic_tables, _selection, _tiles, sel_kernel
from .tables import block_tables, heavy_first, work_list
from .tuning import _layout_candidates, _tune_candidates, _tuned
from .varlen import varlen_tables

if TYPE_CHECKING:
    from .spec import PatternSpec


def _config(spec: PatternSpec, D: int, itemsize: int = 2) -> tuple[int, ...]:
    return _by_width(spec.configs, D, itemsize)


def _launch(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            cfg: tuple[int, ...], scale: float, group: int, patterns: int | tuple[int, ...],
            scores: torch.Tensor | None = None, picks: dict[int, torch.Tensor] | None = None) -> None:
    """Every pattern's kernel: the fast one with `cfg` = (BLOCK_M, BLOCK_N, warps, stages, tma, one_loop,
    maxnreg) (one_loop: FULL and PARTIAL blocks in one loop, as the `one_loop` option; maxnreg: a cap on
    registers per thread, as the `maxnreg` option, so that two blocks share an SM), for patterns with a
    token layout on buffers gathered into its order (the `layout_gather` option; off, they take `_attn_fwd`
    with cfg's tiles, warps and stages); those with a selector `_attn_fwd` with the configured tiles."""
    B, H, N, D = q.shape
    descs = None
    for pat in range(spec.patterns):
        heads = _heads(pat, patterns, H, q.device)
        if heads.numel() == 0:
            continue
        if not _fast(spec, pat):
            _launch_general(spec, pat, q, k, v, out, lse, heads, cfg, scale, group, scores, picks)
        elif spec.layouts[pat] is not None:
            _launch_gathered(spec, pat, q, k, v, out, lse, heads, cfg, scale, group, patterns)
        else:
            if descs is None:
                descs = _descriptors(cfg[4], q, k, v, out, cfg[0], cfg[1], _d_pad(D))
            _launch_fast(spec, pat, q, k, v, out, lse, descs, heads, cfg, scale, group, N)


def _launch_general(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, heads: torch.Tensor, cfg: tuple[int, ...], scale: float, group: int,
                    scores: torch.Tensor | None, picks: dict[int, torch.Tensor] | None) -> None:
    """Pattern `pat` on `_attn_fwd`: a token layout read in place (cfg's tiles), or a selector's blocks (the
    configured tiles, divided to its blocks)."""
    B, H, N, D = q.shape
    nh = heads.numel()
    d_pad = _d_pad(D)
    cm, cn, cw, cs = cfg[:4] if spec.selectors[pat] is None else _config(spec, d_pad, q.element_size())
    bm, bn = _tiles(spec, pat, cm, cn)
    sel_pred, sel_vars = None, False
    if spec.selectors[pat] is None:
        f_off, f_idx, p_off, p_idx = block_tables(spec, N, bm, bn, q.device, pat)
        order = heavy_first(spec, N, bm, bn, q.device, pat)
    else:
        sel_pred, sel_vars = sel_kernel(spec, pat)
        order = None
        picked = picks[pat] if picks else _selection(spec, pat, q, k, scores, heads, group)
        f_off, f_idx, p_off, p_idx = _dynamic_tables(spec, pat, picked, B, nh, N, bm, bn, q.device)
    rows = tables.rows(spec, pat, N)
    _attn_fwd[(-(-rows // bm), B * nh)](
        q, k, v, out, lse, heads, f_off, f_idx, p_off, p_idx, f_off, f_off,
        *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *out.stride()[:3],
        N, H, nh, group, scale * _LOG2E, N, rows,
        PRED=pred_kernel(spec, pat), BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=_dot_prec(q),
        IDX64=spec.idx64, INTERPRET=_INTERPRET, LAYOUT=layout_kernel(spec, pat), SEL_PRED=sel_pred,
        SEL_VARS=sel_vars, ORDER=order, num_warps=cw if bm >= 128 else min(cw, 4), num_stages=cs,
    )


def _launch_gathered(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, heads: torch.Tensor, cfg: tuple[int, ...], scale: float,
                     group: int, patterns: int | tuple[int, ...]) -> None:
    """Pattern `pat`, which has a token layout, on the fast kernel: q, k, v gathered into the layout's row
    order, the kernel over those buffers, its output rows and log-sum-exp gathered back to token order
    (`layout_order`)."""
    B, H, N, D = q.shape
    kv_heads = _kv_groups(pat, patterns, H, group, q.device)[0]
    qr, kr, vr = layout_order.to_rows(spec, pat, heads, kv_heads, q, k, v)
    out_r = torch.empty_like(qr)
    lse_r = torch.empty(qr.shape[:3], dtype=torch.float32, device=q.device)
    descs = _descriptors(cfg[4], qr, kr, vr, out_r, cfg[0], cfg[1], _d_pad(D))
    _launch_fast(spec, pat, qr, kr, vr, out_r, lse_r, descs, heads, cfg, scale, group, N)
    layout_order.to_tokens(spec, pat, heads, out_r, lse_r, out, lse)


def _launch_fast(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, descs: tuple[Any, ...], heads: torch.Tensor, cfg: tuple[int, ...], scale: float,
                 group: int, n: int) -> None:
    """Pattern `pat` on `_attn_fwd_fast` over tensors of q.shape[2] rows: the tokens (n of them), or with
    the pattern's token layout its rows (`layout_order`'s buffers, the kernel mapping rows to tokens in
    PARTIAL tiles). Heavy query blocks may be sliced (`_attn_combine` merges the slices)."""
    opts = current_options()
    key = ("fwd", spec.key, pat, n, cfg, scale, group, heads.numel(), q.shape, q.stride(), k.stride(), v.stride(),
           out.stride(), q.dtype, q.device, opts)
    fast, combine, slots = plans.cached(key, lambda: _fast_plans(spec, pat, q, k, v, out, lse, descs, heads, cfg,
                                                                 scale, group, n, opts))
    ws_o = ws_l = lse
    if slots:
        B, _, _, D = q.shape
        bhn = B * heads.numel()
        ws_o = torch.empty(bhn * slots * cfg[0] * _d_pad(D), dtype=torch.float32, device=q.device)
        ws_l = torch.empty(bhn * slots * cfg[0], dtype=torch.float32, device=q.device)
    fast(_attn_fwd_fast, (q, k, v, out, lse, *descs, ws_o, ws_l, heads))
    if combine is not None:
        combine(_attn_combine, (out, lse, ws_o, ws_l, heads))


def _fast_plans(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, descs: tuple[Any, ...], heads: torch.Tensor, cfg: tuple[int, ...], scale: float,
                group: int, n: int, opts: Options) -> tuple[plans.Plan, plans.Plan | None, int]:
    """(`_launch_fast`'s kernel plan, its combine's or None, the workspace slots) for a call like this one."""
    B, H, R, D = q.shape
    block_m, block_n, warps, stages, tma, one_loop, maxnreg = cfg
    cap = {"maxnreg": maxnreg or opts.maxnreg} if maxnreg or opts.maxnreg else {}
    d_pad = _d_pad(D)
    qk_scale = scale * _LOG2E
    off32 = (R + max(block_m, block_n)) * max(q.stride(2), k.stride(2), v.stride(2)) + d_pad < 2**31
    layout = layout_kernel(spec, pat)
    nh = heads.numel()
    _, f_idx, _, p_idx = block_tables(spec, n, block_m, block_n, q.device, pat)
    work, splits, slots, contig = work_list(spec, n, block_m, block_n, q.device, pat, opts.split_tiles, B * nh)
    bhn = B * nh
    fast = plans.make(fwd_kernels._attn_fwd_fast, (work.shape[0] * bhn,), (
        q, k, v, out, lse, *descs, lse, lse, heads, work, f_idx, p_idx,
        *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *out.stride()[:3],
        R, H, nh, bhn, group, max(slots, 1), qk_scale,
    ), dict(
        PRED=pred_kernel(spec, pat), BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=_dot_prec(q),
        IDX64=spec.idx64, EVEN=R % block_n == 0, FOLD=opts.fold and qk_scale > 0, OFF32=off32,
        CONTIG=opts.contig and contig, TMA=tma, INTERPRET=_INTERPRET, ONE_LOOP=bool(one_loop or opts.one_loop),
        num_warps=warps, num_stages=stages, **cap, **({} if layout is None else dict(LAYOUT=layout, NTOK=n)),
    ), range(12))
    combine = None
    if slots:
        combine = plans.make(fwd_kernels._attn_combine, (splits.shape[0] * bhn,), (
            out, lse, lse, lse, heads, splits, *out.stride()[:3], R, H, nh, bhn, slots,
        ), dict(BLOCK_M=block_m, HEAD_DIM=D, D_PAD=d_pad, num_warps=4), range(5))
    return fast, combine, slots


def _fast(spec: PatternSpec, pat: int) -> bool:
    """The fast kernel serves this pattern: no selector, and no token layout unless it runs on buffers
    gathered into the layout's order (the `layout_gather` option not False)."""
    if spec.selectors[pat] is not None:
        return False
    return spec.layouts[pat] is None or current_options().layout_gather is not False


def _may_tune(spec: PatternSpec, q: torch.Tensor, used: set[int]) -> bool:
    """A call may time candidates: compiled kernels on a CUDA GPU, tuning not switched off, and some pattern
    without a selector (patterns with one keep their configured tiles)."""
    return not (_INTERPRET or q.device.type != "cuda" or not spec.autotune
                or all(spec.selectors[p] is not None for p in used) or not current_options().autotune
                or os.environ.get("PATTERNDSL_AUTOTUNE") == "0")


@contextlib.contextmanager
def _layout_way(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, scale: float, group: int, patterns: int | tuple[int, ...], tma: int,
                scores: torch.Tensor | None = None, picks: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Under the `layout_gather` option's default (None) a pattern with a token layout runs its forward the
    faster way at this shape: gathered into the layout's order for the fast kernel, which pays two passes
    over q, k, v and the output, or read in place by `_attn_fwd`, which visits more pairs per tile. The tuner
    times the two, each with its own tuned tiles, at the first call and remembers the pick; where nothing is
    tuned (fixed `tiles` included), gathered. The block runs under the way chosen. `scores` and `picks` go
    to the timed launches as to the call's own: a `heads { }` pattern's selector heads run in them too."""
    used = {patterns} if isinstance(patterns, int) else set(patterns)
    opts = current_options()
    if (opts.layout_gather is not None or opts.tiles is not None or not _may_tune(spec, q, used)
            or all(spec.layouts[p] is None or spec.selectors[p] is not None for p in used)):
        yield
        return

    def run(way: tuple[int, ...]) -> None:
        with options(layout_gather=bool(way[0])):
            cfg = _choose(spec, q, k, v, out, lse, scale, group, patterns, tma, scores, picks)
            _launch(spec, q, k, v, out, lse, cfg, scale, group, patterns, scores, picks)

    fields = ("layout-way", _d_pad(q.shape[-1]), q.dtype, tma, q.device.index, _pow2(q.shape[2]), patterns)
    if _tuned(spec, fields, lambda: [(1,), (0,)], run, (1,))[0]:
        yield  # gathered: what the option's None already means, so no options are set on the call's path
    else:
        with options(layout_gather=False):
            yield


def _choose(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            scale: float, group: int, patterns: int | tuple[int, ...], tma: int, scores: torch.Tensor | None = None,
            picks: dict[int, torch.Tensor] | None = None) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, warps, stages, tma, one_loop, maxnreg) to launch: the `tiles` option, the configured
    tiles, or the tuned choice on a CUDA GPU."""
    d_pad = _d_pad(q.shape[-1])
    fixed = current_options().tiles
    if fixed is not None:
        base = _config(spec, d_pad, q.element_size())
        return (*fixed[:4], *base[len(fixed):4], *(fixed[4:7] if len(fixed) > 4 else (tma, 0, 0)))
    used = {patterns} if isinstance(patterns, int) else set(patterns)
    default = (*_config(spec, d_pad, q.element_size()), tma, 0, 0)
    if not _may_tune(spec, q, used):
        return default
    N = q.shape[2]
    # a token layout's pattern runs on another kernel without the `layout_gather` option: its own tuning
    layout = any(spec.layouts[p] is not None for p in used)
    pointer = layout and current_options().layout_gather is False
    fields = ("fwd-pointer" if pointer else "fwd", d_pad, q.dtype, tma, q.device.index, _pow2(N), patterns)
    run = lambda cfg: _launch(spec, q, k, v, out, lse, cfg, scale, group, patterns, scores, picks)  # noqa: E731
    if any(_fast(spec, p) for p in used):
        first = default if layout else None  # a layout's own tiles too
        return _tuned(spec, fields, lambda: _tune_candidates(spec, d_pad, tma, q.element_size(), first), run, default)
    return _tuned(spec, fields, lambda: _layout_candidates(spec, d_pad, q.element_size(), default), run, default)


@_on_device_of
def _forward(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int,
             patterns: int | tuple[int, ...], scores: torch.Tensor | None = None,
             picks: dict[int, torch.Tensor] | None = None, out: torch.Tensor | None = None,
             lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass without argument checks: (out, lse), into `out` / `lse` when given (checked by
    the caller: contiguous, q's shape and dtype, float32 lse)."""
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if lse is None else lse
    if _torch_path(q):
        return _attention_cpu(spec, q, k, v, scale, group, patterns, out, lse, scores, picks)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    d_pad = _d_pad(D)
    tma = _tma_mode((q, k, v, out), d_pad)
    with _layout_way(spec, q, k, v, out, lse, scale, group, patterns, tma, scores, picks):
        cfg = _choose(spec, q, k, v, out, lse, scale, group, patterns, tma, scores, picks)
        _launch(spec, q, k, v, out, lse, cfg, scale, group, patterns, scores, picks)
    return out, lse


@_on_device_of
def _varlen_forward(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    scale: float, patterns: int | tuple[int, ...], starts: Sequence[int] | None = None,
                    lengths: Sequence[int] | None = None, out: torch.Tensor | None = None,
                    lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents without argument checks: (out in q's layout, lse [1, H, total])."""
    if lengths is None:
        starts, lengths = _docs(cu_seqlens)
    packed = q.dim() == 3
    q4, k4, v4 = _layout4(q, k, v)
    _, H, total, D = q4.shape
    group = H // k4.shape[1]
    out = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((1, H, total), dtype=torch.float32, device=q.device) if lse is None else lse
    out4 = out.permute(1, 0, 2)[None] if packed else out
    if _torch_path(q):
        for s, n in zip(starts, lengths, strict=True):  # type: ignore[arg-type]  # starts come with lengths
            if n:
                part = slice(s, s + n)
                _attention_cpu(spec, q4[:, :, part], k4[:, :, part], v4[:, :, part], scale, group, patterns,
                               out4[:, :, part], lse[:, :, part])
        return out, lse
    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
    d_pad = _d_pad(D)
    block_m, block_n, warps, stages = _config(spec, d_pad, q.element_size())
    prec = _dot_prec(q)
    cu = cu_seqlens.to(torch.int32)
    for pat in range(spec.patterns):
        heads = _heads(pat, patterns, H, q.device)
        nh = heads.numel()
        tiles = sum(-(-n // block_m) for n in lengths)
        if nh == 0 or tiles == 0:
            continue
        table, f_off, f_idx, p_off, p_idx = varlen_tables(spec, cu, lengths, block_m, block_n, pat)
        _attn_fwd[(tiles, nh)](
            q4, k4, v4, out4, lse, heads, f_off, f_idx, p_off, p_idx, cu, table,
            0, q4.stride(1), q4.stride(2), 0, k4.stride(1), k4.stride(2),
            0, v4.stride(1), v4.stride(2), 0, out4.stride(1), out4.stride(2),
            total, H, nh, group, scale * _LOG2E, total, total,
            PRED=pred_kernel(spec, pat), BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, D_PAD=d_pad,
            DOT_PREC=prec, IDX64=spec.idx64, INTERPRET=_INTERPRET, VARLEN=True,
            num_warps=warps, num_stages=stages,
        )
    return out, lse


@_on_device_of
def _spans_forward(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_runs: tuple[tuple[int, int], ...],
                   k_runs: tuple[tuple[int, int], ...], n: int, docs: tuple[int, ...] | None, scale: float,
                   patterns: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys that are runs of a longer sequence (`positions.Spans`), on the general kernel: (out,
    lse). Static patterns, in token order (a token layout is left aside); every query row is written (zeros,
    lse -inf without a key)."""
    B, H, Nq, D = q.shape
    group = H // k.shape[1]
    if k.shape[2] == 0:  # no key: every row is empty
        return torch.zeros_like(q), torch.full((B, H, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)  # every query segment's program writes its rows, for every head
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    d_pad = _d_pad(D)
    block_m, block_n, warps, stages = _config(spec, d_pad, q.element_size())
    prec = _dot_prec(q)
    for pat in range(spec.patterns):
        heads = _heads(pat, patterns, H, q.device)
        nh = heads.numel()
        if nh == 0 or Nq == 0:
            continue
        qseg, kseg, f_off, f_idx, p_off, p_idx = tables.span_tables(spec, pat, q_runs, k_runs, n, docs, block_m,
                                                                    block_n, q.device)
        _attn_fwd[(qseg.shape[0], B * nh)](
            q, k, v, out, lse, heads, f_off, f_idx, p_off, p_idx, f_off, f_off,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            Nq, H, nh, group, scale * _LOG2E, Nq, Nq,
            PRED=pred_kernel(spec, pat), BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, D_PAD=d_pad,
            DOT_PREC=prec, IDX64=spec.idx64, INTERPRET=_INTERPRET, QSEG=qseg, KSEG=kseg,
            num_warps=warps, num_stages=stages,
        )
    return out, lse
