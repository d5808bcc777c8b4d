"""Decoding: the last few query rows of each sequence against a KV cache (contiguous or paged).

A decode step attends queries at positions seqlen - Nq .. seqlen - 1 (FlashAttention's bottom-right
alignment) to the keys 0 .. seqlen - 1 the pattern allows, where seqlen = cache_seqlens[b] + Nq_new after
k_new / v_new are written at cache_seqlens (FlashAttention's `flash_attn_with_kvcache` convention). The
lengths stay on the device and every shape is fixed by the tensors, so a step can be captured in a CUDA
graph and replayed with new lengths (warm up once first: the run tables are built on the first call).

Only decode-consistent patterns decode: a row's allowed keys must not depend on the final length (no
predicate reads N), so that one table, built at the cache's capacity, serves every length.

Dynamic selectors: `selections` picks key blocks per (batch, head, query block of the step) from the
cache's key summaries (`decode_selection`), and the kernel visits the static part's tiles plus the picked
blocks (`_pick_tables`: per row the selection case of each key block, per head pack the blocks picked).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import decode_selection as dsel
from . import plans, tables
from .checks import check_dtypes, check_n
from .common import (
    _INTERPRET,
    _LOG2E,
    _d_pad,
    _descriptor,
    _dot_prec,
    _heads_of,
    _on_device_of,
    _pow2,
    _sm_count,
    _tma_mode,
    _torch_path,
    counted,
    pred_kernel,
)
from .cpu import masked_softmax
from .decode_kernels import _append_kv, _decode_split
from .decode_kernels import _pick_tables as _pick_tables_kernel
from .evaluate import evaluate
from .options import Options, current_options
from .selection import _combine, case_ranks, sel_kernel
from .tuning import _tuned

if TYPE_CHECKING:
    from ..cache import KeySummaries
    from .spec import PatternSpec


def decode_consistent(spec: PatternSpec, patterns: int | tuple[int, ...] | None = None) -> bool:
    """Whether a row's allowed keys are the same at every final length N > row (of `patterns`, the
    predicates of one call's heads; by default every head pattern of the spec). The compiler decides it
    from the pattern's constructs (`analysis.retention`) and records it in `spec.decode`: a predicate may
    mention N and still be consistent (`global(0:16)` clips its slice to N). Such a pattern's predicate is
    then evaluated at any N past the rows asked, here the cache's capacity."""
    return _why_not(spec, patterns) is None


def _why_not(spec: PatternSpec, patterns: int | tuple[int, ...] | None) -> str | None:
    used = range(spec.patterns) if patterns is None else _used(patterns)
    return next((spec.decode[p] for p in used if spec.decode[p] is not None), None)


def _used(patterns: int | tuple[int, ...]) -> list[int]:
    return [patterns] if isinstance(patterns, int) else sorted(set(patterns))


def check_decode(spec: PatternSpec, q: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, page_table: Any,
                 k_new: Any, v_new: Any, scale: Any, patterns: int | tuple[int, ...]) -> tuple[int, int]:
    """(group, capacity) after checking a decode call's arguments; each misuse is one sentence."""
    why = _why_not(spec, patterns)
    if why is not None:
        raise ValueError(f"'{spec.name}' is not decode-consistent ({why}): a row's allowed keys depend on the "
                         "final length, so a cache cannot be attended to row by row")
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens))
    for name, t in named + (("page_table", page_table), ("k_new", k_new), ("v_new", v_new)):
        if t is not None and not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    check_dtypes(q, k_cache, v_cache, "q, k_cache, v_cache")
    for name, t in named[1:] + (("page_table", page_table), ("k_new", k_new), ("v_new", v_new)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    B, H, Nq, D = q.shape
    Dv = v_cache.shape[-1]
    if page_table is None:
        hkv, capacity = k_cache.shape[1], k_cache.shape[2]
        if k_cache.shape[0] != B or k_cache.shape[3] != D or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
            raise ValueError(f"a contiguous cache is k_cache [{B}, kv_heads, max_seqlen, {D}] and v_cache [{B}, "
                             f"kv_heads, max_seqlen, head_dim_v], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    else:
        hkv = k_cache.shape[2]
        if k_cache.shape[3] != D or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
            raise ValueError(f"a paged cache is k_cache [pages, page_size, kv_heads, {D}] and v_cache [pages, "
                             f"page_size, kv_heads, head_dim_v], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        if page_table.dim() != 2 or page_table.shape[0] != B or page_table.dtype != torch.int32:
            raise ValueError(f"page_table must be an int32 tensor [{B}, max_pages], got "
                             f"{tuple(page_table.shape)}, {page_table.dtype}")
        capacity = page_table.shape[1] * k_cache.shape[1]
    if (cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B or cache_seqlens.dtype != torch.int32):
        raise ValueError(f"cache_seqlens must be an int32 tensor [{B}] on q's device, got "
                         f"{tuple(cache_seqlens.shape)}, {cache_seqlens.dtype}")
    if hkv < 1 or H % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({H})")
    if not isinstance(patterns, int) and H != len(patterns):
        raise ValueError(f"this pattern defines {len(patterns)} heads, got {H} query heads")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new come together: pass both or neither")
    if k_new is not None:
        for name, t, d in (("k_new", k_new, D), ("v_new", v_new, Dv)):
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != hkv or t.shape[3] != d or t.dtype != q.dtype:
                raise ValueError(f"{name} must be [{B}, {hkv}, new tokens, {d}] of {q.dtype}, got "
                                 f"{tuple(t.shape)}, {t.dtype}")
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"k_new and v_new must hold as many tokens, got {k_new.shape[2]} and {v_new.shape[2]}")
    if Nq > capacity:
        raise ValueError(f"{Nq} queries do not fit a cache of {capacity} positions")
    if _torch_path(q):  # values are read only on the host's PyTorch path, where that costs no synchronisation
        _check_lengths(cache_seqlens, page_table, 0 if k_new is None else k_new.shape[2], capacity,
                       k_cache.shape[0] if page_table is not None else 0, k_cache.shape[1])
    if q.device.type != "cpu" and max(D, Dv) > 256:
        raise ValueError(f"head_dim must be at most 256 on the GPU kernel, got {max(D, Dv)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {t.stride()}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    check_n(spec, capacity)
    return H // hkv, capacity


def check_selectors(spec: PatternSpec, patterns: int | tuple[int, ...], q: torch.Tensor, kv_heads: int,
                    capacity: int, scores: Any, summaries: Any, selected: Any, return_selected: bool) -> None:
    """A decode call's selector arguments (after `check_decode`); each misuse is one sentence."""
    from ..cache import KeySummaries

    dynamic = [p for p in _used(patterns) if spec.selectors[p] is not None]
    if not dynamic:
        for name, x in (("scores", scores), ("summaries", summaries), ("selected", selected)):
            if x is not None:
                raise ValueError(f"{name}= serves patterns with selectors (topk, threshold); this one has none")
        if return_selected:
            raise ValueError("return_selected=True serves patterns with selectors (topk, threshold); this one has none")
        return
    if (selected is not None or return_selected) and len(dynamic) > 1:
        raise ValueError("selected= and return_selected=True serve calls whose heads run one pattern with selectors")
    B, H, nq, D = q.shape
    want: tuple[int, ...]
    for p in dynamic:
        for rule in spec.selectors[p].all:  # type: ignore[union-attr]
            if rule.kind == "topk" and not isinstance(rule.param, int):
                raise ValueError(f"'{spec.name}': a topk count that grows with N does not decode (a step's count "
                                 "would need the length on the host); give a constant count or a fraction")
            if rule.score == "max" and selected is None:
                raise ValueError(f"'{spec.name}': score=max reads every key of every block, which a decode step "
                                 "does not; decoding scores key blocks from their summaries: use score=quest "
                                 "(Quest's upper bound on the same max)")
    rules = [r for p in dynamic for r in spec.selectors[p].all]  # type: ignore[union-attr]
    if selected is not None:
        sel = spec.selectors[dynamic[0]]
        assert sel is not None
        if not isinstance(selected, tuple | list) or len(selected) != len(sel.all):
            raise ValueError(f"selected= takes what return_selected=True returned: a tuple of {len(sel.all)} "
                             "tensor(s), one per selector")
        for m, (t, rule) in enumerate(zip(selected, sel.all, strict=True)):
            want = (B, H, dsel.query_blocks(nq, rule.block))
            if (not torch.is_tensor(t) or t.dim() != 4 or tuple(t.shape[:3]) != want or t.dtype != torch.int32
                    or t.device != q.device):
                raise ValueError(f"selected[{m}] must be an int32 tensor [{', '.join(map(str, want))}, width] on "
                                 f"q's device, got {_describe(t)}")
        return
    given = [r for r in rules if r.given]
    if given and scores is None:
        r = given[0]
        raise ValueError(f"this pattern's topk has score=given: pass scores=[batch, heads, "
                         f"{dsel.query_blocks(nq, r.block)}, ceil(capacity / {r.kblock})]")
    if not given and scores is not None:
        raise ValueError("this pattern takes no scores (no topk(..., score=given))")
    for r in given:
        want = (B, H, dsel.query_blocks(nq, r.block), -(-capacity // r.kblock))
        if not torch.is_tensor(scores) or tuple(scores.shape) != want or not scores.is_floating_point() \
                or scores.device != q.device:
            raise ValueError(f"scores must be a floating tensor {list(want)} on q's device (per query block of the "
                             f"step, each key block of the cache), got {_describe(scores)}")
    reads = [r for r in rules if not r.given]
    if reads:
        kb = reads[0].kblock
        want = (B, kv_heads, -(-capacity // kb), D)
        if not isinstance(summaries, KeySummaries):
            raise ValueError(f"'{spec.name}' scores key blocks from their summaries: pass "
                             f"summaries=KeySummaries.build(k_cache, cache_seqlens, {kb}, page_table=...) and "
                             "keep it between steps")
        if summaries.block != kb or tuple(summaries.mean.shape) != want or summaries.mean.device != q.device:
            raise ValueError(f"summaries must be of blocks of {kb} keys, [{', '.join(map(str, want))}] on q's "
                             f"device, got blocks of {summaries.block}, {list(summaries.mean.shape)} on "
                             f"{summaries.mean.device}")


def _describe(t: Any) -> str:
    return f"{list(t.shape)}, {t.dtype}, on {t.device}" if torch.is_tensor(t) else type(t).__name__


def _check_lengths(cache_seqlens: torch.Tensor, page_table: torch.Tensor | None, n_new: int, capacity: int,
                   pages: int, page_size: int) -> None:
    """Host tensors: every length within the cache after the append, and every page a sequence reaches a
    physical page of the cache (entries past a sequence's length are never read, so any value may pad)."""
    lengths = cache_seqlens.tolist()
    for b, n in enumerate(lengths):
        if n < 0 or n + n_new > capacity:
            raise ValueError(f"cache_seqlens[{b}] = {n} with {n_new} new tokens does not fit the cache's {capacity} "
                             f"positions (0 <= cache_seqlens[b] <= {capacity - n_new})")
    if page_table is None:
        return
    for b, n in enumerate(lengths):
        used = page_table[b, :-(-(n + n_new) // page_size)]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= pages):
            raise ValueError(f"page_table[{b}] names pages outside 0..{pages - 1} among the "
                             f"{used.numel()} pages its {n + n_new} tokens use: {used.tolist()}")


def append(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, page_table: torch.Tensor | None,
           k_new: torch.Tensor, v_new: torch.Tensor, summaries: KeySummaries | None = None) -> None:
    """Write k_new, v_new [B, Hkv, n, D] at positions cache_seqlens[b] .. + n - 1 of each sequence (device
    indices, no host sync): one `_append_kv` launch off the PyTorch path; with `summaries`, they are
    updated too, in the same launch (`KeySummaries.update`'s append)."""
    B, hkv, n, _ = k_new.shape
    if summaries is not None:
        summaries.update(k_cache, cache_seqlens, n, page_table=page_table, append=(k_new, v_new, v_cache))
        return
    if not _torch_path(k_new):
        k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
        v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
        paged = page_table is not None
        s_k, s_v, unit, s_pt = _layout(k_cache, v_cache, page_table)
        capacity = page_table.shape[1] * unit if paged else k_cache.shape[2]  # type: ignore[union-attr]
        ch = min(16, _pow2(n))
        dk, dv = k_new.shape[-1], v_new.shape[-1]
        _append_kv[(-(-n // ch), B * hkv)](
            k_new, v_new, k_cache, v_cache, page_table if paged else cache_seqlens, cache_seqlens.contiguous(),
            *k_new.stride()[:3], *v_new.stride()[:3], *s_k, *s_v, s_pt,
            n, capacity, unit, hkv, CH=ch, DK=dk, DK_PAD=_d_pad(dk), DV=dv, DV_PAD=_d_pad(dv), PAGED=paged,
        )
        return
    pos = cache_seqlens.long()[:, None] + torch.arange(n, device=k_new.device)  # [B, n]
    kn, vn = k_new.permute(0, 2, 1, 3), v_new.permute(0, 2, 1, 3)  # [B, n, Hkv, D]
    if page_table is None:
        b = torch.arange(B, device=k_new.device)[:, None].expand(B, n)
        k_cache.permute(0, 2, 1, 3).index_put_((b, pos), kn)
        v_cache.permute(0, 2, 1, 3).index_put_((b, pos), vn)
    else:
        size = k_cache.shape[1]
        page = torch.gather(page_table, 1, (pos // size).to(torch.int64)).long()
        k_cache.index_put_((page, pos % size), kn)
        v_cache.index_put_((page, pos % size), vn)


def selections(spec: PatternSpec, q: torch.Tensor, cache_seqlens: torch.Tensor, n_new: int, group: int,
               patterns: int | tuple[int, ...], capacity: int, kv_heads: int, scores: Any = None, summaries: Any = None,
               selected: Any = None) -> dict[int, Picks]:
    """{dynamic pattern: its `Picks` (per selector int32 [B, H, query blocks of the step, width], heads of
    other patterns -1)}, scored from the summaries (or the caller's scores), or `selected` reused; {} for
    static patterns (no launch)."""
    H = q.shape[1]
    out: dict[int, Picks] = {}
    for pat in _used(patterns):
        if spec.selectors[pat] is None:
            continue
        if selected is not None:
            out[pat] = Picks(list(selected))
            continue
        heads = dsel.device_ints(tuple(_heads_of(patterns, pat, H)), q.device)
        out[pat] = Picks(*dsel.select(spec, pat, q, heads, _packs(patterns, pat, H, group, q.device), group,
                                      cache_seqlens, n_new, capacity, summaries, scores, kv_heads))
    return out


@dataclass(frozen=True)
class Picks:
    """A dynamic pattern's selection at a step: per selector its picks int32 [B, H, query blocks, width]
    (what return_selected=True returns), and the decode kernel's tables (PICK, SLIST, SCOUNT) where the
    selection's last launch built them (else `_pick_tables` builds them from the picks), or the top-n's
    unmerged splits (`decode_selection.Folded`): the decode kernel merges them and writes `sel`."""

    sel: list[torch.Tensor]
    tables: dsel.Tables | dsel.Folded | None = None


@_on_device_of
def decode(spec: PatternSpec, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           cache_seqlens: torch.Tensor, page_table: torch.Tensor | None, n_new: int, scale: float, group: int,
           patterns: int | tuple[int, ...], capacity: int, out: torch.Tensor,
           lse: torch.Tensor, picks: dict[int, Picks] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step into `out` [B, H, Nq, Dv] and `lse` [B, H, Nq] (arguments checked, k_new appended;
    `picks`: `selections`' for the dynamic patterns). A static pattern's launch, but for the call's
    tensors, is fixed by the shapes, strides, dtypes, options and lengths: it is built once per such key
    (`_Step`, with the split count the tuner chose), since an eager decode step is bound by host time."""
    if q.shape[2] == 0:
        return out, lse
    if _torch_path(q):
        pick = {pat: dsel.dense(spec, pat, p.sel, capacity) for pat, p in (picks or {}).items()}
        return _decode_cpu(spec, q, k_cache, v_cache, cache_seqlens, page_table, n_new, scale, group, patterns,
                           capacity, out, lse, pick)
    opts = current_options()
    q = q if q.stride(-1) == 1 else q.contiguous()
    cache_seqlens = cache_seqlens.contiguous()  # the kernels index both with unit inner strides
    page_table = None if page_table is None else page_table.contiguous()
    live = (q, k_cache, v_cache, page_table if page_table is not None else cache_seqlens, cache_seqlens)
    for pat in _used(patterns):
        if spec.selectors[pat] is None:
            key = ("decode", spec.key, pat, patterns, q.shape, q.stride(), k_cache.shape, k_cache.stride(),
                   v_cache.shape, v_cache.stride(), None if page_table is None else (page_table.shape, page_table.stride()),
                   out.stride(), lse.stride(), q.dtype, q.device, n_new, scale, group, capacity, opts,
                   os.environ.get("PATTERNDSL_AUTOTUNE"))
            step, cfg, plan = plans.cached(key, functools.partial(_planned, spec, pat, q, k_cache, v_cache,
                                                                  page_table, n_new, scale, group, patterns,
                                                                  capacity, out, lse, opts, live))
        else:
            step = _step(spec, pat, q, k_cache, v_cache, page_table, n_new, scale, group, patterns, capacity, out,
                         lse, opts, (picks or {})[pat])
            cfg, plan = _choose(spec, q, step, live, (out, lse), k_cache, v_cache), None
        _launch_split(step, live, (out, lse), k_cache, v_cache, cfg, plan)
    return out, lse


@dataclass(frozen=True)
class _Step:
    """One pattern's `_decode_split` launch but for the call's tensors: the grid's (head packs, batch), the
    split workspace's sizes per split, the tables after the live tensors (head packs, run tables), the
    integers and constexprs, the descriptor boxes of a contiguous cache (else None), and what the tuner
    keys the split count on."""

    grid: tuple[int, int]
    ws_values: int
    ws_rows: int
    fixed: tuple[torch.Tensor, ...]
    scalars: tuple[int, ...]
    qk_scale: float
    consts: dict[str, Any]
    boxes: tuple[int, int, int] | None
    fields: tuple[Any, ...]
    blocks: int
    capacity: int


def _step(spec: PatternSpec, pat: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          page_table: torch.Tensor | None, n_new: int, scale: float, group: int, patterns: int | tuple[int, ...],
          capacity: int, out: torch.Tensor, lse: torch.Tensor, opts: Options, made: Picks | None) -> _Step:
    """Pattern `pat`'s launch (`made`: a dynamic pattern's picks this step, None for a static pattern)."""
    B, H, Nq, D = q.shape
    Dv = v_cache.shape[-1]
    block = opts.decode_block or (64 if max(D, Dv) <= 128 else 32)
    if block < 16 or block & (block - 1):
        raise ValueError(f"decode_block must be a power of two >= 16, got {block}")
    paged = page_table is not None
    s_k, s_v, page, s_pt = _layout(k_cache, v_cache, page_table)
    nq_pad = _pow2(Nq)
    span = dsel.query_blocks(Nq, block)  # query blocks the rows of one step may fall in
    heads = _packs(patterns, pat, H, group, q.device)
    packs, g = heads.shape
    m = max(16, _pow2(g * nq_pad))
    sel = spec.selectors[pat]
    bn = block if sel is None else min(block, sel.kblock & -sel.kblock)  # tiles divide the key blocks
    off, runs, count, most = tables.run_tables(spec, pat, capacity, block, bn, q.device)
    dyn: dict[str, Any] = {}
    if sel is not None:
        assert made is not None
        vd = dsel.device_ints(tuple(case_ranks(sel)), q.device, torch.int32)
        if isinstance(made.tables, dsel.Folded):  # the kernel merges the top-n's splits and writes the picks
            f = made.tables
            dyn = dict(VD=vd, TWS=f.ws, TSEL=made.sel[0], T_SPLITS=f.splits, H=H, SQB=made.sel[0].shape[2],
                       SNK=-(-capacity // sel.kblock), SL=f.width, SEL_B=sel.block, SEL_KB=sel.kblock, **f.consts)
        else:
            p, slist, scount = made.tables or _pick_tables(spec, pat, made.sel, heads, capacity)
            dyn = dict(PICK=p, VD=vd, SLIST=slist, SCOUNT=scount, H=H, SQB=p.shape[2], SNK=p.shape[3],
                       SL=slist.shape[-1], SEL_B=sel.block, SEL_KB=sel.kblock)
        pred, dispatch = sel_kernel(spec, pat)
        dyn.update(SEL_PRED=pred, SEL_VARS=dispatch)
    blocks = most * span + (dyn["SL"] * (sel.kblock // bn) if sel is not None else 0)
    dv_pad = _d_pad(Dv)
    scalars = (*q.stride()[:3], *s_k, *s_v, s_pt, *out.stride()[:3], *lse.stride()[:2], Nq, n_new, capacity,
               page, group)
    consts = dict(
        PRED=pred_kernel(spec, pat), G=g, NQ_PAD=nq_pad, M=m, TABLE_M=block, BLOCK_N=bn, DQK=D,
        DQK_PAD=_d_pad(D), DV=Dv, DV_PAD=dv_pad, PAGED=paged, PAGE_TILES=paged and page % bn == 0,
        DOT_PREC=_dot_prec(q), IDX64=spec.idx64, INTERPRET=_INTERPRET, MERGE_CHUNK=_merge_chunk(opts),
        PIPE_PICKS=opts.decode_pipelined_picks,
        num_warps=opts.decode_warps or 4, **({"num_stages": opts.decode_stages} if opts.decode_stages else {}),
        **dyn,
    )
    return _Step((packs, B), B * packs * m * dv_pad, B * packs * m, (heads, off, runs, count), scalars,
                 scale * _LOG2E, consts, None if paged else (bn, _d_pad(D), dv_pad),
                 (pat, B, H, Nq, Dv, group, paged, page, block, blocks), blocks, capacity)


def _planned(spec: PatternSpec, pat: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             page_table: torch.Tensor | None, n_new: int, scale: float, group: int, patterns: int | tuple[int, ...],
             capacity: int, out: torch.Tensor, lse: torch.Tensor, opts: Options,
             live: tuple[torch.Tensor, ...]) -> tuple[_Step, tuple[int, int], plans.Plan]:
    """A static pattern's step, its (splits, TMA), chosen once per key (the tuner's first call launches),
    and its launch plan (`runtime.plans`: with the `direct_launch` option, the compiled kernel's own
    launcher takes later steps)."""
    step = _step(spec, pat, q, k_cache, v_cache, page_table, n_new, scale, group, patterns, capacity, out, lse,
                 opts, None)
    cfg = _choose(spec, q, step, live, (out, lse), k_cache, v_cache)
    splits, tma = cfg
    descs = ("K_DESC", "V_DESC") if tma and step.boxes is not None else ()
    args = (*live, *step.fixed, None, None, out, lse, None, *step.scalars, splits, step.qk_scale)
    plan = plans.make(_decode_split, (*step.grid, splits), args, {**step.consts, **dict.fromkeys(descs)},
                      (*range(len(live)), *range(len(live) + 4, len(live) + 9), *descs))
    return step, cfg, plan


def _choose(spec: PatternSpec, q: torch.Tensor, step: _Step, live: tuple[torch.Tensor, ...],
            outputs: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """(splits, TMA) of `step` (`_tuned_launch`; the tuner's candidates launch on this call's tensors; a
    paged cache has no descriptor boxes)."""
    boxes = step.boxes
    descs = None if boxes is None else functools.partial(_cache_descriptors, k_cache, v_cache, *boxes)
    launch = functools.partial(_launch_split, step, live, outputs, k_cache, v_cache)
    return _tuned_launch(spec, q, step.fields, boxes is None, step.blocks, step.grid[0] * step.grid[1],
                         step.capacity, launch, descs)


def _launch_split(step: _Step, live: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, torch.Tensor],
                  k_cache: torch.Tensor, v_cache: torch.Tensor, cfg: tuple[int, ...],
                  plan: plans.Plan | None = None) -> None:
    """One `_decode_split` launch of `step` on the call's tensors (`live`: q, the caches, the page table or
    lengths, the lengths) into outputs = (out, lse): cfg = (splits per row, TMA loads (1, where the cache
    allows descriptors) or pointer loads (0)), with its workspace (none for one split) and an arrival
    counter per (batch entry, head pack); through `plan` where one was made for these (descriptors as it
    expects: a cache whose alignment no longer allows them launches without)."""
    splits, tma = cfg
    lse = outputs[1]
    ws_o = ws_l = lse  # unused with one split
    if splits > 1:  # one allocation: the partial outputs, then the partial log-sum-exps
        ws = torch.empty((step.ws_values + step.ws_rows) * splits, dtype=torch.float32, device=lse.device)
        ws_o, ws_l = ws[:step.ws_values * splits], ws[step.ws_values * splits:]
    consts = step.consts
    made = _cache_descriptors(k_cache, v_cache, *step.boxes) if tma and step.boxes is not None else None
    if made is not None:
        consts = {**consts, "K_DESC": made[0], "V_DESC": made[1]}
    grid = step.grid
    with counted(grid[0] * grid[1], lse.device) as counters:
        if plan is not None and (made is not None) == ("K_DESC" in plan.live):
            plan(_decode_split, (*live, ws_o, ws_l, *outputs, counters, *(made or ())))
            return
        _decode_split[(*grid, splits)](*live, *step.fixed, ws_o, ws_l, *outputs, counters, *step.scalars, splits,
                                       step.qk_scale, **consts)


def _cache_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block: int, dk_pad: int,
                       dv_pad: int) -> tuple[Any, Any] | None:
    """Host TMA descriptors of a contiguous cache's K and V ([B, HKV, CAP, D], boxes of `block` rows), or
    None where the GPU or the tensors' alignment does not allow TMA."""
    if _tma_mode([k_cache, v_cache], max(dk_pad, dv_pad)) != 1:
        return None
    return _descriptor(k_cache, block, dk_pad), _descriptor(v_cache, block, dv_pad)


def _layout(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor | None
            ) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(K's strides, V's strides, page size, page table's row stride) as the kernels take them: strides of
    (sequence or page, head, position; a contiguous cache is one page of one position per sequence)."""
    if page_table is None:
        return k_cache.stride()[:3], v_cache.stride()[:3], 1, 0
    return ((k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)),
            (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)), k_cache.shape[1], page_table.stride(0))


def _pick_tables(spec: PatternSpec, pat: int, picks: list[torch.Tensor], packs: torch.Tensor,
                 capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(PICK, SLIST, SCOUNT) for `_decode_split` from the selectors' picks: one `_pick_tables` launch where a
    pack's picks are few (topk), else `decode_selection.dense` and `pack_lists` in PyTorch."""
    sel = spec.selectors[pat]
    assert sel is not None
    B, H, qb, _ = picks[0].shape
    g = packs.shape[1]
    merged = picks[0] if len(picks) == 1 else _combine(picks)
    width = merged.shape[-1]
    entries = _pow2(g * qb * width)
    if entries > dsel.TABLE_ENTRIES:
        pick = dsel.dense(spec, pat, picks, capacity, merged)
        return (pick, *dsel.pack_lists(pick, packs, g * qb * width))
    nk = -(-capacity // sel.kblock)
    pick = torch.zeros((B, H, qb, nk), dtype=torch.int8, device=merged.device)
    slist = torch.empty((B, packs.shape[0], min(nk, g * qb * width)), dtype=torch.int32, device=merged.device)
    scount = torch.empty((B, packs.shape[0]), dtype=torch.int32, device=merged.device)
    _pick_tables_kernel[(packs.shape[0], B)](merged.contiguous(), packs, pick, slist, scount, H, qb, width, nk,
                                             slist.shape[-1], G=g, E_PAD=entries, num_warps=4)
    return pick, slist, scount


LONG_ROW = 256  # key blocks from which a row's step streams the cache (bandwidth-bound), not waits on it


def _tuned_launch(spec: PatternSpec, q: torch.Tensor, fields: tuple[Any, ...], paged: bool, blocks: int,
                  programs: int, capacity: int, launch: Callable[[tuple[int, ...]], object],
                  descs: Callable[[], tuple[Any, Any] | None] | None) -> tuple[int, int]:
    """(splits, TMA) of a step: on the first step of a shape (and cache capacity), the fastest of the
    heuristics' split counts (`_splits`: one or two programs per SM, at least four or one key block per
    split), each with pointer loads and, for a contiguous cache whose tensors allow it, TMA, timed by the
    autotuner (`tuning._tuned`, remembered on disk like the forward's tiles); where tuning is off (the
    interpreter, `autotune=False`, PATTERNDSL_AUTOTUNE=0), the rule's count with pointer loads. The
    `decode_splits` and `decode_tma` options fix either (a launch whose tensors do not allow TMA takes
    pointer loads). Launching a step again is harmless: k_new lands at the same positions, out and lse are
    overwritten."""
    opts = current_options()
    loads = (0, 1) if opts.decode_tma < 0 else (int(opts.decode_tma == 1),)
    rule = opts.decode_splits or _splits(blocks, programs, q.device, 2 if paged or blocks < LONG_ROW else 1)
    tuning = not (_INTERPRET or q.device.type != "cuda" or not spec.autotune or not opts.autotune
                  or os.environ.get("PATTERNDSL_AUTOTUNE") == "0")
    if not tuning or (opts.decode_splits and len(loads) == 1):
        return rule, loads[0] if opts.decode_tma >= 0 else 0

    def candidates() -> list[tuple[int, int]]:
        counts = [rule] if opts.decode_splits else [rule] + [
            _splits(blocks, programs, q.device, per_sm, floor) for per_sm in (1, 2) for floor in (4, 1)]
        tma = descs is not None and descs() is not None
        return [(c, t) for c in dict.fromkeys(counts) for t in loads if t == 0 or tma]

    variant = (opts.decode_merge_chunk, opts.decode_pipelined_picks, opts.decode_fold_merge)  # (keyed where set: the defaults' keys stay)
    key = ("decode", _d_pad(q.shape[-1]), q.dtype, loads, q.device, _pow2(capacity),
           (*fields, opts.decode_splits, *(variant if any(variant) else ())))
    best = _tuned(spec, key, candidates, launch, (rule, 0))
    return best[0], best[1]


def _merge_chunk(opts: Options) -> int:
    """The split merge's splits per load (`Options.decode_merge_chunk`; 0: one at a time, every row)."""
    chunk = opts.decode_merge_chunk
    if chunk < 0 or chunk & (chunk - 1):
        raise ValueError(f"decode_merge_chunk must be 0 or a power of two, got {chunk}")
    return chunk


def _splits(blocks: int, programs: int, device: torch.device, per_sm: int = 1, floor: int = 4) -> int:
    """Splits per row: as many as keep the programs over the batch and head packs within `per_sm` per SM
    (a long row over a contiguous cache streams as fast with one as with two; a paged one, whose loads wait
    on a page-table entry, and a short row, whose step is latency, gain from two: docs/decisions.md, decode
    splits), but at least `floor` key blocks per split (a split's fixed cost, and the merge, outweigh
    fewer)."""
    want = per_sm * _sm_count(device, 8) // max(1, programs)
    return max(1, min(want, -(-blocks // floor), 256))


_PACKS: dict[tuple[Any, ...], torch.Tensor] = {}


def _packs(patterns: int | tuple[int, ...], pat: int, H: int, group: int, device: torch.device) -> torch.Tensor:
    """[packs, G] int32: per KV head the query heads of predicate `pat` (-1 padding), one program's rows (GQA:
    the heads share every K and V load). Cached."""
    key = (patterns, pat, H, group, str(device))
    hit = _PACKS.get(key)
    if hit is None:
        mine = set(_heads_of(patterns, pat, H))
        rows = [[h for h in range(kv * group, (kv + 1) * group) if h in mine] for kv in range(H // group)]
        rows = [r for r in rows if r]
        g = max(len(r) for r in rows)
        hit = torch.tensor([r + [-1] * (g - len(r)) for r in rows], dtype=torch.int32, device=device)
        _PACKS[key] = hit
    return hit


def _decode_cpu(spec: PatternSpec, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_seqlens: torch.Tensor, page_table: torch.Tensor | None, n_new: int, scale: float, group: int,
                patterns: int | tuple[int, ...], capacity: int, out: torch.Tensor,
                lse: torch.Tensor, pick: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: per sequence, only the positions some query row may attend to are gathered."""
    B, H, Nq, _ = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    for b, length in enumerate((cache_seqlens.long() + n_new).clamp(max=capacity).tolist()):
        if length == 0:  # an empty sequence (a free slot of the batch): its rows have no key
            out[b], lse[b] = 0, float("-inf")
            continue
        i = torch.arange(length - Nq, length, dtype=torch.int64)[:, None]
        j = torch.arange(length, dtype=torch.int64)[None, :]
        for pat in _used(patterns):
            heads = torch.tensor(_heads_of(patterns, pat, H), dtype=torch.int64)
            ok = torch.broadcast_to(torch.as_tensor(evaluate(spec.predicates[pat].expr, i, j, length)), (Nq, length))
            if pat in pick:
                ok = _selected_pairs(spec, pat, pick[pat][b, heads], ok, i, j, length)
            ok = ok & (i >= 0)
            at = torch.nonzero(ok.reshape(-1, length).any(0)).flatten()  # the reachable positions: nothing else is read
            if at.numel() == 0:  # no row attends to anything: zeros, lse -inf
                out[b, heads], lse[b, heads] = 0, float("-inf")
                continue
            if page_table is None:
                k, v = k_cache[b][:, at], v_cache[b][:, at]
            else:
                size = k_cache.shape[1]
                page = page_table[b].long()[at // size]
                k, v = k_cache[page, at % size].transpose(0, 1), v_cache[page, at % size].transpose(0, 1)
            kv = heads // group
            s = torch.matmul(q[b, heads].to(work), k[kv].to(work).transpose(-1, -2)) * scale
            o, rows_lse = masked_softmax(s, ok[..., at], v[kv].to(work))
            out[b, heads] = o.to(out.dtype)
            lse[b, heads] = rows_lse
    return out, lse



def _selected_pairs(spec: PatternSpec, pat: int, pick: torch.Tensor, static: torch.Tensor, i: torch.Tensor,
                    j: torch.Tensor, length: int) -> torch.Tensor:
    """[heads, Nq, length]: the pairs a dynamic pattern allows, P_v(i, j) with v the case of the block (the
    row's query block of the step, j's key block) in `pick` [heads, query blocks, key blocks] (0: the static
    part P_0)."""
    sel = spec.selectors[pat]
    assert sel is not None
    rel = i.clamp(min=0) // sel.block - max(length - i.shape[0], 0) // sel.block  # [Nq, 1]
    v = pick[:, rel.clamp(0, pick.shape[1] - 1), j // sel.kblock].long()  # [heads, Nq, length]
    ok = torch.where(v == 0, static, False)
    for case, p in enumerate(sel.cases, 1):
        if p >= 0:
            ok = ok | ((v == case) & torch.as_tensor(evaluate(spec.predicates[p].expr, i, j, length)))
    return ok
