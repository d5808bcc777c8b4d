"""Decode kernels: a few query rows at the end of each sequence against a KV cache, split over key blocks.

`_decode_split`: one program per (head pack, batch entry, split). A pack is the query heads of one KV head
that share a predicate (GQA: their rows share every K and V load), times the Nq query rows. The rows'
key blocks come from the pattern's run tables (`tables.run_tables`, built once at the cache's capacity):
the query block of row i lists them, so the kernel reads a handful of runs, never the whole context. The
blocks a row's query block lists are numbered 0 .. T - 1 and split `SPLITS` ways; each program writes its
slice's partial softmax to a workspace and counts itself in on the pack's lock, and the last to arrive
merges the slices by log-sum-exp into the output (one launch per step; one split writes it directly).

The sequence length is read on the device (`SEQ[b] + NNEW`), so a launch's grid and arguments stay fixed
while lengths change (a CUDA graph replays it). Positions no row of the program may attend to are never
loaded (masked loads): a paged cache's unreachable pages may point anywhere.
"""

import triton
import triton.language as tl

from .fwd_kernels import _allowed_at, _merge_part, _online_softmax
from .selection import _rule_key


@triton.jit
def _decode_tile(acc, l_i, m_i, q, K, V, PT, b, kvh, kb, partial, rows_ok, ii, seqlen, offs_n, offs_dk, offs_dv,
                 s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ptb, PAGE, qk_scale, PRED: tl.constexpr,
                 BLOCK_N: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, PAGED: tl.constexpr,
                 PAGE_TILES: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, PICK=None, prow=None,
                 SEL_KB: tl.constexpr = 1, VAR=None, K_DESC=None, V_DESC=None, SEL_BLK=None, OWNER=None):
    """Key block kb into the running softmax of the rows `rows_ok` (query positions ii); `partial`: the
    predicate decides per pair, else every pair of the block (inside the sequence) is allowed. PICK (a
    dynamic pattern's static part): rows whose selection picked the tile's selector key block skip it (the
    selected loop takes it). VAR: a dispatching PRED's per-row case rank [rows, 1]. PAGE_TILES (a paged
    cache whose page holds whole tiles): the tile's rows are one page's, found by one table load, so the
    loads are addressed as a contiguous cache's (a per-key page gather costs registers and pipelining).
    K_DESC, V_DESC (a contiguous cache [B, HKV, CAP, D]): the tiles come whole through TMA, and the value
    rows no row attends to are zeroed after the load (past the length they may hold anything). SEL_BLK,
    OWNER (the top-n merged in the program, `_picked_rows`): what PICK says, from registers."""
    if PICK is not None:
        picked = tl.load(PICK + prow + kb * BLOCK_N // SEL_KB, mask=rows_ok, other=0)
        rows_ok = rows_ok & (picked == 0)
    if SEL_BLK is not None:
        rows_ok = rows_ok & ~_picked_rows(SEL_BLK, OWNER, kb * BLOCK_N // SEL_KB)
    cols = kb * BLOCK_N + offs_n
    ok = rows_ok[:, None] & (cols < seqlen)[None, :]
    ok = ok & (_allowed_at(ii[:, None], cols[None, :], seqlen, PRED, IDX64, True, VAR) | (partial == 0))
    col_ok = tl.max(ok.to(tl.int32), 0) > 0  # some row attends to this key: only those are read
    if K_DESC is not None:
        box = [b.to(tl.int32), kvh.to(tl.int32), kb * BLOCK_N, 0]
        k = K_DESC.load(box).reshape(BLOCK_N, offs_dk.shape[0])
    elif PAGED & PAGE_TILES:  # the tile lies in one page: one table entry, then in-page offsets (int32)
        first = kb * BLOCK_N
        page = tl.load(PT + b * s_ptb + tl.minimum(first, tl.maximum(seqlen - 1, 0)) // PAGE).to(tl.int64)
        at = first % PAGE + offs_n
        k_ptr = K + (page * s_kb + kvh * s_kh) + (at * s_kn)[:, None]
        v_ptr = V + (page * s_vb + kvh * s_vh) + (at * s_vn)[:, None]
    else:
        if PAGED:
            page = tl.load(PT + b * s_ptb + cols // PAGE, mask=col_ok, other=0).to(tl.int64)
            k_rows = page * s_kb + (cols % PAGE).to(tl.int64) * s_kn + kvh * s_kh
            v_rows = page * s_vb + (cols % PAGE).to(tl.int64) * s_vn + kvh * s_vh
        else:
            k_rows = b * s_kb + kvh * s_kh + cols.to(tl.int64) * s_kn
            v_rows = b * s_vb + kvh * s_vh + cols.to(tl.int64) * s_vn
        k_ptr = K + k_rows[:, None]
        v_ptr = V + v_rows[:, None]
    if K_DESC is None:
        k = tl.load(k_ptr + offs_dk[None, :], mask=col_ok[:, None] & (offs_dk[None, :] < DQK), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(ok, s, float("-inf"))
    p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i, qk_scale, False, True)
    if V_DESC is not None:
        v = tl.where(col_ok[:, None], V_DESC.load(box).reshape(BLOCK_N, offs_dv.shape[0]), 0.0)
    else:
        v = tl.load(v_ptr + offs_dv[None, :], mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["NQ", "NNEW", "CAP", "PAGE", "SPLITS", "H", "SQB", "SNK", "SL", "T_SPLITS"])
def _decode_split(Q, K, V, PT, SEQ, HEADS, RUN_OFF, RUNS, COUNT, WS_O, WS_L, O, LSE, LOCK,
                  s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ptb, s_ob, s_oh, s_on, s_lb, s_lh,
                  NQ, NNEW, CAP, PAGE, GROUP, SPLITS, qk_scale,
                  PRED: tl.constexpr, G: tl.constexpr, NQ_PAD: tl.constexpr, M: tl.constexpr,
                  TABLE_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, DQK_PAD: tl.constexpr,
                  DV: tl.constexpr, DV_PAD: tl.constexpr, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr,
                  DOT_PREC: tl.constexpr, IDX64: tl.constexpr, INTERPRET: tl.constexpr,
                  PICK=None, VD=None, SLIST=None, SCOUNT=None, H=1, SQB=1, SNK=1, SL=1,
                  SEL_PRED: tl.constexpr = None, SEL_VARS: tl.constexpr = False, SEL_B: tl.constexpr = 1,
                  SEL_KB: tl.constexpr = 1, K_DESC=None, V_DESC=None, MERGE_CHUNK: tl.constexpr = 0,
                  PIPE_PICKS: tl.constexpr = False, TWS=None, TSEL=None, T_SPLITS=1, N_SEL: tl.constexpr = 1,
                  T_QB_PAD: tl.constexpr = 1, T_RM: tl.constexpr = 1, T_NP: tl.constexpr = 1,
                  T_SP: tl.constexpr = 1):
    # SEL_PRED is not None (a dynamic pattern): PICK [B, H, SQB, SNK] int8 is each head's selection case per
    # (query block of the step, selector key block of SEL_KB keys), 0: not picked; the static part's tiles
    # skip the rows that picked them, and after them (numbered on) come the SCOUNT [B, packs] key blocks of
    # SLIST [B, packs, SL] that some row of the pack picked, each SEL_KB // BLOCK_N tiles masked per row with
    # its case's predicate SEL_PRED (rank VD[v - 1], -1: the case allows nothing)
    # rows r: head slot r // NQ_PAD of the pack, query t = r % NQ_PAD at position seqlen - NQ + t
    # PIPE_PICKS: the selected tiles in a for loop (pipelined; the interpreter keeps the while loop);
    # MERGE_CHUNK > 0: the last split merges the partials MERGE_CHUNK splits per load (`_merge_chunks`)
    # TWS given (one topk, no PICK, SLIST, SCOUNT): `_decode_topk`'s T_SPLITS splits' keys, which each program
    # merges itself (`_merged_picks`, as `_decode_topk_merge` would), split 0 writing the selection to TSEL
    pack = tl.program_id(0)
    b32 = tl.program_id(1)
    split = tl.program_id(2)
    b = b32.to(tl.int64)
    packs = tl.num_programs(0)
    seqlen = tl.minimum(tl.load(SEQ + b) + NNEW, CAP)  # past the capacity: clamped, never read out of bounds
    r = tl.arange(0, M)
    slot = r // NQ_PAD
    t = r % NQ_PAD
    head = tl.load(HEADS + pack * G + slot, mask=slot < G, other=-1)
    kvh = (tl.load(HEADS + pack * G) // GROUP).to(tl.int64)
    ii = seqlen - NQ + t
    rows = (head >= 0) & (t < NQ) & (ii >= 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DQK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q_rows = b * s_qb + head.to(tl.int64) * s_qh + t.to(tl.int64) * s_qn
    q = tl.load(Q + q_rows[:, None] + offs_dk[None, :], mask=rows[:, None] & (offs_dk[None, :] < DQK), other=0.0)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, DV_PAD], dtype=tl.float32)
    # the query blocks the rows fall in, and the key blocks they list: T in all, this split's share
    qb_lo = tl.maximum(seqlen - NQ, 0) // TABLE_M
    qb_hi = tl.maximum(seqlen - 1, 0) // TABLE_M
    picked = qb_lo * 0  # the selected key blocks' tiles (dynamic patterns), loaded before the count's loop
    sel_blk = None
    owner = None
    listed = None
    order = None
    if TWS is not None:  # the pack's top-n from the selection's splits, in registers
        rr = tl.arange(0, T_RM)
        sel_head, sel_mine, sel_blk = _merged_picks(TWS, HEADS, b32 * packs + pack, pack, T_SPLITS, SNK, SQB, N_SEL,
                                                    T_QB_PAD, G, T_RM, T_NP, T_SP)
        sel_blk = tl.where(sel_mine[:, None], sel_blk, -1)
        cols = tl.arange(0, T_NP)
        sel_at = ((b * H + sel_head.to(tl.int64)) * SQB + rr % T_QB_PAD)[:, None] * N_SEL + cols[None, :]
        tl.store(TSEL + sel_at, sel_blk, mask=sel_mine[:, None] & (cols[None, :] < N_SEL) & (split == 0))
        # the rows' selection rows, and the distinct blocks some row picked (each at its first entry), numbered
        rel_t = ii // SEL_B - tl.maximum(seqlen - NQ, 0) // SEL_B
        owner = rows[:, None] & (rr[None, :] == (slot * T_QB_PAD + rel_t)[:, None])
        listed = tl.reshape(sel_blk, [T_RM * T_NP])
        ent = tl.arange(0, T_RM * T_NP)
        earlier = (listed[:, None] == listed[None, :]) & (ent[None, :] < ent[:, None])
        first_seen = (listed >= 0) & (tl.max(earlier.to(tl.int32), 1) == 0)
        order = tl.where(first_seen, tl.cumsum(first_seen.to(tl.int32), 0) - 1, -1)
        picked = tl.sum(first_seen.to(tl.int32), 0) * (SEL_KB // BLOCK_N)
    elif SEL_PRED is not None:
        picked = tl.load(SCOUNT + b32 * packs + pack) * (SEL_KB // BLOCK_N)
    total = qb_lo * 0  # an int32 scalar (loop-carried)
    qb = qb_lo
    while qb <= qb_hi:
        total += tl.load(COUNT + qb)
        qb += 1
    static_total = total
    total += picked
    prow = r.to(tl.int64) * 0  # per row, its selection's offset in PICK (dynamic patterns)
    if SEL_PRED is not None:
        rel = ii // SEL_B - tl.maximum(seqlen - NQ, 0) // SEL_B
        prow = ((b * H + head) * SQB + rel).to(tl.int64) * SNK
    share = tl.cdiv(total, SPLITS)
    lo = split * share
    hi = tl.minimum(lo + share, total)
    seen = qb_lo * 0  # blocks of the earlier query blocks
    qb = qb_lo
    # (a split whose share starts past the static part's tiles walks no run table: nothing there is its)
    while (qb <= qb_hi) & (seen < hi) & (lo < static_total):
        in_qb = rows & (ii // TABLE_M == qb)
        run = tl.load(RUN_OFF + qb)
        run_end = tl.load(RUN_OFF + qb + 1)
        while run < run_end:
            k0 = tl.load(RUNS + run * 4)
            k1 = tl.load(RUNS + run * 4 + 1)
            partial = tl.load(RUNS + run * 4 + 2)
            at = seen + tl.load(RUNS + run * 4 + 3)  # this run's first block in the numbering
            a = tl.maximum(lo, at)
            e = tl.minimum(hi, at + k1 - k0)
            if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
                x = a
                while x < e:
                    acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, K, V, PT, b, kvh, k0 + x - at, partial, in_qb, ii,
                                                 seqlen, offs_n, offs_dk, offs_dv, s_kb, s_kh, s_kn, s_vb, s_vh,
                                                 s_vn, s_ptb, PAGE, qk_scale, PRED, BLOCK_N, DQK, DV, PAGED,
                                                 PAGE_TILES, DOT_PREC, IDX64, PICK, prow, SEL_KB, K_DESC=K_DESC,
                                                 V_DESC=V_DESC, SEL_BLK=sel_blk, OWNER=owner)
                    x += 1
            else:
                for x in range(a, e):
                    acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, K, V, PT, b, kvh, k0 + x - at, partial, in_qb, ii,
                                                 seqlen, offs_n, offs_dk, offs_dv, s_kb, s_kh, s_kn, s_vb, s_vh,
                                                 s_vn, s_ptb, PAGE, qk_scale, PRED, BLOCK_N, DQK, DV, PAGED,
                                                 PAGE_TILES, DOT_PREC, IDX64, PICK, prow, SEL_KB, K_DESC=K_DESC,
                                                 V_DESC=V_DESC, SEL_BLK=sel_blk, OWNER=owner)
            run += 1
        seen += tl.load(COUNT + qb)
        qb += 1
    if SEL_PRED is not None:  # the selected key blocks, each with the case of the row that picked it
        slist = SLIST  # (None where the program merged the top-n itself)
        if TWS is None:
            slist = SLIST + (b32 * packs + pack).to(tl.int64) * SL
        x0 = tl.maximum(lo, static_total)
        if INTERPRET or not PIPE_PICKS:
            x = x0
            while x < hi:
                acc, l_i, m_i = _picked_tile(acc, l_i, m_i, q, K, V, PT, slist, PICK, VD, prow, b, kvh, x - static_total,
                                             rows, ii, seqlen, offs_n, offs_dk, offs_dv, s_kb, s_kh, s_kn, s_vb, s_vh,
                                             s_vn, s_ptb, PAGE, qk_scale, SEL_PRED, SEL_VARS, SEL_KB, BLOCK_N, DQK, DV,
                                             PAGED, PAGE_TILES, DOT_PREC, IDX64, K_DESC, V_DESC, sel_blk, owner,
                                             listed, order)
                x += 1
        else:  # a for loop: Triton's pipeliner issues the next tiles' list, case and K, V loads early
            for x in range(x0, hi):
                acc, l_i, m_i = _picked_tile(acc, l_i, m_i, q, K, V, PT, slist, PICK, VD, prow, b, kvh, x - static_total,
                                             rows, ii, seqlen, offs_n, offs_dk, offs_dv, s_kb, s_kh, s_kn, s_vb, s_vh,
                                             s_vn, s_ptb, PAGE, qk_scale, SEL_PRED, SEL_VARS, SEL_KB, BLOCK_N, DQK, DV,
                                             PAGED, PAGE_TILES, DOT_PREC, IDX64, K_DESC, V_DESC, sel_blk, owner,
                                             listed, order)
    # this split's partial result: rows normalised, log2-sum-exp (-inf where it saw no allowed key)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    if SPLITS == 1:
        _store_rows(O, LSE, b, head, t, NQ, out, lse2, s_ob, s_oh, s_on, s_lb, s_lh, offs_dv, DV)
    else:  # the last split of the (pack, batch entry) to finish merges them all: no second launch
        ws = ((b * packs + pack) * SPLITS + split) * M
        live = (head >= 0) & (t < NQ)  # the rows the output has (MERGE_CHUNK > 0 moves no other)
        if MERGE_CHUNK > 0:
            tl.store(WS_O + (ws + r[:, None]) * DV_PAD + offs_dv[None, :], out, mask=live[:, None])
            tl.store(WS_L + ws + r, lse2, mask=live)
        else:
            tl.store(WS_O + (ws + r[:, None]) * DV_PAD + offs_dv[None, :], out)
            tl.store(WS_L + ws + r, lse2)
        tl.debug_barrier()  # every thread's partial stored before the (releasing) arrival below
        lock = LOCK + b32 * packs + pack
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1:
            first = ((b * packs + pack) * SPLITS) * M
            if MERGE_CHUNK > 0:
                out, lse2 = _merge_chunks(WS_O, WS_L, first, SPLITS, r, live, offs_dv, M, DV_PAD, MERGE_CHUNK)
            else:
                out, lse2 = _merge_splits(WS_O, WS_L, first, SPLITS, r, offs_dv, M, DV_PAD)
            tl.atomic_xchg(lock, 0)  # ready for the next launch (a replayed graph's too)
            _store_rows(O, LSE, b, head, t, NQ, out, lse2, s_ob, s_oh, s_on, s_lb, s_lh, offs_dv, DV)


@triton.jit
def _merge_splits(WS_O, WS_L, first, SPLITS, r, offs_dv, M: tl.constexpr, DV_PAD: tl.constexpr):
    """The SPLITS partial results from workspace row `first` on, merged by log-sum-exp: (rows normalised,
    log2-sum-exp, -inf for a row no split saw a key for). Read through L2 (.cg): the other splits' programs
    wrote them on other SMs during this launch."""
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, DV_PAD], dtype=tl.float32)
    s = SPLITS * 0  # an int32 scalar (loop-carried)
    while s < SPLITS:
        ws = first + s * M
        ls = tl.load(WS_L + ws + r, cache_modifier=".cg")
        o = tl.load(WS_O + (ws + r[:, None]) * DV_PAD + offs_dv[None, :], cache_modifier=".cg")
        acc, l_i, m_i = _merge_part(acc, l_i, m_i, o, ls)
        s += 1
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))


@triton.jit
def _picked_tile(acc, l_i, m_i, q, K, V, PT, slist, PICK, VD, prow, b, kvh, x, rows, ii, seqlen, offs_n, offs_dk,
                 offs_dv, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ptb, PAGE, qk_scale, SEL_PRED: tl.constexpr,
                 SEL_VARS: tl.constexpr, SEL_KB: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr,
                 DV: tl.constexpr, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr, DOT_PREC: tl.constexpr,
                 IDX64: tl.constexpr, K_DESC, V_DESC, SEL_BLK=None, OWNER=None, listed=None, order=None):
    """The x-th tile of the pack's selected key blocks (`slist`: the pack's row of SLIST) into the running
    softmax, each row masked with the case it picked the block with (PICK, its rank in VD; not picked: no
    pair). SEL_BLK given (the top-n merged in the program; one topk, one case): the blocks `listed` [E] in
    `order` (-1: a repeat), the rows' picks from registers (`_picked_rows`)."""
    if SEL_BLK is not None:
        kb_sel = tl.sum(tl.where(order == x // (SEL_KB // BLOCK_N), listed, 0), 0)
        rank = tl.where(_picked_rows(SEL_BLK, OWNER, kb_sel), tl.load(VD), -1)
    else:
        kb_sel = tl.load(slist + x // (SEL_KB // BLOCK_N))
        v = tl.load(PICK + prow + kb_sel, mask=rows, other=0).to(tl.int32)
        rank = tl.load(VD + tl.maximum(v - 1, 0), mask=v > 0, other=-1)
    kb = kb_sel * (SEL_KB // BLOCK_N) + x % (SEL_KB // BLOCK_N)
    return _decode_tile(acc, l_i, m_i, q, K, V, PT, b, kvh, kb, 1, rows & (rank >= 0), ii, seqlen, offs_n, offs_dk,
                        offs_dv, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ptb, PAGE, qk_scale, SEL_PRED, BLOCK_N, DQK,
                        DV, PAGED, PAGE_TILES, DOT_PREC, IDX64, VAR=rank[:, None] if SEL_VARS else None,
                        K_DESC=K_DESC, V_DESC=V_DESC)


@triton.jit
def _merge_chunks(WS_O, WS_L, first, SPLITS, r, live, offs_dv, M: tl.constexpr, DV_PAD: tl.constexpr,
                  CHUNK: tl.constexpr):
    """`_merge_splits` reading CHUNK splits' partial results per load, of the `live` rows only: the merge
    waits on ceil(SPLITS / CHUNK) round trips to L2 instead of SPLITS (each chunk's rows weighted against
    the running maximum, as `fwd_kernels._merge_part` does one slice's)."""
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, DV_PAD], dtype=tl.float32)
    c = tl.arange(0, CHUNK)
    s = SPLITS * 0  # an int32 scalar (loop-carried)
    while s < SPLITS:
        ws = first + (s + c) * M  # [CHUNK]
        ok = (s + c < SPLITS)[:, None] & live[None, :]  # [CHUNK, M]
        ls = tl.load(WS_L + ws[:, None] + r[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
        at = ((ws[:, None] + r[None, :]) * DV_PAD)[:, :, None] + offs_dv[None, None, :]
        o = tl.load(WS_O + at, mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_i, tl.max(ls, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        wt = tl.math.exp2(ls - m_use[None, :])  # [CHUNK, M]: 0 for a split that saw no key
        acc = acc * alpha[:, None] + tl.sum(o * wt[:, :, None], 0)
        l_i = l_i * alpha + tl.sum(wt, 0)
        m_i = m_new
        s += CHUNK
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))


@triton.jit
def _store_rows(O, LSE, b, head, t, NQ, out, lse2, s_ob, s_oh, s_on, s_lb, s_lh, offs_dv, DV: tl.constexpr):
    """A pack's finished rows into O [B, H, NQ, DV] and LSE [B, H, NQ] (natural log; a row that saw no key:
    zeros and -inf)."""
    rows = (head >= 0) & (t < NQ)
    h = head.to(tl.int64)
    o_rows = b * s_ob + h * s_oh + t.to(tl.int64) * s_on
    tl.store(O + o_rows[:, None] + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=rows[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * s_lb + h * s_lh + t, lse2 / 1.4426950408889634, mask=rows)


@triton.jit(do_not_specialize=["B0", "NNEW", "NB", "CAP", "PAGE"])
def _summary_kernel(K, PT, LEN, START, LO, HI, MEAN, s_kb, s_kh, s_kn, s_ptb, B0, NNEW, NB, HKV, CAP, PAGE,
                    BLK: tl.constexpr, CH: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGED: tl.constexpr,
                    KN=None, VN=None, V=None, s_knb=0, s_knh=0, s_knt=0, s_vnb=0, s_vnh=0, s_vnt=0, s_vb=0, s_vh=0,
                    s_vn=0, DV: tl.constexpr = 1, DV_PAD: tl.constexpr = 1):
    """Key summaries (`patterndsl.cache.KeySummaries`): per (batch entry, KV head) program row and t-th key
    block of BLK keys from the first (block B0, or where START is given the block of position START[b]:
    the blocks an append touched, found here so that the host passes no index tensor), the element-wise
    min, max and mean (in float32) of its keys below LEN[b] + NNEW, written to LO, HI, MEAN [B, HKV, NB, D]
    (zeros for a block with no key yet; a block past the last is the last). A paged cache's positions past
    the length are never loaded. KN given: the step's new keys and values KN, VN [B, HKV, NNEW, D] go into
    the cache at positions LEN[b] .. (each program writes those of its block, V too), and the block's
    summary takes them from KN: a step's append and summary update are one launch."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    if START is None:
        blk = (B0 + t).to(tl.int64)
    else:
        blk = (tl.load(START + b) // BLK + t).to(tl.int64)
    blk = tl.minimum(blk, NB - 1)
    old = tl.load(LEN + b)
    n = tl.minimum(old + NNEW, CAP)
    offs_d = tl.arange(0, D_PAD)
    lo = tl.full([D_PAD], float("inf"), dtype=tl.float32)
    hi = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for c0 in range(0, BLK, CH):
        pos = blk * BLK + c0 + tl.arange(0, CH)
        ok = pos < n
        if PAGED:
            page = tl.load(PT + b * s_ptb + pos // PAGE, mask=ok, other=0).to(tl.int64)
            rows = page * s_kb + (pos % PAGE) * s_kn + h * s_kh
        else:
            rows = b * s_kb + h * s_kh + pos * s_kn
        m = ok[:, None] & (offs_d[None, :] < D)
        if KN is None:
            x = tl.load(K + rows[:, None] + offs_d[None, :], mask=m, other=0.0)
        else:
            new = ok & (pos >= old)
            tn = (pos - old).to(tl.int64)[:, None]
            mk = new[:, None] & (offs_d[None, :] < D)
            x = tl.load(KN + b * s_knb + h * s_knh + tn * s_knt + offs_d[None, :], mask=mk, other=0.0)
            tl.store(K + rows[:, None] + offs_d[None, :], x, mask=mk)
            x = tl.where(mk, x, tl.load(K + rows[:, None] + offs_d[None, :], mask=m & ~mk, other=0.0))
            offs_v = tl.arange(0, DV_PAD)
            mv = new[:, None] & (offs_v[None, :] < DV)
            if PAGED:
                v_rows = page * s_vb + (pos % PAGE) * s_vn + h * s_vh
            else:
                v_rows = b * s_vb + h * s_vh + pos * s_vn
            y = tl.load(VN + b * s_vnb + h * s_vnh + tn * s_vnt + offs_v[None, :], mask=mv)
            tl.store(V + v_rows[:, None] + offs_v[None, :], y, mask=mv)
        x = x.to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(m, x, float("inf")), 0))
        hi = tl.maximum(hi, tl.max(tl.where(m, x, float("-inf")), 0))
        acc += tl.sum(x, 0)
    count = tl.minimum(tl.maximum(n - blk * BLK, 0), BLK)
    some = count > 0
    out = ((b * HKV + h) * NB + blk) * D + offs_d
    keep = offs_d < D
    tl.store(LO + out, tl.where(some, lo, 0.0), mask=keep)
    tl.store(HI + out, tl.where(some, hi, 0.0), mask=keep)
    tl.store(MEAN + out, tl.where(some, acc / tl.maximum(count, 1).to(tl.float32), 0.0), mask=keep)


@triton.jit(do_not_specialize=["H", "QB", "W", "NK", "SL"])
def _pick_tables(SEL, HEADS, PICK, SLIST, SCOUNT, H, QB, W, NK, SL, G: tl.constexpr, E_PAD: tl.constexpr):
    """What `_decode_split` reads of a selection (`_tables_of`), program (head pack, batch entry)."""
    _tables_of(SEL, HEADS, PICK, SLIST, SCOUNT, tl.program_id(0), tl.program_id(1).to(tl.int64), tl.num_programs(0),
               H, QB, W, NK, SL, G, E_PAD)


@triton.jit
def _tables_of(SEL, HEADS, PICK, SLIST, SCOUNT, pack, b, packs, H, QB, W, NK, SL, G: tl.constexpr,
               E_PAD: tl.constexpr):
    """What `_decode_split` reads of a selection, for one (head pack, batch entry): the pack's picks SEL
    [B, H, QB, W] (int32, `block | (v - 1) << 24`, -1 padding) scattered into PICK [B, H, QB, NK] (int8,
    the case v; zeroed before), and the distinct key blocks among them into SLIST [B, packs, SL] (-1 after
    them) with their number SCOUNT [B, packs]. An entry is listed where no earlier entry of the pack
    holds the same block."""
    e = tl.arange(0, E_PAD)
    per = QB * W
    slot = e // per
    head = tl.load(HEADS + pack * G + slot, mask=(slot < G) & (e < G * per), other=-1).to(tl.int64)
    at = ((b * H + head) * QB + (e // W) % QB) * W + e % W
    val = tl.load(SEL + at, mask=head >= 0, other=-1)
    ok = val >= 0
    blk = val & 0xFFFFFF
    tl.store(PICK + ((b * H + head) * QB + (e // W) % QB) * NK + blk, ((val >> 24) + 1).to(tl.int8), mask=ok)
    key = tl.where(ok, blk, -1)
    earlier = (key[:, None] == key[None, :]) & (e[None, :] < e[:, None])
    first = ok & (tl.max(earlier.to(tl.int32), 1) == 0)
    rank = tl.cumsum(first.to(tl.int32), 0) - 1
    row = (b * packs + pack) * SL
    tl.store(SLIST + row + rank, blk, mask=first)
    count = tl.sum(first.to(tl.int32), 0)
    tl.store(SLIST + row + e, tl.full([E_PAD], -1, tl.int32), mask=(e >= count) & (e < SL))  # the padding
    tl.store(SCOUNT + b * packs + pack, count)


@triton.jit(do_not_specialize=["T", "CAP", "PAGE"])
def _append_kv(KN, VN, K, V, PT, SEQ, s_knb, s_knh, s_knt, s_vnb, s_vnh, s_vnt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
               s_ptb, T, CAP, PAGE, HKV, CH: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
               DV_PAD: tl.constexpr, PAGED: tl.constexpr):
    """A decode step's k_new, v_new [B, HKV, T, D] (last dimension contiguous) written at positions SEQ[b] ..
    SEQ[b] + T - 1 of a contiguous or paged cache, in one launch: program (CH tokens, batch entry and KV
    head). The positions are read on the device, so a CUDA graph replays the write with new lengths;
    positions past the capacity CAP are not written."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    t = c * CH + tl.arange(0, CH)
    pos = tl.load(SEQ + b) + t
    ok = (t < T) & (pos < CAP)
    if PAGED:
        page = tl.load(PT + b * s_ptb + pos // PAGE, mask=ok, other=0).to(tl.int64)
        at = (pos % PAGE).to(tl.int64)
        k_rows = page * s_kb + at * s_kn + h * s_kh
        v_rows = page * s_vb + at * s_vn + h * s_vh
    else:
        k_rows = b * s_kb + h * s_kh + pos.to(tl.int64) * s_kn
        v_rows = b * s_vb + h * s_vh + pos.to(tl.int64) * s_vn
    t64 = t.to(tl.int64)
    offs_k = tl.arange(0, DK_PAD)
    mk = ok[:, None] & (offs_k[None, :] < DK)
    x = tl.load(KN + b * s_knb + h * s_knh + t64[:, None] * s_knt + offs_k[None, :], mask=mk)
    tl.store(K + k_rows[:, None] + offs_k[None, :], x, mask=mk)
    offs_v = tl.arange(0, DV_PAD)
    mv = ok[:, None] & (offs_v[None, :] < DV)
    y = tl.load(VN + b * s_vnb + h * s_vnh + t64[:, None] * s_vnt + offs_v[None, :], mask=mv)
    tl.store(V + v_rows[:, None] + offs_v[None, :], y, mask=mv)


@triton.jit
def _step_candidates(RUN_OFF, RUNS, kb, t, seqlen, NQ, CAP, k0, PRED: tl.constexpr, SEL_B: tl.constexpr,
                     KB: tl.constexpr, QB: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, CH: tl.constexpr,
                     IDX64: tl.constexpr):
    """[R, BK]: key block kb is a candidate of row r's query block t of the step (`decode_selection.
    candidates`): the context allows a pair (i, j), i a step row in that query block, j < seqlen in the
    block. Read off the context's run tables (query blocks of SEL_B rows, key blocks of KB keys, at the
    capacity): a FULL run's blocks below seqlen are candidates; only a PARTIAL run that meets the tile has
    its pairs evaluated, so the work follows the runs, not the cache's length."""
    hit = tl.zeros([R, BK], dtype=tl.int1)
    first = tl.maximum(seqlen - NQ, 0)
    for u in tl.static_range(QB):
        qb = first // SEL_B + u
        i_lo = tl.maximum(first, qb * SEL_B)
        i_hi = tl.minimum(seqlen, qb * SEL_B + SEL_B)
        h = tl.zeros([BK], dtype=tl.int1)
        if i_lo < i_hi:
            run = tl.load(RUN_OFF + qb)
            run_end = tl.load(RUN_OFF + qb + 1)
            while run < run_end:
                lo = tl.load(RUNS + run * 4)
                hi = tl.load(RUNS + run * 4 + 1)
                inrun = (kb >= lo) & (kb < hi) & (kb * KB < seqlen)
                if (tl.load(RUNS + run * 4 + 2) != 0) & (lo < k0 + BK) & (hi > k0):
                    pairs = tl.zeros([BK], dtype=tl.int32)
                    i = i_lo
                    while i < i_hi:
                        for c in tl.static_range(0, KB, CH):
                            j = kb[:, None] * KB + c + tl.arange(0, CH)[None, :]
                            ok = (j < seqlen) & _allowed_at(i, j, CAP, PRED, IDX64, True)
                            pairs = tl.maximum(pairs, tl.max(ok.to(tl.int32), 1))
                        i += 1
                    inrun = inrun & (pairs > 0)
                h = h | inrun
                run += 1
        hit = hit | ((t == u)[:, None] & h[None, :])
    return hit


@triton.jit(do_not_specialize=["NQ", "NNEW", "CAP", "NK", "SPLITS"])
def _decode_topk(Q, KM, SEQ, HEADS, RUN_OFF, RUNS, WS, SC, s_qb, s_qh, s_qn, NQ, NNEW, CAP, NK, PACKS,
                 HKV, GROUP, SPLITS, PRED: tl.constexpr, SEL_B: tl.constexpr, KB: tl.constexpr, QB: tl.constexpr,
                 QB_PAD: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RM: tl.constexpr, NP: tl.constexpr,
                 BK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, CH: tl.constexpr, DOT_PREC: tl.constexpr,
                 IDX64: tl.constexpr):
    """A decode step's topk by the mean rule, first stage: program (split, batch entry and head pack) scores
    the BS key blocks of its split for the pack's rows (its G query heads, each of the QB query blocks of the
    step: RM rows, padded to R >= 16 for the dot; they share every summary load: one KV head's) and writes
    each row's NP largest keys (`selection._rule_key`: the score's order, ties to the lower block; the lowest
    key after a row's candidates run out) to WS [B * packs, SPLITS, RM, NP] int64. q-bar is the mean of the
    row's step rows in its query block (float32), the score q-bar . mean(k) over the summaries' means
    KM [B, HKV, NK, D] (float32 or 16-bit, widened to float32). The scores go through the program's scratch rows of
    SC (int32, the score's order-preserving bits) so that one selection (`_top_rows`) sees all BS at once: a
    bitonic top-k per tile of keys cost more than the whole split's scoring. `_decode_topk_merge`, launched
    after, keeps the best NP of the splits (merging in this kernel's last program costs every program the
    merge's registers: docs/decisions.md)."""
    split = tl.program_id(0)
    bp = tl.program_id(1)
    b = (bp // PACKS).to(tl.int64)
    pack = bp % PACKS
    seqlen = tl.minimum(tl.load(SEQ + b) + NNEW, CAP)
    r = tl.arange(0, R)
    slot = r // QB_PAD
    t = r % QB_PAD
    head = tl.load(HEADS + pack * G + slot, mask=slot < G, other=-1)
    kvh = (tl.load(HEADS + pack * G) // GROUP).to(tl.int64)
    offs_d = tl.arange(0, D)
    first = tl.maximum(seqlen - NQ, 0)
    qm = tl.zeros([R, D], dtype=tl.float32)
    count = tl.zeros([R], dtype=tl.float32)
    u = seqlen * 0
    while u < NQ:  # q-bar: the step's rows of each query block, summed, then divided by their number
        i = seqlen - NQ + u
        mine = (head >= 0) & (t < QB) & (i >= 0) & (i // SEL_B - first // SEL_B == t)
        x = tl.load(Q + b * s_qb + head.to(tl.int64)[:, None] * s_qh + u * s_qn + offs_d[None, :],
                    mask=mine[:, None], other=0.0)
        qm += x.to(tl.float32)
        count += mine.to(tl.float32)
        u += 1
    qm = qm / tl.maximum(count, 1.0)[:, None]
    rows = count > 0
    k_first = split * BS
    km_base = KM + (b * HKV + kvh) * NK * D
    sc = SC + (bp * SPLITS + split).to(tl.int64) * RM * BS
    for c in tl.static_range(0, BS, BK):
        kb = k_first + c + tl.arange(0, BK)
        kmask = kb < NK
        km = tl.load(km_base + kb[:, None].to(tl.int64) * D + offs_d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(qm, tl.trans(km.to(tl.float32)), input_precision=DOT_PREC)
        hi = (_rule_key(s, kb, kmask[None, :] & rows[:, None], NK, R, BK) >> 32).to(tl.int32)
        tl.store(sc + r[:, None] * BS + c + tl.arange(0, BK)[None, :], hi, mask=(r < RM)[:, None])
    tl.debug_barrier()  # the scratch rows are the whole program's
    rr = tl.arange(0, RM)
    cols = tl.arange(0, BS)
    # the context's candidates once for the whole split, after the scores: one walk of the run tables (a chain
    # of dependent loads) per program, not one per scoring tile
    cand = _step_candidates(RUN_OFF, RUNS, k_first + cols, rr % QB_PAD, seqlen, NQ, CAP, k_first, PRED, SEL_B, KB, QB,
                            BS, RM, CH, IDX64)
    hi = tl.where(cand, tl.load(sc + rr[:, None] * BS + cols[None, :]), -2147483648)
    pick = _top_rows(hi, NP)
    key = (hi.to(tl.int64) << 32) | (NK - 1 - (k_first + cols)).to(tl.int64)[None, :]
    out = WS + ((bp * SPLITS + split) * RM + rr[:, None]).to(tl.int64) * NP
    tl.store(out + tl.cumsum(pick.to(tl.int32), 1) - 1, key, mask=pick)
    taken = tl.sum(pick.to(tl.int32), 1)
    slots = tl.arange(0, NP)[None, :]
    tl.store(out + slots, tl.full([RM, NP], -9223372036854775807, tl.int64) - 1, mask=slots >= taken[:, None])


@triton.jit
def _top_rows(hi, NP: tl.constexpr):
    """bool [rows, cols]: each row's NP largest of the int32 keys `hi` (signed order; INT32_MIN: not a
    candidate, never taken), ties to the lower column; every candidate of a row that has at most NP. A
    radix select: the NP-th largest found bit by bit from the top (one count per bit), then the ties at it
    ranked by column."""
    valid = hi != -2147483648
    u = (hi ^ -2147483648).to(tl.uint32, bitcast=True)  # the signed order as an unsigned one
    t = tl.zeros([hi.shape[0]], dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        cand = t | (tl.full([hi.shape[0]], 1, tl.uint32) << bit)
        above = tl.sum((valid & (u >= cand[:, None])).to(tl.int32), 1)
        t = tl.where(above >= NP, cand, t)
    gt = valid & (u > t[:, None])
    eq = valid & (u == t[:, None])
    need = NP - tl.sum(gt.to(tl.int32), 1)
    return gt | (eq & (tl.cumsum(eq.to(tl.int32), 1) <= need[:, None]))


@triton.jit
def _merged_picks(WS, HEADS, bp, pack, SPLITS, NK, QB, N_SEL, QB_PAD: tl.constexpr, G: tl.constexpr,
                  RM: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    """The top-n of (batch entry and head pack) bp from `_decode_topk`'s SPLITS * NP keys per row of WS (SP:
    SPLITS, a power of two up; read through L2, the splits wrote them from other SMs): (the rows' heads
    [RM] (-1 padding), the rows the pack has [RM], each row's best N_SEL key blocks [RM, NP], unordered, -1
    where fewer candidates and in the columns from N_SEL). Rows r: head slot r // QB_PAD, query block
    r % QB_PAD of the step."""
    r = tl.arange(0, RM)
    slot = r // QB_PAD
    head = tl.load(HEADS + pack * G + slot, mask=slot < G, other=-1)
    mine = (head >= 0) & (r % QB_PAD < QB)
    e = tl.arange(0, SP * NP)
    at = ((bp * SPLITS + e[None, :] // NP) * RM + r[:, None]).to(tl.int64) * NP + e[None, :] % NP
    lowest = -9223372036854775807 - 1
    keys = tl.load(WS + at, mask=e[None, :] // NP < SPLITS, other=lowest, cache_modifier=".cg")
    best = tl.topk(keys, NP, dim=1)
    hi = (best >> 32).to(tl.int32)
    score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    valid = (best != lowest) & (score == score) & (tl.arange(0, NP)[None, :] < N_SEL)
    return head, mine, tl.where(valid, (NK - 1 - (best & 0xFFFFFFFF)).to(tl.int32), -1)


@triton.jit
def _picked_rows(blk, owner, kb_sel):
    """[M] bool: the rows whose selection row (`owner` [M, RM], one-hot; none for a row outside the step)
    has key block kb_sel among its picks `blk` [RM, NP] (-1: none)."""
    hit = tl.max((blk == kb_sel).to(tl.int32), 1)  # [RM]
    return tl.max(owner.to(tl.int32) * hit[None, :], 1) > 0


@triton.jit(do_not_specialize=["NK", "SPLITS", "SL"])
def _decode_topk_merge(WS, HEADS, SEL, NK, PACKS, H, SPLITS, N_SEL: tl.constexpr, QB: tl.constexpr,
                       QB_PAD: tl.constexpr, G: tl.constexpr, RM: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr,
                       PICK=None, SLIST=None, SCOUNT=None, SL=1, E_PAD: tl.constexpr = 1):
    """`_decode_topk`'s second stage, program (batch entry and head pack) bp: each of the pack's RM rows keeps
    the NP largest of its SPLITS * NP keys (SP: SPLITS, a power of two up; read through L2, the splits wrote
    them from other SMs), and writes the N_SEL best as block ids into SEL
    [B, H, QB, N_SEL] (int32, unordered; -1 where fewer candidates, as `selection._topk_kernel` writes
    them). PICK given (the pattern's one selector): then the pack's tables for `_decode_split`
    (`_tables_of`), its PICK rows zeroed first, so that a step with a selection launches no table kernel."""
    bp = tl.program_id(0)
    b = (bp // PACKS).to(tl.int64)
    pack = bp % PACKS
    r = tl.arange(0, RM)
    t = r % QB_PAD
    head, mine, blk = _merged_picks(WS, HEADS, bp, pack, SPLITS, NK, QB, N_SEL, QB_PAD, G, RM, NP, SP)
    cols = tl.arange(0, NP)
    out = ((b * H + head.to(tl.int64)) * QB + t)[:, None] * N_SEL + cols[None, :]
    tl.store(SEL + out, blk, mask=mine[:, None] & (cols[None, :] < N_SEL))
    if PICK is not None:
        row = ((b * H + head.to(tl.int64)) * QB + t) * NK
        zch = tl.arange(0, 256)
        c0 = NK * 0  # a scalar bound the interpreter takes too (a while loop: no range over a run-time scalar)
        while c0 < NK:
            tl.store(PICK + row[:, None] + c0 + zch[None, :], tl.zeros([RM, 256], dtype=tl.int8),
                     mask=mine[:, None] & (c0 + zch[None, :] < NK))
            c0 += 256
        tl.debug_barrier()  # the CTA's stores of SEL and the zeroed rows are visible to all its threads
        _tables_of(SEL, HEADS, PICK, SLIST, SCOUNT, pack, b, PACKS, H, QB, N_SEL, NK, SL, G, E_PAD)
