"""Dynamic selectors at decode: a step's rows score the cache's key blocks from their summaries and pick.

A decode step's rows are positions seqlen - Nq .. seqlen - 1. The query block of row i is i // b, as in
prefill; the step's rows that fall in one query block stand for it, since the earlier rows' queries are not
cached: q-bar is their mean (one row: its query), the candidates are the key blocks where the selector's
context allows a pair (i, j) for one of them and a key j < seqlen, and the key blocks' mean, min and max are
over their keys below seqlen (`patterndsl.cache.KeySummaries`). When the step's rows are a whole query
block, this is prefill's selection at N = seqlen. The budgets are prefill's (`selection._pick`), the rules'
formulas too (`selection.quest_bound`, `compressed_weights`, `share_kv`).

Everything is device tensors of shapes fixed by the arguments (no value read back), so a step with
selectors stays CUDA-graph capturable. The selection reaches the decode kernel as a per-(batch, head,
query block of the step, key block) byte (the selection case v, 0: not picked) and, per (batch, head
pack), the list of key blocks some row of the pack picked and its length (`decode._pick_tables`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import tables
from .common import _d_pad, _dot_prec, _pow2, _torch_path
from .decode_kernels import _decode_topk, _decode_topk_merge
from .evaluate import evaluate
from .options import current_options
from .selection import _combine, _pick, _sel_dense, compressed_weights, quest_bound, share_kv

if TYPE_CHECKING:
    from ..cache import KeySummaries
    from .spec import PatternSpec, Selector


def query_blocks(nq: int, block: int) -> int:
    """How many query blocks of `block` rows a step of nq consecutive rows may touch."""
    return (nq + block - 2) // block + 1


def step_rows(seqlen: torch.Tensor, nq: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions [B, nq] int64, valid [B, nq], one-hot [B, nq, query blocks] of each row's query block
    among the step's, counted from the block of max(seqlen - nq, 0))."""
    pos = seqlen.long()[:, None] - nq + torch.arange(nq, device=seqlen.device)
    valid = pos >= 0
    rel = pos.clamp(min=0) // block - (seqlen.long()[:, None] - nq).clamp(min=0) // block
    qb = query_blocks(nq, block)
    hot = (rel[:, :, None] == torch.arange(qb, device=seqlen.device)) & valid[:, :, None]
    return pos, valid, hot


def candidates(spec: PatternSpec, rule: Selector, pos: torch.Tensor, valid: torch.Tensor, hot: torch.Tensor,
               seqlen: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, query blocks, key blocks] bool: the key blocks where the context allows a pair (i, j) for a row i
    of the query block (of the step) and a key j < seqlen. The context is decode-consistent, so its
    predicate at N = capacity is its predicate at N = seqlen."""
    kb = rule.kblock
    nk = -(-capacity // kb)
    j = torch.arange(nk * kb, device=pos.device)
    ok = evaluate(spec.predicates[rule.context].expr, pos[:, :, None], j[None, None, :], capacity)
    ok = (j < seqlen.long()[:, None, None]) & valid[:, :, None] & ok  # (a constant context: a Python bool)
    rows = ok.view(*pos.shape, nk, kb).any(-1)
    return torch.einsum("btr,btk->brk", hot.to(torch.float32), rows.to(torch.float32)) > 0


def scores(rule: Selector, q: torch.Tensor, heads: torch.Tensor, group: int, hot: torch.Tensor,
           blocks: torch.Tensor, summaries: KeySummaries | None, given: Any,
           kv_heads: int) -> torch.Tensor:
    """[B, heads, query blocks, key blocks] scores of the rule (NaN: not a candidate), float32 (float64 for
    float64 inputs). q-bar: the mean of the step's rows in each query block."""
    hl = heads.long()
    kvh = hl // group
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if rule.given:
        s = given[:, hl].to(work)
    else:
        assert summaries is not None
        qs = q[:, hl].to(work)
        count = hot.sum(1).to(work).clamp(min=1)  # [B, query blocks]
        qm = torch.einsum("bhtd,btr->bhrd", qs, hot.to(work)) / count[:, None, :, None]
        lo, hi, mean = summaries.lo, summaries.hi, summaries.mean  # (16-bit ones widened where read)
        match rule.score:
            case "mean":
                s = _by_kv(lambda x: torch.matmul(x, mean.to(work).transpose(-1, -2)), qm, hl, group, kv_heads)
            case "quest":
                s = _by_kv(lambda x: quest_bound(x, lo.to(work), hi.to(work)), qm, hl, group, kv_heads)
            case "compressed":
                ok = torch.einsum("btr,brk->btk", hot.to(torch.float32), blocks.to(torch.float32)) > 0  # its block's
                w = _by_kv(lambda x: compressed_weights(x, mean.to(work), ok[:, None].repeat(1, 1, group, 1)),
                           qs, hl, group, kv_heads)
                s = torch.einsum("bhtk,btr->bhrk", w, hot.to(work))
            case _:
                raise AssertionError(rule.score)  # refused by `check_selectors`
    if rule.share:
        s = share_kv(s, kvh, kv_heads)
    return torch.where(blocks[:, None], s, float("nan"))


def _by_kv(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, hl: torch.Tensor, group: int, kv_heads: int) -> torch.Tensor:
    """fn applied to the rows x [B, nh, R, D] of heads `hl` grouped by KV head ([B, Hkv, group * R, D]), so
    that it reads each KV head's summaries once instead of a copy per query head: [B, nh, R, ...]."""
    B, _, R, D = x.shape
    full = torch.zeros((B, kv_heads * group, R, D), dtype=x.dtype, device=x.device)
    full[:, hl] = x
    out = fn(full.view(B, kv_heads, group * R, D))
    return out.view(B, kv_heads * group, R, *out.shape[3:])[:, hl]


TABLE_ENTRIES = 256  # a pack's picks (heads x query blocks x width, a power of two) the tables kernel takes


Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (PICK, SLIST, SCOUNT) of `decode._pick_tables`


@dataclass(frozen=True)
class Folded:
    """A topk's first stage (`_decode_topk`'s keys `ws`, of `splits` splits) left for the decode kernel's
    programs to merge (`Options.decode_fold_merge`): its picks are written by that kernel. `width`: the
    pack's list of picked blocks' width (what the split count reads); `consts`: the kernel's merge shapes."""

    ws: torch.Tensor
    splits: int
    width: int
    consts: dict[str, int]


FOLD_ENTRIES = 128  # a pack's rows x picks (powers of two) the decode kernel merges in its own registers


def select(spec: PatternSpec, pat: int, q: torch.Tensor, heads: torch.Tensor, packs: torch.Tensor, group: int,
           cache_seqlens: torch.Tensor, n_new: int, capacity: int, summaries: KeySummaries | None, given: Any,
           kv_heads: int) -> tuple[list[torch.Tensor], Tables | Folded | None]:
    """Per selector of predicate `pat`, its picks: int32 [B, H, query blocks, width], key block ids, -1
    padding and for the heads of other patterns (topk: width n; fraction and threshold: every key block);
    and where the selection's last launch also built them, the decode kernel's tables (PICK, SLIST,
    SCOUNT, as `decode._pick_tables` makes them), else None; or, `Options.decode_fold_merge` on a lone
    topk whose pack's picks are few, the first stage's keys (`Folded`): then the picks are written by the
    decode kernel, which the step launches next. `heads`: the heads of `pat` (ascending),
    `packs` them by KV head (`decode._packs`); the rows end at seqlen = cache_seqlens + n_new (clamped to
    the capacity).

    Off the PyTorch path, topk(n <= 64) by the mean rule takes two launches (`_fused`); the other rules
    score and pick with PyTorch (`candidates`, `scores`, prefill's `_pick`)."""
    sel = spec.selectors[pat]
    assert sel is not None
    B, H, nq, D = q.shape
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    seqlen: torch.Tensor | None = None
    out = []
    made: Tables | Folded | None = None
    for rule in sel.all:
        if _fusable(rule, q, summaries):
            assert summaries is not None
            entries = _pow2(packs.shape[1] * query_blocks(nq, rule.block) * int(rule.param))  # type: ignore[arg-type]
            picked, made = _fused(spec, rule, q, packs, group, cache_seqlens, n_new, capacity, summaries, kv_heads,
                                  heads.numel() == H, len(sel.all) == 1 and entries <= TABLE_ENTRIES)
            out.append(picked)
            continue
        if seqlen is None:
            seqlen = (cache_seqlens + n_new).clamp(max=capacity)
        rows = rows or step_rows(seqlen, nq, sel.block)
        pos, valid, hot = rows
        cand = candidates(spec, rule, pos, valid, hot, seqlen, capacity)
        s = scores(rule, q, heads, group, hot, cand, summaries, given, kv_heads)
        count = rule.param if rule.kind == "topk" else None
        picked = _pick(rule, s.reshape(-1, s.shape[-1]), 1.0 / math.sqrt(D), count)  # type: ignore[arg-type]
        if isinstance(count, int):  # width n whatever the blocks, as the fused selection's
            picked = torch.nn.functional.pad(picked, (0, count - picked.shape[-1]), value=-1)
        picked = picked.view(*s.shape[:3], -1).to(torch.int32)
        if heads.numel() < H:
            full = torch.full((B, H, *picked.shape[2:]), -1, dtype=torch.int32, device=q.device)
            full[:, heads] = picked
            picked = full
        out.append(picked)
    return out, made


def _fusable(rule: Selector, q: torch.Tensor, summaries: KeySummaries | None) -> bool:
    """The fused selection applies: off the PyTorch path, topk(n <= 64) by the mean rule without share=kv,
    float32 or 16-bit summaries, a head_dim that is a power of two of at least 16."""
    n = rule.param
    return (not _torch_path(q) and rule.kind == "topk" and rule.score == "mean" and not rule.share
            and not rule.given and isinstance(n, int) and n <= 64 and summaries is not None
            and summaries.mean.dtype != torch.float64 and _d_pad(q.shape[-1]) == q.shape[-1])


def _fused(spec: PatternSpec, rule: Selector, q: torch.Tensor, packs: torch.Tensor, group: int,
           cache_seqlens: torch.Tensor, n_new: int, capacity: int, summaries: KeySummaries, kv_heads: int,
           every_head: bool, build: bool) -> tuple[torch.Tensor, Tables | Folded | None]:
    """topk(n) by the mean rule: `_decode_topk` scores the summaries' mean keys in splits of the key blocks
    per (batch entry, KV head's pack of query heads, which share the summary loads) and keeps each split's
    best n per row, its candidates read off the context's run tables; `_decode_topk_merge` keeps the best n of
    the splits (and, `build`, builds the decode kernel's tables from them) in a launch of its own. Nothing the
    size of the cache is built or read but the summaries. (picks, tables or None); with
    `Options.decode_fold_merge`, where `build` and a pack's rows x picks are at most FOLD_ENTRIES, no merge
    launch: (picks to be written by the decode kernel, `Folded`)."""
    n = rule.param
    assert isinstance(n, int)
    B, H, nq, D = q.shape
    npacks, g = packs.shape
    qb = query_blocks(nq, rule.block)
    qb_pad = _pow2(qb)
    nk = -(-capacity // rule.kblock)
    np2 = _pow2(n)
    keys = current_options().decode_select_keys
    if keys and (keys < 16 or keys & (keys - 1)):
        raise ValueError(f"decode_select_keys must be 0 or a power of two of at least 16, got {keys}")
    # (registers: no spills on sm_90 at D = 128 with 32, 64 or 128, benchmarks/kernel_resources.py)
    bk = max(np2, keys or (32 if D <= 128 else 16))
    r = max(16, _pow2(g * qb_pad))
    rm = _pow2(g * qb_pad)
    bs, splits = _split_blocks(nk, bk, rm)
    off, runs, _, _ = tables.run_tables(spec, rule.context, capacity, rule.block, rule.kblock, q.device)
    ws = torch.empty(B * npacks * splits * rm * np2, dtype=torch.int64, device=q.device)
    scratch = torch.empty(B * npacks * splits * rm * bs, dtype=torch.int32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    sel = (torch.empty if every_head else functools.partial(torch.full, fill_value=-1))(
        (B, H, qb, n), dtype=torch.int32, device=q.device)
    made: Tables | Folded | None = None
    extra: dict[str, Any] = {}
    if build and current_options().decode_fold_merge and rm * np2 <= FOLD_ENTRIES:
        made = Folded(ws, splits, min(nk, g * qb * n), dict(N_SEL=n, T_QB_PAD=qb_pad, T_RM=rm, T_NP=np2,
                                                            T_SP=_pow2(splits)))
    elif build:  # PICK's rows of the pattern's heads are zeroed by the kernel; no other head's are read
        width = min(nk, g * qb * n)
        made = (torch.empty((B, H, qb, nk), dtype=torch.int8, device=q.device),
                torch.empty((B, npacks, width), dtype=torch.int32, device=q.device),
                torch.empty((B, npacks), dtype=torch.int32, device=q.device))
        extra = dict(PICK=made[0], SLIST=made[1], SCOUNT=made[2], SL=width, E_PAD=_pow2(g * qb * n))
    shapes = dict(QB=qb, QB_PAD=qb_pad, G=g, RM=rm, NP=np2)
    _decode_topk[(splits, B * npacks)](
        q, summaries.mean, cache_seqlens.contiguous(), packs, off, runs, ws, scratch,
        *q.stride()[:3], nq, n_new, capacity, nk, npacks, kv_heads, group, splits,
        PRED=spec.predicates[rule.context].kernel, SEL_B=rule.block, KB=rule.kblock, R=r, BK=bk, BS=bs, D=D,
        CH=min(16, rule.kblock & -rule.kblock), DOT_PREC=_dot_prec(q), IDX64=spec.idx64, num_warps=4, **shapes,
    )
    if not isinstance(made, Folded):
        _decode_topk_merge[(B * npacks,)](ws, packs, sel, nk, npacks, H, splits, N_SEL=n, SP=_pow2(splits),
                                          num_warps=4, **shapes, **extra)
    return sel, made


SELECT_SPLITS = 16  # a step's selection splits the key blocks at most this many ways (the merge's inputs)
SELECT_ROWS_BLOCKS = 8192  # a split's rows x key blocks, selected at once in registers


def _split_blocks(nk: int, bk: int, rows: int) -> tuple[int, int]:
    """(key blocks per split, splits) for `_decode_topk`: a power of two of at least one scoring tile (bk),
    large enough that at most SELECT_SPLITS splits cover the nk key blocks, so the merge's bitonic top-k
    stays small, and small enough that a split's rows x blocks fit its registers."""
    most = max(bk, SELECT_ROWS_BLOCKS // rows)
    bs = min(max(bk, _pow2(-(-nk // SELECT_SPLITS))), most)
    return bs, -(-nk // bs)


_CONSTS: dict[tuple[Any, ...], torch.Tensor] = {}


def device_ints(values: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small constant integer tensor on the device, cached: a step creates none from the host (a CUDA
    graph's capture could not copy it)."""
    key = (values, str(device), dtype)
    hit = _CONSTS.get(key)
    if hit is None:
        hit = _CONSTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return hit


def dense(spec: PatternSpec, pat: int, picks: list[torch.Tensor], capacity: int,
          merged: torch.Tensor | None = None) -> torch.Tensor:
    """int8 [B, H, query blocks, key blocks]: per head's row the selection case v of each key block (bit m:
    selector m picked it; 0: none), from the picks [B, H, query blocks, width] of `select` (heads of other
    patterns: -1, so 0), what the kernel and the CPU path read. `merged`: the picks already combined, where
    the caller has them."""
    sel = spec.selectors[pat]
    assert sel is not None
    nk = -(-capacity // sel.kblock)
    B, H, qb, _ = picks[0].shape
    if merged is None:
        merged = picks[0] if len(picks) == 1 else _combine(picks)
    return _sel_dense(merged.reshape(B * H, qb, -1), nk, cases=True).reshape(B, H, qb, nk).contiguous()


def pack_lists(pick: torch.Tensor, packs: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head pack) the key blocks some row of the pack picked, ascending: int32 [B, packs, L]
    (-1 padding, L = min(key blocks, width)) and their number int32 [B, packs]."""
    B, _, _, nk = pick.shape
    members = packs.long().clamp(min=0)
    hit = ((pick[:, members] != 0) & (packs >= 0)[None, :, :, None, None]).any(3).any(2)  # [B, packs, nk]
    kb = torch.arange(nk, device=pick.device)
    top = torch.topk(torch.where(hit, nk - kb, 0), min(nk, max(1, width)), dim=-1).values
    return torch.where(top > 0, nk - top, -1).to(torch.int32).contiguous(), hit.sum(-1).to(torch.int32).contiguous()
