"""Dynamic selectors (topk / threshold): block scores, the selection, and per-(batch, head) tables.

Triton kernels average q and k over each block and score mean(q) . mean(k) (float32; tf32 products for
16-bit inputs), or take the caller's scores; the selector keeps its blocks among the context's (ties: lower
block index first); the picked blocks are merged with the static part's into per-(batch, head) tables for
the same forward and backward kernels. Selection is not differentiated: it is an argmax-like choice of
blocks, and gradients flow through the attention over the chosen blocks only, never through the scores.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from ..expr import evaluate_int
from .checks import _check, _need_scores
from .common import _INTERPRET, _d_pad, _dot_prec, _head_patterns, _heads, _on_device_of, _pow2, _torch_path
from .fwd_kernels import _online_softmax
from .options import current_options
from .tables import _sorted_tiles, _static_rows, block_tables

if TYPE_CHECKING:
    from .spec import PatternSpec, Selector


@triton.jit(do_not_specialize=["s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn"])  # type: ignore[untyped-decorator]
def _pool_kernel(Q, K, QM, KM, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, N, NB, HQ, HK, BLK: tl.constexpr,  # type: ignore[no-untyped-def]
                 CH: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Mean of each block of BLK tokens (the last may be shorter) of q and of k in one launch (program
    row b * (HQ + HK) + h: q's heads, then k's), float32, D padded with zeros."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // (HQ + HK)).to(tl.int64)
    h = (bh % (HQ + HK)).to(tl.int64)
    if h < HQ:
        base = Q + b * s_qb + h * s_qh
        s_n = s_qn.to(tl.int64)
        out = QM + ((b * HQ + h) * NB + kb) * D_PAD
    else:
        base = K + b * s_kb + (h - HQ) * s_kh
        s_n = s_kn.to(tl.int64)
        out = KM + ((b * HK + h - HQ) * NB + kb) * D_PAD
    offs_d = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for t0 in range(0, BLK, CH):
        rows = kb * BLK + t0 + tl.arange(0, CH)
        x = tl.load(base + rows[:, None].to(tl.int64) * s_n + offs_d[None, :],
                    mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(N - kb * BLK, BLK).to(tl.float32)
    tl.store(out + offs_d, acc / count)


@triton.jit  # type: ignore[untyped-decorator]
def _rule_key(s, kb, c, NB, BQ: tl.constexpr, BK: tl.constexpr):  # type: ignore[no-untyped-def]
    """int64 keys [BQ, BK] that order like the selection rule (as `_ordered_keys`): the float32 score's
    order-preserving bits, then NB - 1 - block (ties to the lower block); the lowest key where `c` is False."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 and 0.0 tie
    bits = s.to(tl.int32, bitcast=True)
    key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | (NB - 1 - kb).to(tl.int64)[None, :]
    return tl.where(c, key, tl.full([BQ, BK], -9223372036854775807, tl.int64) - 1)


@triton.jit  # type: ignore[untyped-decorator]
def _topk_keys(QM, KM, CAND, qm, s_row, qb, rmask, offs_d, k0, b, H, HKV, kvh, NB, BQ: tl.constexpr, BK: tl.constexpr,  # type: ignore[no-untyped-def]
               D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANGES: tl.constexpr, GIVEN: tl.constexpr, c_lo, c_hi):
    """The int64 keys of key blocks k0 .. k0 + BK for the program's rows (the lowest key off the context)."""
    kb = k0 + tl.arange(0, BK)
    kmask = kb < NB
    if GIVEN:
        s = tl.load(s_row + kb[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    else:
        km = tl.load(KM + ((b * HKV + kvh) * NB + kb[:, None]).to(tl.int64) * D_PAD + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
        s = tl.dot(qm, tl.trans(km), input_precision=DOT_PREC)
    if RANGES:  # each row's candidates are the key blocks [lo, hi) of CAND [NB, 2]
        c = (kb[None, :] >= c_lo[:, None]) & (kb[None, :] < c_hi[:, None])
    else:
        c = tl.load(CAND + qb[:, None].to(tl.int64) * NB + kb[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0) != 0
    if GIVEN:
        c = c & (s == s)
    return _rule_key(s, kb, c, NB, BQ, BK)


@triton.jit  # type: ignore[untyped-decorator]
def _topk_kernel(QM, KM, SCORES, CAND, SPAN, SEL, HEAD_IDS, NB, NH, H, HKV, GROUP, s_sb, s_sh, s_sq,  # type: ignore[no-untyped-def]
                 N_SEL: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, D_PAD: tl.constexpr,
                 DOT_PREC: tl.constexpr, RANGES: tl.constexpr, GIVEN: tl.constexpr, FILL: tl.constexpr = False):
    """topk's selection fused with its scores: per query block the N_SEL key blocks of highest score
    mean(q) . mean(k) among the candidates, ties to the lower block. Scores become int64 keys that order like
    the rule (as `_ordered_keys`: the score's order-preserving bits, then NB - 1 - block; the lowest key off
    the context), and each row keeps its N_SEL largest keys in registers: per tile of BK key blocks, the
    tile's largest key replaces the row's smallest kept one while it is larger (at most N_SEL rounds).
    SEL [B * NH, NB, NP] int32: the picked blocks, unordered, -1 where fewer than N_SEL candidates (or
    NaN scores, which `_pick` drops too). SPAN: per program the key blocks [lo, hi) holding its candidates;
    CAND: per row [lo, hi) (RANGES) or the byte matrix of candidates (see `_spans`). With RANGES nothing
    but the dot fixes the tiles' register layout, so the rounds run without layout conversions.
    GIVEN: the scores are the caller's SCORES [B, H, NB, NB] (last stride 1) instead, NaN ones not candidates
    (as `_ordered_keys` has it)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    h = tl.load(HEAD_IDS + pid_bh % NH)
    kvh = h // GROUP
    qb = pid_q * BQ + tl.arange(0, BQ)
    rmask = qb < NB
    offs_d = tl.arange(0, D_PAD)
    if GIVEN:
        s_row = SCORES + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + qb[:, None].to(tl.int64) * s_sq
        qm = s_row  # (unused)
    else:
        qm = tl.load(QM + ((b * H + h) * NB + qb[:, None]).to(tl.int64) * D_PAD + offs_d[None, :],
                     mask=rmask[:, None], other=0.0)
        s_row = SCORES  # (unused)
    cols = tl.arange(0, NP)
    lowest = tl.full([BQ, NP], -9223372036854775807, tl.int64) - 1
    # columns past N_SEL hold the largest key: never the smallest kept, never replaced
    best = tl.where(cols[None, :] < N_SEL, lowest, tl.full([BQ, NP], 9223372036854775807, tl.int64))
    c_lo = 0  # (unused without RANGES)
    c_hi = 0
    if RANGES:
        c_lo = tl.load(CAND + 2 * qb, mask=rmask, other=0)
        c_hi = tl.load(CAND + 2 * qb + 1, mask=rmask, other=0)
    k0 = tl.load(SPAN + 2 * pid_q)
    k1 = tl.load(SPAN + 2 * pid_q + 1)
    if FILL:  # the first tile fills every row by a bitonic top-NP (its largest keys, descending) in one go
        if k0 < k1:
            key = _topk_keys(QM, KM, CAND, qm, s_row, qb, rmask, offs_d, k0, b, H, HKV, kvh, NB, BQ, BK, D_PAD,
                             DOT_PREC, RANGES, GIVEN, c_lo, c_hi)
            best = tl.where(cols[None, :] < N_SEL, tl.topk(key, NP, dim=1), best)
            k0 += BK
    while k0 < k1:  # (the CPU interpreter cannot take loaded scalars as range() bounds)
        key = _topk_keys(QM, KM, CAND, qm, s_row, qb, rmask, offs_d, k0, b, H, HKV, kvh, NB, BQ, BK, D_PAD,
                         DOT_PREC, RANGES, GIVEN, c_lo, c_hi)
        low = tl.min(best, 1)
        top = tl.max(key, 1)
        more = tl.max((top > low).to(tl.int32), 0)
        while more > 0:
            slot = tl.min(tl.where(best == low[:, None], cols[None, :], NP), 1)
            best = tl.where((cols[None, :] == slot[:, None]) & (top > low)[:, None], top[:, None], best)
            key = tl.where(key == top[:, None], tl.full([BQ, BK], -9223372036854775807, tl.int64) - 1, key)
            low = tl.min(best, 1)
            top = tl.max(key, 1)
            more = tl.max((top > low).to(tl.int32), 0)
        k0 += BK
    hi = (best >> 32).to(tl.int32)
    score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    valid = (best != lowest) & (score == score) & (cols[None, :] < N_SEL)
    blk = (NB - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
    tl.store(SEL + (pid_bh * NB + qb[:, None]).to(tl.int64) * NP + cols[None, :], tl.where(valid, blk, -1),
             mask=rmask[:, None])


@triton.jit  # type: ignore[untyped-decorator]
def _score_kernel(QM, KM, CAND, S, HEAD_IDS, q0, ROWS, NB, NH, H, HKV, GROUP,  # type: ignore[no-untyped-def]
                  BQ: tl.constexpr, BK: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Block scores mean(q) . mean(k) of query blocks q0 .. q0 + ROWS against every key block, written as
    int64 keys that order like the selection rule (see `_ordered_keys`); the lowest key where the
    selector's context allows no pair (not a candidate). S: [B * NH, ROWS, NB] int64."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    h = tl.load(HEAD_IDS + pid_bh % NH)
    kvh = h // GROUP
    r = pid_q * BQ + tl.arange(0, BQ)
    rmask = r < ROWS
    qb = q0 + r
    offs_d = tl.arange(0, D_PAD)
    qm = tl.load(QM + ((b * H + h) * NB + qb[:, None]).to(tl.int64) * D_PAD + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    k0 = 0
    while k0 < NB:  # (the CPU interpreter cannot take scalar arguments as range() bounds)
        kb = k0 + tl.arange(0, BK)
        kmask = kb < NB
        km = tl.load(KM + ((b * HKV + kvh) * NB + kb[:, None]).to(tl.int64) * D_PAD + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
        s = tl.dot(qm, tl.trans(km), input_precision=DOT_PREC)
        both = rmask[:, None] & kmask[None, :]
        c = tl.load(CAND + qb[:, None].to(tl.int64) * NB + kb[None, :], mask=both, other=0)
        s = _rule_key(s, kb, c != 0, NB, BQ, BK)
        tl.store(S + (pid_bh * ROWS + r[:, None]).to(tl.int64) * NB + kb[None, :], s, mask=both)
        k0 += BK


@triton.jit  # type: ignore[untyped-decorator]
def _merge_kernel(SEL, ST_KT, ST_CLS, K1, C1, VD, CNT, OFF, FIDX, PIDX, NQT, NKT, NQB, W, WS, K1N, ROWS,  # type: ignore[no-untyped-def]
                  RQ: tl.constexpr, RK: tl.constexpr, BR: tl.constexpr, SC: tl.constexpr, WC: tl.constexpr,
                  LOG: tl.constexpr, WRITE: tl.constexpr, CASES: tl.constexpr):
    """One dynamic pattern's per-(batch, head) tables from the picks, no host round trip: program (tiles,
    bh) merges, per query tile, the static part's row (ST_KT/ST_CLS [NQT, WS]: key tiles, 0 FULL / 1
    PARTIAL, -1 padding) with the tiles of the picked blocks (SEL [bh, NQB, W], -1 padding), each tile
    once: a static tile whose block is picked is dropped, the picked tile classified by its selection
    case's pattern P_v (K1: the cases' tiles as sorted keys (case rank * NQT + query tile) * NKT + key
    tile, C1: 0 FULL, else what a PARTIAL entry adds to its key tile; not found: dropped). CASES: several
    selectors, each pick `block | (v - 1) << 24` and VD [2**k - 1] the rank of case v (-1: allows nothing).
    WRITE=False counts the FULL and PARTIAL entries per row into CNT [2, ROWS + 1] (at row + 1, zeros at 0);
    WRITE=True writes them at OFF (CNT's cumsum): FULL plain, PARTIAL with C1's flag (bit 30) added."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    qt = pid * BR + tl.arange(0, BR)
    rmask = qt < NQT
    qb = qt // RQ
    row = bh * NQT + qt
    sel_row = (bh * NQB + qb).to(tl.int64) * W
    nf = tl.zeros([BR], dtype=tl.int32)
    npart = tl.zeros([BR], dtype=tl.int32)
    if WRITE:
        nf = tl.load(OFF + row, mask=rmask, other=0)
        npart = tl.load(OFF + ROWS + 1 + row, mask=rmask, other=0)
    # the static part's entries whose block is not picked
    s0 = 0
    while s0 < WS:  # (the CPU interpreter cannot take scalar arguments as range() bounds)
        sc = s0 + tl.arange(0, SC)
        smask = rmask[:, None] & (sc < WS)[None, :]
        kt = tl.load(ST_KT + qt[:, None].to(tl.int64) * WS + sc[None, :], mask=smask, other=-1)
        cls = tl.load(ST_CLS + qt[:, None].to(tl.int64) * WS + sc[None, :], mask=smask, other=0)
        kbs = tl.where(kt >= 0, kt // RK, -2)
        hit = tl.zeros([BR, SC], dtype=tl.int32)
        w0 = 0
        while w0 < W:
            wc = w0 + tl.arange(0, WC)
            sb = tl.load(SEL + sel_row[:, None] + wc[None, :], mask=rmask[:, None] & (wc < W)[None, :], other=-1)
            if CASES:
                sb = tl.where(sb >= 0, sb & 16777215, -1)
            hit = tl.maximum(hit, tl.max((kbs[:, :, None] == sb[:, None, :]).to(tl.int32), 2))
            w0 += WC
        keep = (kt >= 0) & (hit == 0)
        f = (keep & (cls == 0)).to(tl.int32)
        p = (keep & (cls == 1)).to(tl.int32)
        if WRITE:
            tl.store(FIDX + nf[:, None] + tl.cumsum(f, 1) - f, kt, mask=f != 0)
            tl.store(PIDX + npart[:, None] + tl.cumsum(p, 1) - p, kt, mask=p != 0)
        nf += tl.sum(f, 1)
        npart += tl.sum(p, 1)
        s0 += SC
    # the picked blocks' tiles, classified by P1
    w0 = 0
    while w0 < W:
        wc = w0 + tl.arange(0, WC)
        sb = tl.load(SEL + sel_row[:, None] + wc[None, :], mask=rmask[:, None] & (wc < W)[None, :], other=-1)
        case = tl.zeros([BR, WC], dtype=tl.int64)
        if CASES:
            case = tl.load(VD + (sb >> 24), mask=sb >= 0, other=-1).to(tl.int64)
            sb = tl.where(sb >= 0, sb & 16777215, -1)
        for d in tl.static_range(RK):
            kt = sb * RK + d
            ok = (sb >= 0) & (kt < NKT) & (case >= 0)
            key = (case * NQT + qt[:, None]) * NKT + kt
            lo = tl.zeros([BR, WC], dtype=tl.int64)
            hi = tl.zeros([BR, WC], dtype=tl.int64) + K1N
            for _ in tl.static_range(LOG):  # lower bound of key in K1
                mid = (lo + hi) // 2
                below = tl.load(K1 + mid, mask=mid < K1N, other=9223372036854775807) < key
                lo = tl.where(below, mid + 1, lo)
                hi = tl.where(below, hi, mid)
            inside = ok & (lo < K1N)
            found = inside & (tl.load(K1 + lo, mask=inside, other=-1) == key)
            c1 = tl.load(C1 + lo, mask=found, other=-1)
            f = (found & (c1 == 0)).to(tl.int32)
            p = (found & (c1 > 0)).to(tl.int32)
            if WRITE:
                tl.store(FIDX + nf[:, None] + tl.cumsum(f, 1) - f, kt, mask=f != 0)
                tl.store(PIDX + npart[:, None] + tl.cumsum(p, 1) - p, kt + c1, mask=p != 0)
            nf += tl.sum(f, 1)
            npart += tl.sum(p, 1)
        w0 += WC
    if not WRITE:
        tl.store(CNT + 1 + row, nf, mask=rmask)
        tl.store(CNT + ROWS + 2 + row, npart, mask=rmask)
        two = tl.arange(0, 2)
        tl.store(CNT + two * (ROWS + 1), tl.zeros([2], dtype=tl.int32), mask=(two < 2) & (pid == 0) & (bh == 0))


@triton.jit  # type: ignore[untyped-decorator]
def _group_rows(Q, HLIST, row, n, h0, b, qb, f0, N, s_qb, s_qh, s_qn, BLK: tl.constexpr, GMAX: tl.constexpr,  # type: ignore[no-untyped-def]
                M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CONSEC: tl.constexpr):
    """Rows f0 .. f0 + M of a selection row's query block, its heads' queries stacked (GQA packing): row f is
    token qb * BLK + f % BLK of head HLIST[row, f // BLK] (n heads listed; CONSEC: they are h0, h0 + 1, ...,
    no table read). (q [M, D_PAD] in Q's dtype, zeros past the heads, N or HEAD_DIM; the rows' mask)."""
    f = f0 + tl.arange(0, M)
    j = f // BLK
    tok = qb * BLK + f % BLK
    ok = (j < n) & (tok < N)
    if CONSEC:
        h = (h0 + j).to(tl.int64)
    else:
        h = tl.load(HLIST + row * GMAX + j, mask=j < n, other=0).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + tok[:, None].to(tl.int64) * s_qn + offs_d[None, :],
                mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return q, ok


@triton.jit  # type: ignore[untyped-decorator]
def _compressed_lse_kernel(Q, KM, CAND, SPAN, LSE, HLIST, HCOUNT, KVH, q0, ROWS, N, NK, NR, HKV, s_qb, s_qh, s_qn,  # type: ignore[no-untyped-def]
                           qk_scale, BLK: tl.constexpr, GMAX: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANGES: tl.constexpr,
                           STAGES: tl.constexpr, INTERPRET: tl.constexpr, CONSEC: tl.constexpr):
    """The compressed rule's first pass: each query's base-2 log-sum-exp of qk_scale * q . k-bar over its query
    block's candidate mean keys KM [B, HKV, NK, D_PAD] (Q's dtype), +inf for a query past N (its weights: 0).
    Program (M rows of `_group_rows`, query block q0 + ROWS - 1 - program 1: the latest, under causal the
    longest, first, selection row b * NR + row); LSE [B * NR, ROWS, GMAX * BLK] float32. Only the key blocks
    [lo, hi) of SPAN are read; RANGES: they are the candidates, else CAND [blocks, NK] bytes say which are."""
    r = ROWS - 1 - tl.program_id(1)
    pid = tl.program_id(2)
    qb = q0 + r
    b = (pid // NR).to(tl.int64)
    row = pid % NR
    n = tl.load(HCOUNT + row)
    f0 = tl.program_id(0) * M
    if f0 < n * BLK:
        q, ok = _group_rows(Q, HLIST, row, n, tl.load(HLIST + row * GMAX), b, qb, f0, N, s_qb, s_qh, s_qn, BLK, GMAX, M,
                            HEAD_DIM, D_PAD, CONSEC)
        km_base = KM + (b * HKV + tl.load(KVH + row)) * NK * D_PAD
        lo = tl.load(SPAN + 2 * qb)
        hi = tl.load(SPAN + 2 * qb + 1)
        m = tl.full([M], float("-inf"), dtype=tl.float32)  # the running max of the scaled logits
        acc = tl.zeros([M], dtype=tl.float32)
        # with RANGES only the last tile of keys can hold non-candidates (past hi): the others go unmasked
        full = lo + (hi - lo) // BK * BK if RANGES else lo
        if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
            k0 = lo
            while k0 < full:
                m, acc = _lse_step(m, acc, q, km_base, CAND, qb, k0, hi, NK, qk_scale, BK, D_PAD, DOT_PREC, False, False)
                k0 += BK
            while k0 < hi:
                m, acc = _lse_step(m, acc, q, km_base, CAND, qb, k0, hi, NK, qk_scale, BK, D_PAD, DOT_PREC, True, RANGES)
                k0 += BK
        else:
            for k0 in tl.range(lo, full, BK, num_stages=STAGES):
                m, acc = _lse_step(m, acc, q, km_base, CAND, qb, k0, hi, NK, qk_scale, BK, D_PAD, DOT_PREC, False, False)
            for k0 in tl.range(full, hi, BK, num_stages=STAGES):  # (RANGES: one tile at most)
                m, acc = _lse_step(m, acc, q, km_base, CAND, qb, k0, hi, NK, qk_scale, BK, D_PAD, DOT_PREC, True, RANGES)
        f = f0 + tl.arange(0, M)
        lse = tl.where(ok & (acc > 0), m + tl.math.log2(acc), float("inf"))
        tl.store(LSE + (pid.to(tl.int64) * ROWS + r) * (GMAX * BLK) + f, lse, mask=f < GMAX * BLK)


@triton.jit  # type: ignore[untyped-decorator]
def _lse_step(m, acc, q, km_base, CAND, qb, k0, hi, NK, qk_scale, BK: tl.constexpr, D_PAD: tl.constexpr,  # type: ignore[no-untyped-def]
              DOT_PREC: tl.constexpr, MASK: tl.constexpr, RANGES: tl.constexpr):
    """The running (max of qk_scale * s, sum of 2**(qk_scale * s - max)) of each row after the mean keys
    k0 .. k0 + BK, s = q . k-bar: the forward's online softmax step with the scale folded into the exponent.
    MASK: keys past hi or (not RANGES) off CAND are no candidates."""
    kb = k0 + tl.arange(0, BK)
    if MASK:
        ok = kb < hi
        if not RANGES:
            ok = ok & (tl.load(CAND + qb.to(tl.int64) * NK + kb, mask=ok, other=0) != 0)
        km = tl.load(km_base + kb[:, None].to(tl.int64) * D_PAD + tl.arange(0, D_PAD)[None, :], mask=ok[:, None],
                     other=0.0)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(km), input_precision=DOT_PREC), float("-inf"))
    else:
        km = tl.load(km_base + kb[:, None].to(tl.int64) * D_PAD + tl.arange(0, D_PAD)[None, :])
        s = tl.dot(q, tl.trans(km), input_precision=DOT_PREC)
    _, _, acc, m = _online_softmax(s, m, acc, qk_scale, True, True)
    return m, acc


@triton.jit  # type: ignore[untyped-decorator]
def _compressed_score_kernel(Q, KM, CAND, SPAN, LSE, S, HLIST, HCOUNT, KVH, q0, ROWS, N, NK, NR, HKV, s_qb, s_qh,  # type: ignore[no-untyped-def]
                             s_qn, qk_scale, BLK: tl.constexpr, GMAX: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                             RANGES: tl.constexpr, STAGES: tl.constexpr, INTERPRET: tl.constexpr,
                             CONSEC: tl.constexpr):
    """The compressed rule's second pass: per candidate key block, the softmax weights 2**(qk_scale * q . k-bar
    - lse) (`_compressed_lse_kernel`'s) summed over the selection row's queries of the block: with share=kv
    the query heads of a KV head, else one head. Program (BK key blocks from the query block's first
    candidate, query block q0 + program 1, selection row b * NR + row): the key blocks' mean keys stay, the
    rows go by M (transposed, [BK, M]: the sum over queries is along a tile row), one store;
    S [B * NR, ROWS, NK] float32, zeros where no candidate."""
    r = tl.program_id(1)
    pid = tl.program_id(2)
    qb = q0 + r
    b = (pid // NR).to(tl.int64)
    row = pid % NR
    n = tl.load(HCOUNT + row)
    lo = tl.load(SPAN + 2 * qb)
    hi = tl.load(SPAN + 2 * qb + 1)
    k0 = lo + tl.program_id(0) * BK
    if k0 < hi:
        kb = k0 + tl.arange(0, BK)
        ok = kb < hi
        if not RANGES:
            ok = ok & (tl.load(CAND + qb.to(tl.int64) * NK + kb, mask=ok, other=0) != 0)
        km_base = KM + (b * HKV + tl.load(KVH + row)) * NK * D_PAD
        km = tl.load(km_base + kb[:, None].to(tl.int64) * D_PAD + tl.arange(0, D_PAD)[None, :], mask=ok[:, None],
                     other=0.0)
        lse_base = LSE + (pid.to(tl.int64) * ROWS + r) * (GMAX * BLK)
        h0 = tl.load(HLIST + row * GMAX)
        acc = tl.zeros([BK], dtype=tl.float32)
        if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
            f0 = 0
            while f0 < n * BLK:
                acc += _weight_step(Q, HLIST, row, n, h0, b, qb, f0, N, s_qb, s_qh, s_qn, km, lse_base, qk_scale,
                                    BLK, GMAX, M, HEAD_DIM, D_PAD, DOT_PREC, CONSEC)
                f0 += M
        else:
            for f0 in tl.range(0, n * BLK, M, num_stages=STAGES):
                acc += _weight_step(Q, HLIST, row, n, h0, b, qb, f0, N, s_qb, s_qh, s_qn, km, lse_base, qk_scale,
                                    BLK, GMAX, M, HEAD_DIM, D_PAD, DOT_PREC, CONSEC)
        tl.store(S + (pid.to(tl.int64) * ROWS + r) * NK + kb, tl.where(ok, acc, 0.0), mask=kb < hi)


@triton.jit  # type: ignore[untyped-decorator]
def _weight_step(Q, HLIST, row, n, h0, b, qb, f0, N, s_qb, s_qh, s_qn, km, lse_base, qk_scale, BLK: tl.constexpr,  # type: ignore[no-untyped-def]
                 GMAX: tl.constexpr, M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                 CONSEC: tl.constexpr):
    """[BK]: the weights of rows f0 .. f0 + M (`_group_rows`) on the mean keys km [BK, D_PAD], summed."""
    q, _ = _group_rows(Q, HLIST, row, n, h0, b, qb, f0, N, s_qb, s_qh, s_qn, BLK, GMAX, M, HEAD_DIM, D_PAD, CONSEC)
    f = f0 + tl.arange(0, M)
    lse = tl.load(lse_base + f, mask=f < n * BLK, other=float("inf"))
    z = tl.dot(km, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    return tl.sum(tl.math.exp2(z - lse[None, :]), 1)


_CANDIDATES: dict[tuple[Any, ...], Any] = {}  # _candidates' masks and _spans' triples


def _candidates(spec: PatternSpec, ctx: int, n: int, blk: int, device: torch.device | str,
                kblk: int | None = None) -> torch.Tensor:
    """[query blocks, key blocks] bool: key blocks (of `kblk` tokens, default `blk`) where the selector's
    context allows at least one pair (cached). One byte per block pair: 1 / (blk * kblk) of a dense mask."""
    kblk = kblk or blk
    key = (spec.key, ctx, n, blk, kblk, str(device))
    hit: torch.Tensor | None = _CANDIDATES.get(key)
    if hit is None:
        nb = -(-n // blk)
        f_off, f_idx, p_off, p_idx = block_tables(spec, n, blk, kblk, device, ctx)
        hit = torch.zeros((nb, -(-n // kblk)), dtype=torch.bool, device=device)
        for off, idx in ((f_off, f_idx), (p_off, p_idx)):
            rows = torch.repeat_interleave(torch.arange(nb, device=device), (off[1:] - off[:-1]).long())
            hit[rows, idx.long()] = True
        if len(_CANDIDATES) >= 16:
            _CANDIDATES.pop(next(iter(_CANDIDATES)))
        _CANDIDATES[key] = hit
    return hit


def _spans(spec: PatternSpec, ctx: int, n: int, blk: int, rows: int,
           device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What `_topk_kernel` reads of the context, cached: (cand, span, ranges). Where every query block's
    candidates are consecutive key blocks (causal, windows, sinks...), ranges=True and cand is int32
    [blocks, 2], each row's [lo, hi); else cand is the [blocks, blocks] byte matrix. span: int32 [groups, 2],
    per group of `rows` query blocks the key blocks [lo, hi) holding all its candidates (causal: half)."""
    key = (spec.key, "span", ctx, n, blk, rows, str(device))
    hit: tuple[torch.Tensor, torch.Tensor, bool] | None = _CANDIDATES.get(key)
    if hit is None:
        cand = _candidates(spec, ctx, n, blk, device)
        nb = cand.shape[0]
        cols = torch.arange(nb, device=device)
        lo = torch.where(cand, cols, nb).amin(1)
        hi = torch.where(cand, cols + 1, 0).amax(1)
        count = cand.sum(1)
        ranges = bool(((count == 0) | (count == hi - lo)).all())
        groups = -(-nb // rows)
        pad = groups * rows - nb
        g_lo = torch.cat([lo, lo.new_full((pad,), nb)]).view(groups, rows).amin(1)
        g_hi = torch.cat([hi, hi.new_zeros(pad)]).view(groups, rows).amax(1)
        span = torch.stack([torch.minimum(g_lo, g_hi), g_hi], 1).to(torch.int32).contiguous()
        if ranges:
            cand = torch.stack([torch.minimum(lo, hi), hi], 1).to(torch.int32).contiguous()
        hit = (cand if ranges else cand.view(torch.uint8), span, ranges)
        if len(_CANDIDATES) >= 16:
            _CANDIDATES.pop(next(iter(_CANDIDATES)))
        _CANDIDATES[key] = hit
    return hit


def _pool_torch(x: torch.Tensor, blk: int, work: torch.dtype) -> torch.Tensor:
    """Block means of x [B, H, N, D] in `work`: [B, H, ceil(N / blk), D], the last block maybe shorter.
    Summed in `work` as read, no widened or padded copy of x (NSA's compressed branch pools K and V of
    64k tokens each call); differentiable."""
    B, H, N, D = x.shape
    full = N // blk
    sums = x[:, :, :full * blk].reshape(B, H, full, blk, D).sum(3, dtype=work)
    if N > full * blk:
        sums = torch.cat([sums, x[:, :, full * blk:].sum(2, keepdim=True, dtype=work)], 2)
    counts = torch.clamp(N - torch.arange(sums.shape[2], device=x.device) * blk, max=blk).to(work)
    return sums / counts[:, None]


def _block_scores(spec: PatternSpec, sel: Selector, q: torch.Tensor, k: torch.Tensor, pooled: tuple[torch.Tensor, torch.Tensor],
                  heads: torch.Tensor, group: int, q0: int, rows: int) -> torch.Tensor:
    """Scores of query blocks q0 .. q0 + rows for `heads` by selector `sel`: [B * nh, rows, blocks]; NaN
    marks key blocks outside the context. float32 (float64 for float64 inputs on the CPU path)."""
    blk, ctx = sel.block, sel.context
    B, H, N, D = q.shape
    nb = -(-N // blk)
    cand = _candidates(spec, ctx, N, blk, q.device)
    nh = heads.numel()
    qm, km = pooled
    if _torch_path(q):
        s = torch.matmul(qm[:, heads.long(), q0:q0 + rows], km[:, heads.long() // group].transpose(-1, -2))
        return torch.where(cand[q0:q0 + rows], s.reshape(B * nh, rows, nb), float("nan"))
    d_pad = qm.shape[-1]
    s = torch.empty((B * nh, rows, nb), dtype=torch.int64, device=q.device)
    bq = 32 if d_pad <= 128 else 16
    _score_kernel[(-(-rows // bq), B * nh)](
        qm, km, cand.view(torch.uint8), s, heads, q0, rows, nb, nh, H, k.shape[1], group,
        BQ=bq, BK=64, D_PAD=d_pad, DOT_PREC=_dot_prec(q),
    )
    return s


def _fused(rule: Selector, q: torch.Tensor) -> bool:
    """The compressed rule scores in `_compressed_score_kernel` (off the PyTorch path, square blocks): only
    [rows, blocks] sums are stored, no query's weights."""
    return rule.score == "compressed" and not rule.given and rule.kblock == rule.block and not _torch_path(q)


def _rule_keys(rule: Selector, q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor,
               group: int) -> tuple[torch.Tensor, ...]:
    """What `_rule_scores` reads of the keys for `heads`, the same for every chunk of query blocks (so built
    once per selection): k-bar (mean, compressed), k (max), the key blocks' element-wise (min, max) (quest);
    nothing for given scores."""
    if rule.given:
        return ()
    B, _, N, D = k.shape
    kblk = rule.kblock
    nb = -(-N // kblk)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kvh = heads.long() // group
    match rule.score:
        case "max":
            return (k[:, kvh].to(work),)
        case "quest":
            kt = k[:, kvh].to(work)
            pad = nb * kblk - N
            hi = torch.nn.functional.pad(kt, (0, 0, 0, pad), value=float("-inf")).view(B, -1, nb, kblk, D).amax(3)
            lo = torch.nn.functional.pad(kt, (0, 0, 0, pad), value=float("inf")).view(B, -1, nb, kblk, D).amin(3)
            return lo, hi
        case "compressed" if _fused(rule, q):  # the scoring kernels read each KV head's means, in q's dtype
            return (_key_means(k, kblk).to(q.dtype),)
        case _:  # mean, compressed
            return (_pool_torch(k, kblk, work)[:, kvh],)


def _rule_scores(spec: PatternSpec, rule: Selector, q: torch.Tensor, k: torch.Tensor, scores: Any,  # a tensor where given
                 heads: torch.Tensor, group: int, q0: int, rows: int,
                 keys: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Block scores of query blocks q0 .. q0 + rows by a named rule: [B * nh, rows, blocks] for `heads`, or
    with share=kv [B * Hkv, rows, blocks] per KV head (a KV head none of `heads` reads: zeros), NaN off the
    context; float32 (float64 for float64 inputs). q-bar is a query block's mean query:

    mean: q-bar . k-bar (k-bar the key block's mean key); max: the largest q-bar . k_j over the key block;
    quest: sum over d of max(q-bar_d * max_j k_jd, q-bar_d * min_j k_jd), Quest's bound on q-bar . k_j;
    compressed: the attention the block's queries pay to the pooled key k-bar in a softmax over the
    candidate pooled keys (scale 1 / sqrt(head_dim)), summed over the block's queries (NSA). given: the
    caller's. share=kv: the sum over the heads of the KV head (among `heads`), which all its heads select by.
    `keys`: `_rule_keys`' (built here when None)."""
    B, H, N, D = q.shape
    blk, kblk = rule.block, rule.kblock
    nb = -(-N // kblk)  # key blocks
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    hl = heads.long()
    kvh = hl // group
    cand = _candidates(spec, rule.context, N, blk, q.device, kblk)[q0:q0 + rows]
    keys = _rule_keys(rule, q, k, heads, group) if keys is None else keys
    if _fused(rule, q):
        s = _compressed_scores(spec, rule, q, keys[0], heads, group, q0, rows)
        return torch.where(cand, s.view(B, -1, rows, nb), float("nan")).reshape(-1, rows, nb)
    if rule.given:
        s = scores[:, hl, q0:q0 + rows].to(work)
    else:
        qm = _pool_torch(q[:, hl, q0 * blk:(q0 + rows) * blk], blk, work)  # (this chunk's query blocks)
        pad = nb * kblk - N
        match rule.score:
            case "mean":
                s = torch.matmul(qm, keys[0].transpose(-1, -2))
            case "max":
                logits = torch.nn.functional.pad(torch.matmul(qm, keys[0].transpose(-1, -2)), (0, pad), value=float("-inf"))
                s = logits.view(B, hl.numel(), rows, nb, kblk).amax(-1)
            case "quest":
                s = quest_bound(qm, *keys)
            case _:  # compressed
                t0, t1 = q0 * blk, min(N, (q0 + rows) * blk)
                p = compressed_weights(q[:, hl, t0:t1].to(work), keys[0], cand[torch.arange(t1 - t0, device=q.device) // blk])
                p = torch.nn.functional.pad(p, (0, 0, 0, rows * blk - (t1 - t0)))
                s = p.view(B, hl.numel(), rows, blk, nb).sum(3)
    if rule.share:
        s = _kv_sums(s, kvh, k.shape[1])
    return torch.where(cand, s, float("nan")).reshape(-1, rows, nb)


def quest_bound(qm: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quest's score: sum over d of max(q_d * max_j k_jd, q_d * min_j k_jd), an upper bound on q . k_j over
    a key block, from the block's element-wise min `lo` and max `hi` [..., blocks, D]; qm [..., rows, D]."""
    return torch.matmul(qm.clamp(min=0), hi.transpose(-1, -2)) - torch.matmul((-qm).clamp(min=0), lo.transpose(-1, -2))


def compressed_weights(q: torch.Tensor, km: torch.Tensor, ok: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The compressed rule's per-query part: each query's softmax (scale 1 / sqrt(head_dim)) over the mean
    keys km [..., blocks, D] of its candidates `ok` [..., rows, blocks]: [..., rows, blocks], zeros for a
    query without candidates (the caller sums it over a query block). `scale` (the attention call's) serves
    the token selectors' scores, a softmax over single keys (`tokens.token_scores`)."""
    z = torch.matmul(q, km.transpose(-1, -2))
    z = z / math.sqrt(q.shape[-1]) if scale is None else z * scale
    z = z.masked_fill(~ok, float("-inf"))
    top = z.amax(-1, keepdim=True)
    e = torch.exp(z - torch.where(torch.isinf(top), 0.0, top))
    return e / torch.clamp(e.sum(-1, keepdim=True), min=torch.finfo(q.dtype).tiny)


def share_kv(s: torch.Tensor, kvh: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """share=kv: each head's scores [B, heads, ...] replaced by the sum over the heads of its KV head
    (`kvh`: each head's KV head), so that the heads of a KV head pick the same blocks."""
    return _kv_sums(s, kvh, kv_heads)[:, kvh]


def _kv_sums(s: torch.Tensor, kvh: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Scores [B, heads, ...] summed per KV head (`kvh`: each head's): [B, kv_heads, ...], zeros for a KV
    head no listed head reads."""
    return torch.zeros((s.shape[0], kv_heads, *s.shape[2:]), dtype=s.dtype, device=s.device).index_add_(1, kvh, s)


def _compressed_scores(spec: PatternSpec, rule: Selector, q: torch.Tensor, km: torch.Tensor, heads: torch.Tensor,
                       group: int, q0: int, rows: int) -> torch.Tensor:
    """The compressed rule off the PyTorch path: float32 [B * rows of the selection, rows, key blocks], rows of
    the selection the KV heads with share=kv, else `heads`; zeros off the candidates. km: the key means
    [B, Hkv, blocks, D_PAD] in q's dtype (`_key_means`). Two launches: each query's log-sum-exp over its
    candidates (`_compressed_lse_kernel`, O(queries) floats kept), then per run of key blocks the weights
    summed over the block's queries of every head of the selection row at once (`_compressed_score_kernel`);
    16-bit operands with float32 sums on tensor cores, IEEE float32 for float32 inputs."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    B, H, N, D = q.shape
    hkv, nk, d_pad = km.shape[1], km.shape[2], km.shape[3]
    cand, span, ranges = _spans(spec, rule.context, N, rule.block, 1, q.device)
    hlist, hcount, kvh = _score_rows(heads, H, hkv, group, bool(rule.share))
    nr, gmax = hlist.shape
    blk = rule.block
    opts = current_options()
    lse = torch.empty((B * nr, rows, gmax * blk), dtype=torch.float32, device=q.device)
    out = torch.zeros((B * nr, rows, nk), dtype=torch.float32, device=q.device)
    args = (q, km, cand, span)
    tail = (hlist, hcount, kvh, q0, rows, N, nk, nr, hkv, *q.stride()[:3], 1.4426950408889634 / math.sqrt(D))
    consec = not rule.share or heads.numel() == H  # each row's heads h0, h0 + 1, ... (`_score_rows`)
    meta = dict(BLK=blk, GMAX=gmax, HEAD_DIM=D, D_PAD=d_pad, DOT_PREC=_dot_prec(q), RANGES=ranges, INTERPRET=_INTERPRET,
                CONSEC=consec)
    m, bk, warps, stages = score_tiles(opts.compressed_lse_tiles, d_pad, gmax * blk, nk)
    _compressed_lse_kernel[(-(-gmax * blk // m), rows, B * nr)](*args, lse, *tail, M=m, BK=bk, STAGES=stages,
                                                                 num_warps=warps, **meta)
    m, bk, warps, stages = score_tiles(opts.compressed_sum_tiles, d_pad, gmax * blk, nk)
    _compressed_score_kernel[(-(-nk // bk), rows, B * nr)](*args, lse, out, *tail, M=m, BK=bk, STAGES=stages,
                                                           num_warps=warps, **meta)
    return out


def score_tiles(tiles: tuple[int, int, int, int], d_pad: int, rows: int, keys: int) -> tuple[int, int, int, int]:
    """A compressed scoring kernel's (query rows, key blocks, warps, stages) per tile from an option's: halved
    past head_dim 128 (registers), no larger than the rows of a selection row or the key blocks (powers of
    two, at least 16: the dot's smallest)."""
    m, bk, warps, stages = tiles
    if d_pad > 128:
        m, bk = m // 2, bk // 2
    return max(16, min(m, _pow2(rows))), max(16, min(bk, _pow2(keys))), warps, stages


def _score_rows(heads: torch.Tensor, H: int, hkv: int, group: int,
                share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query heads of each row of a compressed selection (int32, built on the device): with share=kv per
    KV head its heads among `heads`, listed first in [hkv, group], their count and the KV head; else one
    row per head of `heads`."""
    if not share:
        return heads.view(-1, 1).int(), torch.ones_like(heads, dtype=torch.int32), (heads // group).int()
    member = torch.zeros(H, dtype=torch.bool, device=heads.device).index_fill_(0, heads.long(), True).view(hkv, group)
    first = torch.sort((~member).to(torch.int8), dim=1, stable=True).indices  # members first, in head order
    base = torch.arange(hkv, device=heads.device)[:, None] * group
    return (base + first).int().contiguous(), member.sum(1).int(), torch.arange(hkv, dtype=torch.int32, device=heads.device)


def _key_means(k: torch.Tensor, blk: int) -> torch.Tensor:
    """Block means of k: float32 [B, Hkv, blocks, D_PAD], zero columns past D (one `_pool_kernel` launch)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    B, hk, N, D = k.shape
    nb = -(-N // blk)
    km = torch.empty((B, hk, nb, _d_pad(D)), dtype=torch.float32, device=k.device)
    _pool_kernel[(nb, B * hk)](k, k, km, km, *k.stride()[:3], *k.stride()[:3], N, nb, 0, hk, BLK=blk,
                               CH=min(64, blk & -blk), HEAD_DIM=D, D_PAD=km.shape[-1], num_warps=current_options().pool_warps)
    return km


def _pooled(q: torch.Tensor, k: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block means of q and k: float32 [B, heads, blocks, D_PAD] (one Triton launch), or the PyTorch path's."""
    if _torch_path(q):
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        return _pool_torch(q, blk, work), _pool_torch(k, blk, work)
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    B, H, N, D = q.shape
    hk = k.shape[1]
    nb = -(-N // blk)
    d_pad = _d_pad(D)
    qm = torch.empty((B, H, nb, d_pad), dtype=torch.float32, device=q.device)
    km = torch.empty((B, hk, nb, d_pad), dtype=torch.float32, device=q.device)
    _pool_kernel[(nb, B * (H + hk))](q, k, qm, km, *q.stride()[:3], *k.stride()[:3],
                                     N, nb, H, hk, BLK=blk, CH=min(64, blk & -blk), HEAD_DIM=D,
                                     D_PAD=d_pad, num_warps=current_options().pool_warps)
    return qm, km


def _ordered_keys(s: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like the rule: higher score first, ties lower block first; non-candidates (NaN)
    lowest. High word: the float32 score's bits made order-preserving as a signed integer; low word:
    blocks - 1 - block index."""
    nb = s.shape[-1]
    s = torch.where(s == 0, 0.0, s).contiguous()  # -0.0 and 0.0 tie
    bits = s.view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    keys = (ordered << 32) | (nb - 1 - torch.arange(nb, device=s.device))
    return torch.where(torch.isnan(s), torch.iinfo(torch.int64).min, keys)


def _scores_of(keys: torch.Tensor) -> torch.Tensor:
    """The float32 scores inside `_ordered_keys`' keys (NaN for non-candidates)."""
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return torch.where(keys == torch.iinfo(torch.int64).min, float("nan"), bits.view(torch.float32))


def _pick(sel: Selector, s: torch.Tensor, scale: float, count: int | None = None) -> torch.Tensor:
    """The selector's rule on one chunk [rows, blocks] of scores (NaN: not a candidate) or of
    `_ordered_keys` keys (int64): [rows, width] int64, per row the blocks kept, -1 padding (topk: width
    min(n, blocks), `count` the n of a count that depends on N; threshold and fraction: blocks, kept
    blocks first). A fraction p keeps ceil(p * c) of a row's c candidates, p read as the decimal written."""
    kind, raw = sel.kind, (sel.param if count is None else count)
    assert isinstance(raw, int | float), "a count that depends on N comes evaluated, as `count`"
    param = raw
    rows, nb = s.shape
    if s.dtype == torch.float64:
        order = torch.sort(torch.where(torch.isnan(s), float("-inf"), s), dim=-1, descending=True, stable=True).indices
        if kind == "topk":
            order = order[:, :min(int(param), nb)]
        ss = torch.gather(s, 1, order)
    else:
        keys = s if s.dtype == torch.int64 else _ordered_keys(s.float())
        if kind == "topk":
            picked = torch.topk(keys, min(int(param), nb), dim=-1, sorted=True).values
        else:
            picked = torch.sort(keys, dim=-1, descending=True).values
        order = nb - 1 - (picked & 0xFFFFFFFF)
        ss = _scores_of(picked)
    valid = ~torch.isnan(ss)
    if kind == "fraction":
        share = Fraction(repr(float(param)))
        keep = -(-valid.sum(-1, keepdim=True) * share.numerator // share.denominator)
        valid = valid & (torch.arange(nb, device=s.device) < keep)
    if kind == "threshold":
        z = torch.where(valid, ss.double() * scale, float("-inf"))
        top = z[:, :1]
        e = torch.where(valid, torch.exp(z - torch.where(torch.isinf(top), 0.0, top)), 0.0)
        mass = e / torch.clamp(e.sum(-1, keepdim=True), min=1e-300)
        before = torch.cumsum(mass, -1) - mass
        valid = valid & (before < float(param))
    return torch.where(valid, order, -1)


def _selection(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, scores: Any,  # a tensor where given
               heads: torch.Tensor, group: int) -> torch.Tensor:
    """The blocks the selectors of `pat` pick: int32 [B * nh, query blocks, width], per (batch * nh + the
    head's rank among `heads`, query block) the key blocks kept, unordered, -1 padding. With several
    selectors each block once, as `block | (v - 1) << 24`, v the set of selectors that picked it."""
    sel = spec.selectors[pat]
    assert sel is not None
    picks = [_select(spec, s, q, k, scores, heads, group) for s in sel.all]
    if len(picks) == 1:
        return picks[0]
    if -(-q.shape[2] // sel.kblock) >= 1 << 24:
        raise ValueError(f"'{spec.name}' has several selectors: at most {(1 << 24) - 1} key blocks, got {-(-q.shape[2] // sel.kblock)}")
    return _combine(picks)


def _combine(picks: list[torch.Tensor]) -> torch.Tensor:
    """Several selectors' picks [rows, query blocks, width_m] as one list per row, each block once, tagged
    with the set v (bit m: selector m) of selectors that picked it: `block | (v - 1) << 24`, -1 padding.
    Sorting (block, selector) codes puts a block's picks side by side (at most one per selector)."""
    n = len(picks)
    none = 1 << 62
    codes = torch.cat([torch.where(p >= 0, p.long() * n + m, none) for m, p in enumerate(picks)], -1)
    codes = torch.sort(codes, -1).values
    valid = codes < none
    blk = codes // n
    bit = torch.where(valid, 1 << (codes % n), 0)
    v = bit.clone()
    for d in range(1, n):
        v[..., :-d] |= torch.where((blk[..., d:] == blk[..., :-d]) & valid[..., d:], bit[..., d:], 0)
    first = torch.ones_like(valid)
    first[..., 1:] = blk[..., 1:] != blk[..., :-1]
    return torch.where(valid & first, blk | ((v - 1) << 24), -1).to(torch.int32).contiguous()


def _select(spec: PatternSpec, rule: Selector, q: torch.Tensor, k: torch.Tensor, scores: Any,  # a tensor where given
            heads: torch.Tensor, group: int) -> torch.Tensor:
    """The blocks one selector picks for `heads`, as `_selection` (one selector).

    topk (n <= 64) on the GPU and in the interpreter: one pooling launch (none for score=given) and
    `_topk_kernel`, no host round trip; score=compressed likewise picks from its kernels' sums (where they
    fit one chunk). Otherwise (PyTorch path, float64 given scores, threshold, larger n) scores are chunked
    over query blocks (at most ~2**24 at once) and `_pick` applies the rule; threshold reads its widest row
    back to size the result."""
    kind, param, blk, given, ctx = rule.kind, rule.param, rule.block, rule.given, rule.context
    B, H, N, D = q.shape
    nk = -(-N // rule.kblock)  # key blocks (nb: query blocks)
    count = None
    if kind == "topk":  # a count that depends on N: its value here (the requirements keep it >= 1)
        count = param if isinstance(param, int) else evaluate_int(param, N)  # type: ignore[arg-type]
    nb = -(-N // blk)
    nh = heads.numel()
    plain = rule.score == "mean" and not rule.share and rule.kblock == blk  # the Triton pooling and fused top-k
    if (plain and count is not None and count <= 64 and not _torch_path(q)  # (larger n: registers)
            and not (given and scores.dtype == torch.float64)):  # (float64 scores: sorted in float64)
        if given:
            scores = scores if scores.stride(-1) == 1 else scores.contiguous()
            qm = km = scores
            d_pad = 16
            strides = scores.stride()[:3]
        else:
            qm, km = _pooled(q, k, blk)
            d_pad = qm.shape[-1]
            strides = (0, 0, 0)
        return _fused_topk(spec, ctx, N, blk, count, qm, km, scores if given else qm, strides, heads, H, k.shape[1],
                           group, d_pad, _dot_prec(q), bool(given))
    # compressed off the PyTorch path keeps only [rows, blocks] sums; the other rules a row's pairs or weights
    fused = _fused(rule, q)
    chunk = max(1, (1 << 24) // max(1, B * (k.shape[1] if fused and rule.share else nh) * (nb if plain or fused else max(nk, N))))
    if fused and count is not None and count <= 64 and chunk >= nb:  # the sums in one go, picked by `_topk_kernel`
        s = _compressed_scores(spec, rule, q, _rule_keys(rule, q, k, heads, group)[0], heads, group, 0, nb)
        nr = s.shape[0] // B
        rows_of = _heads(0, 0, nr, q.device)  # (0 .. nr - 1, cached)
        s = s.view(B, nr, nb, nk)
        sel = _fused_topk(spec, ctx, N, blk, count, s, s, s, s.stride()[:3], rows_of, nr, nr, 1, 16, "ieee", True)
        if rule.share:  # picked once per KV head: each head takes its KV head's
            sel = sel.view(B, nr, nb, -1)[:, heads.long() // group].reshape(B * nh, nb, -1).contiguous()
        return sel
    out = []
    pooled = None if given or not plain else _pooled(q, k, blk)
    keys = None if plain else _rule_keys(rule, q, k, heads, group)  # the key side, once for every chunk
    for q0 in range(0, nb, chunk):
        rows = min(chunk, nb - q0)
        if not plain:
            s = _rule_scores(spec, rule, q, k, scores, heads, group, q0, rows, keys)
        elif given:
            cand = _candidates(spec, ctx, N, blk, q.device)[q0:q0 + rows]
            s = scores[:, heads.long(), q0:q0 + rows]
            s = torch.where(cand, s if s.dtype == torch.float64 else s.float(), float("nan")).reshape(B * nh, rows, nb)
        else:
            s = _block_scores(spec, rule, q, k, pooled, heads, group, q0, rows)  # type: ignore[arg-type]  # not given: pooled
        out.append(_pick(rule, s.reshape(-1, nk), 1.0 / math.sqrt(D), count).view(s.shape[0], rows, -1))
    sel = torch.cat(out, 1)
    if rule.share and not plain:  # picked once per KV head: each head takes its KV head's
        sel = sel.view(B, k.shape[1], nb, -1)[:, heads.long() // group].reshape(B * nh, nb, -1)
    if kind != "topk":  # kept blocks come first in each row: cut the columns no row uses
        sel = sel[..., :max(1, int((sel >= 0).sum(-1).max()))]
    return sel.to(torch.int32).contiguous()


def _fused_topk(spec: PatternSpec, ctx: int, N: int, blk: int, count: int, qm: torch.Tensor, km: torch.Tensor,
                scores: torch.Tensor, strides: tuple[int, ...], heads: torch.Tensor, H: int, hkv: int, group: int,
                d_pad: int, prec: str, given: bool) -> torch.Tensor:
    """`_topk_kernel`'s picks (int32 [B * heads, query blocks, pow2(count)], -1 padding) of the block means
    qm, km [B, heads, blocks, d_pad] (given False) or of the scores [B, H, blocks, blocks] at `strides`
    (given True; NaN: not a candidate), for the rows `heads` of H, among the candidates of context `ctx`."""
    B, nb = scores.shape[0], -(-N // blk)
    bq = current_options().topk_rows
    np2 = _pow2(count)
    sel = torch.empty((B * heads.numel(), nb, np2), dtype=torch.int32, device=scores.device)
    cand, span, ranges = _spans(spec, ctx, N, blk, bq, scores.device)
    # key blocks per tile: register pressure (ptxas sm_90: no spills with these)
    bk = 16 if d_pad > 128 else current_options().topk_keys if ranges else 32
    _topk_kernel[(-(-nb // bq), B * heads.numel())](
        qm, km, scores, cand, span, sel, heads, nb, heads.numel(), H, hkv, group, *strides,
        N_SEL=count, NP=np2, BQ=bq, BK=bk, D_PAD=d_pad, DOT_PREC=prec, RANGES=ranges, GIVEN=given,
        FILL=current_options().topk_fill and np2 <= bk, num_warps=current_options().topk_warps,
    )
    return sel


def _sel_dense(sel: torch.Tensor, nb: int, cases: bool = False) -> torch.Tensor:
    """`_selection`'s picks as a bool [rows, query blocks, nb] block mask; with `cases` (several selectors)
    as int8, per block the set v of selectors that picked it (0: none)."""
    hit = torch.zeros((*sel.shape[:2], nb + 1), dtype=torch.int8, device=sel.device)
    if cases:
        hit.scatter_(2, torch.where(sel < 0, nb, sel & 0xFFFFFF).long(), torch.where(sel < 0, 0, (sel >> 24) + 1).to(torch.int8))
        return hit[..., :nb]
    hit.scatter_(2, torch.where(sel < 0, nb, sel).long(), 1)
    return hit[..., :nb] > 0


def _dynamic_tables(spec: PatternSpec, pat: int, sel: torch.Tensor, B: int, nh: int, N: int, bm: int, bn: int,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(batch, head) CSR tables for the kernel: the static part's blocks and the selected ones merged,
    each block once. Offsets [B * nh * query tiles + 1] (absolute), FULL entries plain, PARTIAL entries
    with bit 30 set where the block is selected (masked with P1, else with the static part P0).

    Two `_merge_kernel` launches around a cumsum, nothing read back: the index arrays are sized by an upper
    bound (static entries + every picked tile) and only [0, offsets[-1]) is meaningful."""
    rec = spec.selectors[pat]
    assert rec is not None
    blk = rec.block
    nqt, nkt = -(-N // bm), -(-N // bn)
    rq, rk = blk // bm, rec.kblock // bn  # the tiles divide the selector's blocks
    st_kt, st_cls, n_full, n_part = _static_rows(spec, pat, N, bm, bn, device)
    keys1, cls1, vd = _case_tiles(spec, rec, N, bm, bn, device)
    bh, nqb, w = sel.shape
    rows = bh * nqt
    cnt = torch.empty((2, rows + 1), dtype=torch.int32, device=device)
    f_idx = torch.empty(max(1, bh * (n_full + nqt * w * rk)), dtype=torch.int32, device=device)
    p_idx = torch.empty(max(1, bh * (n_part + nqt * w * rk)), dtype=torch.int32, device=device)
    br = 16
    args = (sel, st_kt, st_cls, keys1, cls1, vd)
    meta = dict(RQ=rq, RK=rk, BR=br, SC=16, WC=16, LOG=max(1, keys1.numel().bit_length()), CASES=bool(rec.more))
    grid = (-(-nqt // br), bh)
    _merge_kernel[grid](*args, cnt, cnt, f_idx, p_idx, nqt, nkt, nqb, w, st_kt.shape[1], keys1.numel(), rows,
                        WRITE=False, **meta)
    off = torch.cumsum(cnt, 1, dtype=torch.int32)
    _merge_kernel[grid](*args, cnt, off, f_idx, p_idx, nqt, nkt, nqb, w, st_kt.shape[1], keys1.numel(), rows,
                        WRITE=True, **meta)
    return off[0], f_idx, off[1], p_idx


def _case_tiles(spec: PatternSpec, sel: Selector, n: int, bm: int, bn: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `_merge_kernel` classifies a picked tile with (cached): the distinct selection cases' tiles as
    sorted int64 keys (rank * query tiles + query tile) * key tiles + key tile, what each adds to a
    PARTIAL entry (0: FULL; bit 30, and with a dispatching predicate the rank in bits 24..29), and the
    rank of each case v = 1 .. 2**k - 1 (int32, -1: the case allows nothing)."""
    key = (spec.key, "cases", sel.cases, sel.dispatch is not None, n, bm, bn, str(device))
    hit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = _CANDIDATES.get(key)
    if hit is None:
        distinct = sorted({c for c in sel.cases if c >= 0})
        nqt, nkt = -(-n // bm), -(-n // bn)
        if sel.dispatch is not None and nkt >= 1 << 24:
            raise ValueError(f"'{spec.name}': its selection cases need fewer than {1 << 24} key tiles, got {nkt}")
        keys = [torch.zeros(0, dtype=torch.int64, device=device)]
        flags = [torch.zeros(0, dtype=torch.int32, device=device)]
        for d, pred in enumerate(distinct):
            k1, c1 = _sorted_tiles(spec, pred, n, bm, bn, device)
            keys.append(k1 + d * nqt * nkt)
            flags.append(torch.where(c1 == 0, 0, (1 << 30) + (d << 24 if sel.dispatch is not None else 0)).to(torch.int32))
        vd = case_ranks(sel)
        k_all, f_all = torch.cat(keys), torch.cat(flags)
        if not k_all.numel():  # (a pointer for the kernel; K1N = 0 reads nothing)
            k_all, f_all = torch.full((1,), -1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int32, device=device)
        hit = (k_all.contiguous(), f_all.contiguous(), torch.tensor(vd, dtype=torch.int32, device=device))
        if len(_CANDIDATES) >= 16:
            _CANDIDATES.pop(next(iter(_CANDIDATES)))
        _CANDIDATES[key] = hit
    return hit


def case_ranks(sel: Selector) -> list[int]:
    """Per selection case v = 1 .. 2**k - 1, the rank of its predicate among the distinct ones (ascending
    index; what a dispatching predicate takes), -1 where the case allows nothing."""
    distinct = sorted({c for c in sel.cases if c >= 0})
    return [distinct.index(c) if c >= 0 else -1 for c in sel.cases]


def sel_kernel(spec: PatternSpec, pat: int) -> tuple[Any, bool]:
    """The kernels' predicate for a dynamic pattern's selected tiles, and whether it dispatches on the
    selection case's rank (SEL_PRED, SEL_VARS)."""
    sel = spec.selectors[pat]
    assert sel is not None
    if sel.dispatch is not None:
        return sel.dispatch, True
    return spec.predicates[sel.selected].kernel, False


def _tiles(spec: PatternSpec, pat: int, block_m: int, block_n: int) -> tuple[int, int]:
    """Kernel tiles of a dynamic pattern divide its selector's block (a tile is selected or not)."""
    sel = spec.selectors[pat]
    if sel is None:
        return block_m, block_n
    return min(block_m, sel.block & -sel.block), min(block_n, sel.kblock & -sel.kblock)


def selected_blocks(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, *, scores: torch.Tensor | None = None,
                    layer: int | None = None) -> torch.Tensor:
    """The blocks the selectors pick, as a dense bool tensor [B, H, blocks, blocks] (heads with a static
    pattern: all False), for inspection and tests. Needs every dynamic pattern to share one block size."""
    patterns = _head_patterns(spec, layer)
    group = _check(spec, q, k, k, None, patterns)
    _need_scores(spec, q, scores)
    B, H, N, D = q.shape
    blks = {(s.block, s.kblock) for sel in spec.selectors if sel is not None for s in sel.all}
    if len(blks) != 1:
        raise ValueError("selected_blocks needs exactly one selector block size in the pattern")
    ((blk, kblk),) = blks
    nb, nk = -(-N // blk), -(-N // kblk)
    out = torch.zeros((B, H, nb, nk), dtype=torch.bool, device=q.device)
    for pat in range(spec.patterns):
        if spec.selectors[pat] is None:
            continue
        heads = _heads(pat, patterns, H, q.device)
        if heads.numel() == 0:
            continue
        sel = _sel_dense(_selection(spec, pat, q, k, scores, heads, group), nk, bool(spec.selectors[pat].more)) != 0  # type: ignore[union-attr]
        out[:, heads.long()] = sel.view(B, heads.numel(), nb, nk)
    return out


@_on_device_of
def _picks(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor | None, group: int,
           patterns: int | tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{pattern: `_selection`'s picks} for every dynamic pattern some head runs."""
    out: dict[int, torch.Tensor] = {}
    for pat in range(spec.patterns):
        if spec.selectors[pat] is not None:
            heads = _heads(pat, patterns, q.shape[1], q.device)
            if heads.numel():
                out[pat] = _selection(spec, pat, q, k, scores, heads, group)
    return out
