"""Backward kernels: dQ per query block and dK/dV per key block over the same (and transposed) block tables.

The pattern's predicate, token layout and selected-block predicate arrive as in the forward kernels
(`PRED`, `LAYOUT`, `SEL_PRED`: constexpr @triton.jit functions or None).
"""

import triton
import triton.language as tl

from .fwd_kernels import _allowed_at, _block, _pair_ok, _segment_program, _stage_range


@triton.jit(do_not_specialize=["N"])
def _attn_bwd_pre(O, DO, LSE, DLSE, DELTA, LSE2, s_ob, s_oh, s_on, s_db, s_dh, s_dn, N, H,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dlse; lse2 = lse * log2(e), +inf for rows with no key."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    rows = offs_m < N
    mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None].to(tl.int64) * s_dn + offs_d[None, :], mask=mask, other=0.0)
    at = (b * H + h) * N + offs_m
    lse2, delta = _delta_lse2(o, do, LSE, DLSE, at, rows, HAS_DLSE)
    tl.store(DELTA + at, delta, mask=rows)
    tl.store(LSE2 + at, lse2, mask=rows)


@triton.jit
def _delta_lse2(o, do, LSE, DLSE, at, rows, HAS_DLSE: tl.constexpr):
    """(lse2, delta) of a tile's rows: lse * log2(e) (+inf for rows without a key or past the end, so P = 0
    there) and rowsum(dO * O) - dlse."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + at, mask=rows, other=0.0)
    lse = tl.load(LSE + at, mask=rows, other=float("-inf"))
    # a row without a key has P = 0 whatever delta is, but 0 * inf is NaN: an infinite dlse (a padding row
    # of a token layout's buffers) must not reach dS
    empty = lse == float("-inf")
    return tl.where(empty, float("inf"), lse * 1.4426950408889634), tl.where(empty, 0.0, delta)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn, N, qk_scale,
                 PRED: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DOT_PREC: tl.constexpr, IDX64: tl.constexpr, LAYOUT: tl.constexpr = None, k_desc=None,
                 v_desc=None, b=0, kvh=0, D_PAD: tl.constexpr = 16, TMA: tl.constexpr = 0, VAR=None, KSEG=None,
                 GATHERED: tl.constexpr = False):
    # MASKED: a PARTIAL block (the predicate per pair), else FULL; VAR: a selection case's rank (_allowed_at)
    # KSEG: key segments, kb one of them (as in _attn_tile)
    cols, kok, krows = _block(KSEG, kb, offs_n, N, BLOCK_N, LAYOUT, GATHERED)  # a token layout: rows -> tokens
    if TMA == 1:  # [B, H, N, D] descriptors: rows past N and columns past HEAD_DIM arrive as zeros
        kT = tl.trans(k_desc.load([b, kvh, kb * BLOCK_N, 0]).reshape(BLOCK_N, D_PAD))
        vT = tl.trans(v_desc.load([b, kvh, kb * BLOCK_N, 0]).reshape(BLOCK_N, D_PAD))
    else:
        if MASKED:
            kmask = kok[None, :] & (offs_d[:, None] < HEAD_DIM)
        else:
            kmask = offs_d[:, None] < HEAD_DIM
        kT = tl.load(k_base + krows[None, :].to(tl.int64) * s_kn + offs_d[:, None], mask=kmask, other=0.0)
        vT = tl.load(v_base + krows[None, :].to(tl.int64) * s_vn + offs_d[:, None], mask=kmask, other=0.0)
    s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        # the forward's pair predicate; key bounds from kok (a token layout's padding too), query rows >= 0
        p = tl.where(_pair_ok(offs_m, cols, N, PRED, IDX64, True, VAR) & kok[None, :] & (offs_m >= 0)[:, None], p, 0.0)
    dp = tl.dot(do, vT, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["N", "LSE_N", "NP"])
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE2, DELTA, HEAD_IDS, FULL_OFF, FULL_IDX, PART_OFF, PART_IDX,
                 s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_gb, s_gh, s_gn,
                 N, H, NH, GROUP, qk_scale, scale,
                 PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, INTERPRET: tl.constexpr,
                 CU=None, TILES=None, LSE_N=0, VARLEN: tl.constexpr = False, SEL_PRED: tl.constexpr = None, NP=0, SEL_VARS: tl.constexpr = False,
                 LAYOUT: tl.constexpr = None, k_desc=None, v_desc=None, TMA: tl.constexpr = 0,
                 O=None, LSE=None, DLSE=None, s_ob=0, s_oh=0, s_on=0,
                 PRE: tl.constexpr = False, HAS_DLSE: tl.constexpr = False, QSEG=None, KSEG=None, ORDER=None,
                 GATHERED: tl.constexpr = False):
    # SEL_PRED is not None: a dynamic pattern's per-(batch, head) tables, as in _attn_fwd
    # PRE: this tile's rows' delta and lse2 computed here (from O, dO, LSE, DLSE) and stored for the dK/dV
    # kernel launched after it, instead of by _attn_bwd_pre (BWD_FUSE_PRE)
    # TMA = 1: K and V tiles through host tensor descriptors (plain path: no layout, no packed documents)
    # NP: with LAYOUT, the rows the tables tile (N padded to whole tiles of the pattern's token layout)
    # GATHERED (with LAYOUT): every buffer, log-sum-exp and delta too, holds NP rows in the layout's order
    if VARLEN:  # packed documents, as in _attn_fwd: program r is tile r, indices local to its document
        row = tl.program_id(0)
        doc = tl.load(TILES + 2 * row)
        pid_m = tl.load(TILES + 2 * row + 1)
        start = tl.load(CU + doc).to(tl.int64)
        N = tl.load(CU + doc + 1) - tl.load(CU + doc)
        lse_n = LSE_N
    elif QSEG is not None:  # rows at given positions: program r is query segment r, as in _attn_fwd
        row, start, N = _segment_program(QSEG)
        pid_m = row
        lse_n = LSE_N
    elif ORDER is not None:  # program r runs query block ORDER[r], as in _attn_fwd
        pid_m = tl.load(ORDER + tl.program_id(0))
        row = pid_m
        start = 0
        lse_n = N
    elif LAYOUT is not None:
        pid_m = tl.cdiv(NP, BLOCK_M) - 1 - tl.program_id(0)
        row = pid_m
        start = 0
        lse_n = N
    else:
        pid_m = tl.cdiv(N, BLOCK_M) - 1 - tl.program_id(0)
        row = pid_m
        if SEL_PRED is not None:
            row = tl.program_id(1) * tl.cdiv(N, BLOCK_M) + pid_m
        start = 0
        lse_n = N
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = tl.load(HEAD_IDS + pid_bh % NH).to(tl.int64)
    kvh = h // GROUP
    offs_m, rows, qrow = _block(QSEG, pid_m, tl.arange(0, BLOCK_M), N, BLOCK_M, LAYOUT, GATHERED)  # -> tokens
    if GATHERED:  # rows read where they lie; offs_m, their tokens, for the predicate
        lse_n = NP
    else:
        qrow = offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    qmask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    row_off = qrow[:, None].to(tl.int64) + start
    q = tl.load(Q + b * s_qb + h * s_qh + row_off * s_qn + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + row_off * s_dn + offs_d[None, :], mask=qmask, other=0.0)
    at = (b * H + h) * lse_n + start + qrow
    if PRE:
        o = tl.load(O + b * s_ob + h * s_oh + row_off * s_on + offs_d[None, :], mask=qmask, other=0.0)
        lse2, delta = _delta_lse2(o, do, LSE, DLSE, at, rows, HAS_DLSE)
        tl.store(DELTA + at, delta, mask=rows)
        tl.store(LSE2 + at, lse2, mask=rows)
    else:
        lse2 = tl.load(LSE2 + at, mask=rows, other=float("inf"))
        delta = tl.load(DELTA + at, mask=rows, other=0.0)
    kstart = start
    if QSEG is not None:  # each key segment has its own offset (_bwd_dq_tile)
        kstart = 0
    k_base = K + b * s_kb + kvh * s_kh + kstart * s_kn
    v_base = V + b * s_vb + kvh * s_vh + kstart * s_vn
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for stage in tl.static_range(2):  # 0: FULL key blocks, 1: PARTIAL
        lo, hi = _stage_range(FULL_OFF, PART_OFF, row, stage)
        if stage == 1 and SEL_PRED is not None:  # selected blocks (bit 30) take the predicate SEL_PRED
            t = lo
            while t < hi:
                kb = tl.load(PART_IDX + t)
                if kb >= 1073741824:
                    if SEL_VARS:  # bits 24..29: the selection case's rank (a constexpr branch)
                        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb & 16777215, offs_m, offs_n,
                                          offs_d, s_kn, s_vn, N, qk_scale, SEL_PRED, True, BLOCK_N, HEAD_DIM, DOT_PREC,
                                          IDX64, VAR=(kb >> 24) & 63)
                    else:
                        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb - 1073741824, offs_m, offs_n,
                                          offs_d, s_kn, s_vn, N, qk_scale, SEL_PRED, True, BLOCK_N, HEAD_DIM, DOT_PREC,
                                          IDX64)
                else:
                    dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                      N, qk_scale, PRED, True, BLOCK_N, HEAD_DIM, DOT_PREC, IDX64)
                t += 1
        elif INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
            t = lo
            while t < hi:
                kb = tl.load((FULL_IDX if stage == 0 else PART_IDX) + t)
                dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                  N, qk_scale, PRED, stage == 1, BLOCK_N, HEAD_DIM, DOT_PREC, IDX64, LAYOUT, k_desc,
                                  v_desc, b.to(tl.int32), kvh.to(tl.int32), D_PAD, TMA, KSEG=KSEG, GATHERED=GATHERED)
                t += 1
        else:
            for t in range(lo, hi):
                kb = tl.load((FULL_IDX if stage == 0 else PART_IDX) + t)
                dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                  N, qk_scale, PRED, stage == 1, BLOCK_N, HEAD_DIM, DOT_PREC, IDX64, LAYOUT, k_desc,
                                  v_desc, b.to(tl.int32), kvh.to(tl.int32), D_PAD, TMA, KSEG=KSEG, GATHERED=GATHERED)
    dq *= scale
    tl.store(DQ + b * s_gb + h * s_gh + row_off * s_gn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mb, offs_m, offs_n, offs_d, s_qn, s_dn,
                   N, qk_scale, PRED: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, LAYOUT: tl.constexpr = None,
                   q_desc=None, do_desc=None, b=0, h=0, D_PAD: tl.constexpr = 16, TMA: tl.constexpr = 0,
                   VAR=None, QSEG=None, GATHERED: tl.constexpr = False):
    # rows past N (a ragged last query block, FULL or not) load q = dO = 0 and lse2 = +inf: P = 0 there;
    # with LAYOUT the query tile's physical rows map to the caller's tokens (padding rows: as past N);
    # QSEG: query segments, mb one of them (as in _attn_tile), its rows read at `at`
    rows, in_n, at = _block(QSEG, mb, offs_m, N, BLOCK_M, LAYOUT, GATHERED)
    if TMA == 1:  # [B, H, N, D] descriptors: rows past N and columns past HEAD_DIM arrive as zeros
        qT = tl.trans(q_desc.load([b, h, mb * BLOCK_M, 0]).reshape(BLOCK_M, D_PAD))
        do = do_desc.load([b, h, mb * BLOCK_M, 0]).reshape(BLOCK_M, D_PAD)
    else:
        qT = tl.load(q_base + at[None, :].to(tl.int64) * s_qn + offs_d[:, None],
                     mask=in_n[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        do = tl.load(do_base + at[:, None].to(tl.int64) * s_dn + offs_d[None, :],
                     mask=in_n[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    lse2 = tl.load(lse_base + at, mask=in_n, other=float("inf"))
    delta = tl.load(delta_base + at, mask=in_n, other=0.0)
    sT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # [BLOCK_N keys, BLOCK_M queries]
    pT = tl.math.exp2(sT - lse2[None, :])
    if MASKED:
        pT = tl.where(_allowed_at(rows[None, :], offs_n[:, None], N, PRED, IDX64, False, VAR) & in_n[None, :], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["N", "LSE_N", "NP", "NKT", "CHUNK", "CHUNKS", "NSLOT"])
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE2, DELTA, KV_IDS, QH_OFF, QH_IDX, FULL_OFF, FULL_IDX, PART_OFF, PART_IDX,
                   s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
                   s_gb, s_gh, s_gn, s_wb, s_wh, s_wn,
                   N, H, NKV, qk_scale, scale,
                   PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, ACCUM: tl.constexpr,
                   INTERPRET: tl.constexpr, CU=None, TILES=None, LSE_N=0, VARLEN: tl.constexpr = False,
                   QH_RANK=None, NH_SEL=0, SEL_PRED: tl.constexpr = None, NP=0, SEL_VARS: tl.constexpr = False,
                   LAYOUT: tl.constexpr = None, q_desc=None, do_desc=None, TMA: tl.constexpr = 0, QSEG=None, KSEG=None,
                   SPLIT: tl.constexpr = False, SLOTS=None, SLOT_ROWS=None, NSLOT=1, WS_K=None, WS_V=None, NKT=0,
                   CHUNK=0, CHUNKS=1, GATHERED: tl.constexpr = False):
    # SEL_PRED is not None: per-(batch, head) transposed tables, row (batch * NH_SEL + head's rank) * key blocks + key
    # block (QH_RANK: each listed query head's rank among the pattern's heads); bit 30 marks selected blocks
    # SPLIT: one axis of programs, the NSLOT * CHUNKS pieces of the split rows first (every slot's last piece
    # first, so the heavy rows start before the rest), then one program per row. SLOTS[(batch, kv slot) * NKT
    # + key block] >= 0 marks a split row (its workspace slot; SLOT_ROWS is the inverse, -1 for a slot no row
    # took): its work (query blocks times the group's heads, in loop order) is cut into pieces of
    # max(CHUNK, work / CHUNKS), each added into float32 workspace rows WS_K/WS_V[slot]
    # (`_attn_bwd_dkdv_merge` writes dK/dV); other rows run whole and write dK/dV themselves
    if VARLEN:  # packed documents: program r is key tile r (document, key block), indices local to it
        row = tl.program_id(0)
        doc = tl.load(TILES + 2 * row)
        pid_n = tl.load(TILES + 2 * row + 1)
        start = tl.load(CU + doc).to(tl.int64)
        N = tl.load(CU + doc + 1) - tl.load(CU + doc)
        lse_n = LSE_N
    elif KSEG is not None:  # rows at given positions: program r is key segment r, its query blocks query segments
        row, start, N = _segment_program(KSEG)
        pid_n = row
        lse_n = LSE_N
    else:
        pid_n = tl.program_id(0)
        row = pid_n
        start = 0
        lse_n = N
    pid_bh = tl.program_id(1)
    if SPLIT:
        p = tl.program_id(0)
        pieces = NSLOT * CHUNKS
        if p < pieces:  # a piece of a split row
            ws = p % NSLOT
            piece = CHUNKS - 1 - p // NSLOT
            flat = tl.load(SLOT_ROWS + ws)
        else:  # a whole row
            flat = p - pieces
            ws = tl.load(SLOTS + flat)
            piece = p * 0
        if (flat < 0) | ((p >= pieces) & (ws >= 0)):  # a slot no row took; a split row (its pieces run above)
            return
        pid_bh = flat // NKT
        pid_n = flat % NKT
        row = pid_n
    b = (pid_bh // NKV).to(tl.int64)
    slot = pid_bh % NKV
    kvh = tl.load(KV_IDS + slot).to(tl.int64)
    h_lo = tl.load(QH_OFF + slot)
    h_hi = tl.load(QH_OFF + slot + 1)
    if SPLIT:  # this program's share of the row's work: [a, e) in loop order (heads, FULL then PARTIAL blocks)
        a = h_lo * 0
        e = a + 2147483647
        pos = a
        if ws >= 0:
            total = h_lo * 0
            th = h_lo
            while th < h_hi:
                trow = _dkdv_row(row, th, pid_bh, pid_n, N, NKV, NH_SEL, QH_RANK, BLOCK_N, SEL_PRED)
                for stage in tl.static_range(2):
                    lo, hi = _stage_range(FULL_OFF, PART_OFF, trow, stage)
                    total += hi - lo
                th += 1
            size = tl.maximum(tl.cdiv(total, CHUNKS), CHUNK)
            a = piece * size
            e = tl.minimum(a + size, total)
        if a >= e:  # a split row's piece past its end
            return
    offs_n, kok, krow = _block(KSEG, pid_n, tl.arange(0, BLOCK_N), N, BLOCK_N, LAYOUT, GATHERED)  # -> tokens
    if GATHERED:  # as in _attn_bwd_dq: buffers of NP rows in the layout's order
        lse_n = NP
    else:
        krow = offs_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    kvmask = kok[:, None] & (offs_d[None, :] < HEAD_DIM)
    row_off = krow[:, None].to(tl.int64) + start
    k = tl.load(K + b * s_kb + kvh * s_kh + row_off * s_kn + offs_d[None, :], mask=kvmask, other=0.0)
    v = tl.load(V + b * s_vb + kvh * s_vh + row_off * s_vn + offs_d[None, :], mask=kvmask, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    th = h_lo
    while th < h_hi:  # the query heads of this key/value head's group that use predicate PRED
        h = tl.load(QH_IDX + th).to(tl.int64)
        qstart = start
        if KSEG is not None:  # each query segment has its own offset (_bwd_dkdv_tile)
            qstart = 0
        q_base = Q + b * s_qb + h * s_qh + qstart * s_qn
        do_base = DO + b * s_db + h * s_dh + qstart * s_dn
        lse_base = LSE2 + (b * H + h) * lse_n + qstart
        delta_base = DELTA + (b * H + h) * lse_n + qstart
        trow = _dkdv_row(row, th, pid_bh, pid_n, N, NKV, NH_SEL, QH_RANK, BLOCK_N, SEL_PRED)
        for stage in tl.static_range(2):  # 0: FULL query blocks, 1: PARTIAL
            lo, hi = _stage_range(FULL_OFF, PART_OFF, trow, stage)
            if SPLIT:  # the part of [lo, hi) inside [a, e)
                n = hi - lo
                lo, hi, pos = lo + tl.minimum(tl.maximum(a - pos, 0), n), lo + tl.minimum(tl.maximum(e - pos, 0), n), pos + n
            if stage == 1 and SEL_PRED is not None:  # selected blocks (bit 30) take the predicate SEL_PRED
                t = lo
                while t < hi:
                    mb = tl.load(PART_IDX + t)
                    if mb >= 1073741824:
                        if SEL_VARS:  # bits 24..29: the selection case's rank (a constexpr branch)
                            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mb & 16777215,
                                                    offs_m, offs_n, offs_d, s_qn, s_dn, N, qk_scale, SEL_PRED, True,
                                                    BLOCK_M, HEAD_DIM, DOT_PREC, IDX64, VAR=(mb >> 24) & 63)
                        else:
                            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                                    mb - 1073741824, offs_m, offs_n, offs_d, s_qn, s_dn, N, qk_scale,
                                                    SEL_PRED, True, BLOCK_M, HEAD_DIM, DOT_PREC, IDX64)
                    else:
                        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mb, offs_m, offs_n,
                                                offs_d, s_qn, s_dn, N, qk_scale, PRED, True, BLOCK_M, HEAD_DIM,
                                                DOT_PREC, IDX64)
                    t += 1
            elif INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
                t = lo
                while t < hi:
                    mb = tl.load((FULL_IDX if stage == 0 else PART_IDX) + t)
                    dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mb, offs_m, offs_n,
                                            offs_d, s_qn, s_dn, N, qk_scale, PRED, stage == 1, BLOCK_M, HEAD_DIM,
                                            DOT_PREC, IDX64, LAYOUT, q_desc, do_desc, b.to(tl.int32), h.to(tl.int32),
                                            D_PAD, TMA, QSEG=QSEG, GATHERED=GATHERED)
                    t += 1
            else:
                for t in range(lo, hi):
                    mb = tl.load((FULL_IDX if stage == 0 else PART_IDX) + t)
                    dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mb, offs_m, offs_n,
                                            offs_d, s_qn, s_dn, N, qk_scale, PRED, stage == 1, BLOCK_M, HEAD_DIM,
                                            DOT_PREC, IDX64, LAYOUT, q_desc, do_desc, b.to(tl.int32), h.to(tl.int32),
                                            D_PAD, TMA, QSEG=QSEG, GATHERED=GATHERED)
        th += 1
    dk_ptr = DK + b * s_gb + kvh * s_gh + row_off * s_gn + offs_d[None, :]
    dv_ptr = DV + b * s_wb + kvh * s_wh + row_off * s_wn + offs_d[None, :]
    if SPLIT:
        if ws >= 0:  # a piece: its partial sums into the row's float32 workspace
            at = ws.to(tl.int64) * (BLOCK_N * D_PAD) + tl.arange(0, BLOCK_N)[:, None] * D_PAD + offs_d[None, :]
            tl.atomic_add(WS_K + at, dk, sem="relaxed")
            tl.atomic_add(WS_V + at, dv, sem="relaxed")
        else:
            _dkdv_store(dk, dv, dk_ptr, dv_ptr, kvmask, scale, ACCUM)
    else:
        _dkdv_store(dk, dv, dk_ptr, dv_ptr, kvmask, scale, ACCUM)


@triton.jit
def _dkdv_row(row, th, pid_bh, pid_n, N, NKV, NH_SEL, QH_RANK, BLOCK_N: tl.constexpr, SEL_PRED: tl.constexpr):
    """The transposed table's row of listed query head `th`: the key block's own (static tables, shared by the
    heads), or with SEL_PRED the (batch, head)'s row of the per-head tables."""
    if SEL_PRED is not None:
        return ((pid_bh // NKV) * NH_SEL + tl.load(QH_RANK + th)) * tl.cdiv(N, BLOCK_N) + pid_n
    return row


@triton.jit
def _dkdv_store(dk, dv, dk_ptr, dv_ptr, kvmask, scale, ACCUM: tl.constexpr):
    """dK = scale * dk and dV = dv into the outputs' dtype; with ACCUM added to what they hold (a heads { }
    pattern whose group mixes predicates: one launch per predicate adds its share)."""
    dk *= scale
    if ACCUM:
        dk += tl.load(dk_ptr, mask=kvmask, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptr, mask=kvmask, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(dk_ptr.dtype.element_ty), mask=kvmask)
    tl.store(dv_ptr, dv.to(dv_ptr.dtype.element_ty), mask=kvmask)


@triton.jit(do_not_specialize=["N", "NKT"])
def _attn_bwd_dkdv_merge(DK, DV, WS_K, WS_V, SLOT_ROWS, KV_IDS, s_gb, s_gh, s_gn, s_wb, s_wh, s_wn, N, NKV, NKT,
                         scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                         ACCUM: tl.constexpr, LAYOUT: tl.constexpr = None, GATHERED: tl.constexpr = False):
    """dK/dV of the split rows of `_attn_bwd_dkdv` (SPLIT) from their float32 workspace rows; program: a
    workspace slot (SLOT_ROWS: its row, (batch * kv slot) * NKT + key block; -1, no row took it: exits)."""
    ws = tl.program_id(0)
    flat = tl.load(SLOT_ROWS + ws)
    if flat < 0:
        return
    pid_bh = flat // NKT
    pid_n = flat % NKT
    b = (pid_bh // NKV).to(tl.int64)
    kvh = tl.load(KV_IDS + pid_bh % NKV).to(tl.int64)
    _, kok, krow = _block(None, pid_n, tl.arange(0, BLOCK_N), N, BLOCK_N, LAYOUT, GATHERED)
    offs_d = tl.arange(0, D_PAD)
    kvmask = kok[:, None] & (offs_d[None, :] < HEAD_DIM)
    at = ws.to(tl.int64) * (BLOCK_N * D_PAD) + tl.arange(0, BLOCK_N)[:, None] * D_PAD + offs_d[None, :]
    row_off = krow[:, None].to(tl.int64)
    _dkdv_store(tl.load(WS_K + at), tl.load(WS_V + at), DK + b * s_gb + kvh * s_gh + row_off * s_gn + offs_d[None, :],
                DV + b * s_wb + kvh * s_wh + row_off * s_wn + offs_d[None, :], kvmask, scale, ACCUM)
