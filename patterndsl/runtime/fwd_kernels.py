"""Forward kernels: FlashAttention-2 over block tables, for any pattern.

The pattern reaches every kernel as `PRED`, a `tl.constexpr` @triton.jit function `(i, j, N) -> bool tile`
defined in the pattern's generated module (Triton specialises the kernel on it); a token layout as
`LAYOUT`, a constexpr function `(rows, N) -> (tokens, valid)`, or None; a selector's selected blocks as
`SEL_PRED`, or None. Heads with different predicates take one launch each.

Two kernels: `_attn_fwd`, the general one (token layouts read in place, packed documents, selectors), and
`_attn_fwd_fast` (contiguous rows, whole sequences): a work list of query blocks, heaviest first, with
tensor-descriptor (TMA) loads, optionally slicing heavy query blocks (`_attn_combine` merges the slices). A
token layout reaches the fast kernel as buffers gathered into its order (`layout_order`) and `LAYOUT`, which
only its PARTIAL tiles evaluate.
"""

import triton
import triton.language as tl


@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn, N, qk_scale,
               PRED: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, LAYOUT: tl.constexpr, VAR=None,
               KSEG=None):
    # offs_m: the query tile's logical tokens; cols: the key tile's physical rows, read at logical tokens
    # VAR: None, or the selection case's rank that a dispatching PRED(i, j, N, VAR) takes
    # KSEG: None, or key segments (row - position, position, rows, N) and kb one of them: its rows are read
    # at cols + (row - position)
    cols, kok, krows = _block(KSEG, kb, offs_n, N, BLOCK_N, LAYOUT)
    if MASKED:
        kmask = kok[None, :] & (offs_d[:, None] < HEAD_DIM)
        vmask = kok[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        kmask = offs_d[:, None] < HEAD_DIM
        vmask = offs_d[None, :] < HEAD_DIM
    k = tl.load(k_base + krows[None, :].to(tl.int64) * s_kn + offs_d[:, None], mask=kmask, other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
    if MASKED:  # key bounds from kok (a token layout's padding too), query rows >= 0
        ok = _pair_ok(offs_m, cols, N, PRED, IDX64, True, VAR) & kok[None, :] & (offs_m >= 0)[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + krows[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=vmask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _segment(SEG, s, offs):
    """Segment s of a buffer whose rows are runs of a longer sequence (`tables.segments`): its tile's
    positions (in its document), which of them it holds, and their rows in the buffer."""
    shift = tl.load(SEG + 4 * s).to(tl.int64)
    pos = tl.load(SEG + 4 * s + 1) + offs
    return pos, offs < tl.load(SEG + 4 * s + 2), pos + shift


@triton.jit
def _block(SEG, blk, offs, N, BLOCK: tl.constexpr, LAYOUT: tl.constexpr, GATHERED: tl.constexpr = False):
    """Block blk of a tile's rows (offs: arange(BLOCK)): their positions, which of them exist, and their rows
    in the buffer. Segment blk of SEG, or rows blk * BLOCK + offs (through the token layout, if any: the
    buffer is in token order and read at the tokens, or with GATHERED in the layout's row order)."""
    if SEG is not None:
        pos, ok, rows = _segment(SEG, blk, offs)
    else:
        rows = blk * BLOCK + offs
        if LAYOUT is not None:
            pos, ok = LAYOUT(rows, N)
            if not GATHERED:
                rows = pos
        else:
            pos = rows
            ok = pos < N
    return pos, ok, rows


@triton.jit
def _segment_program(SEG):
    """A launch over segments: this program's segment, its rows' offset from their positions and its
    document's length."""
    row = tl.program_id(0)
    return row, tl.load(SEG + 4 * row).to(tl.int64), tl.load(SEG + 4 * row + 3)


@triton.jit
def _stage_range(FULL_OFF, PART_OFF, row, STAGE: tl.constexpr):
    """[lo, hi): where block `row`'s entries lie in its FULL (STAGE 0) or PARTIAL (STAGE 1) table."""
    if STAGE == 0:
        lo = tl.load(FULL_OFF + row)
        hi = tl.load(FULL_OFF + row + 1)
    else:
        lo = tl.load(PART_OFF + row)
        hi = tl.load(PART_OFF + row + 1)
    return lo, hi


@triton.jit(do_not_specialize=["N", "LSE_N", "NP"])
def _attn_fwd(Q, K, V, O, LSE, HEAD_IDS, FULL_OFF, FULL_IDX, PART_OFF, PART_IDX, CU, TILES,
              s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
              N, H, NH, GROUP, qk_scale, LSE_N, NP,
              PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, INTERPRET: tl.constexpr,
              VARLEN: tl.constexpr = False, LAYOUT: tl.constexpr = None, SEL_PRED: tl.constexpr = None,
              SEL_VARS: tl.constexpr = False, QSEG=None, KSEG=None, ORDER=None):
    # NP: rows the kernel tiles (N, or with LAYOUT N padded to whole tiles of the pattern's token layout)
    # SEL_PRED is not None (a dynamic pattern): the tables are per (batch, head), rows pid_bh * query blocks +
    # pid_m, and PARTIAL entries with bit 30 set are selected blocks masked with predicate SEL_PRED; with
    # SEL_VARS, bits 24..29 hold the selection case's rank that SEL_PRED(i, j, N, rank) dispatches on
    if VARLEN:
        # packed documents: program r is tile r (document, query block within it), tiles heaviest first;
        # N becomes that document's length and every index below is local to the document
        row = tl.program_id(0)
        doc = tl.load(TILES + 2 * row)
        pid_m = tl.load(TILES + 2 * row + 1)
        start = tl.load(CU + doc).to(tl.int64)
        N = tl.load(CU + doc + 1) - tl.load(CU + doc)
    elif QSEG is not None:
        # rows at given positions: program r is query segment r (heaviest first), its key blocks key segments
        # (`tables.span_tables`); start: its rows' offset from their positions, N: its document's length
        row, start, N = _segment_program(QSEG)
        pid_m = row
    elif ORDER is not None:  # program r runs query block ORDER[r]: far heavier blocks first (`tables.heavy_first`)
        pid_m = tl.load(ORDER + tl.program_id(0))
        row = pid_m
        start = 0
    else:
        # heavy query blocks (late rows of causal patterns) start first
        pid_m = tl.cdiv(NP, BLOCK_M) - 1 - tl.program_id(0)
        row = pid_m
        if SEL_PRED is not None:
            row = tl.program_id(1) * tl.cdiv(N, BLOCK_M) + pid_m
        start = 0
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = tl.load(HEAD_IDS + pid_bh % NH).to(tl.int64)
    kvh = h // GROUP
    # the tile's tokens (a token layout's gather: q, k, v, out keep their order; a segment's positions)
    offs_m, qok, _ = _block(QSEG, pid_m, tl.arange(0, BLOCK_M), N, BLOCK_M, LAYOUT)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    qmask = qok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_base = Q + b * s_qb + h * s_qh + start * s_qn
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * s_qn + offs_d[None, :], mask=qmask, other=0.0)
    kstart = start
    if QSEG is not None:  # each key segment has its own offset (_attn_tile)
        kstart = 0
    k_base = K + b * s_kb + kvh * s_kh + kstart * s_kn
    v_base = V + b * s_vb + kvh * s_vh + kstart * s_vn
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    # stage 1: FULL key blocks, no predicate, no bounds (ragged blocks are listed PARTIAL)
    lo, hi = _stage_range(FULL_OFF, PART_OFF, row, 0)
    if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
        t = lo
        while t < hi:
            kb = tl.load(FULL_IDX + t)
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                       N, qk_scale, PRED, False, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64, LAYOUT, KSEG=KSEG)
            t += 1
    else:
        for t in range(lo, hi):
            kb = tl.load(FULL_IDX + t)
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                       N, qk_scale, PRED, False, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64, LAYOUT, KSEG=KSEG)
    # stage 2: PARTIAL key blocks, the pattern's predicate per pair
    lo, hi = _stage_range(FULL_OFF, PART_OFF, row, 1)
    if SEL_PRED is not None:  # stage 2': dynamic patterns, the static part's PARTIAL blocks and the selected ones
        t = lo
        while t < hi:
            kb = tl.load(PART_IDX + t)
            if kb >= 1073741824:
                if SEL_VARS:  # (a constexpr branch: a 3-argument SEL_PRED never meets a rank)
                    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb & 16777215, offs_m, offs_n,
                                               offs_d, s_kn, s_vn, N, qk_scale, SEL_PRED, True, BLOCK_N, HEAD_DIM,
                                               D_PAD, DOT_PREC, IDX64, LAYOUT, (kb >> 24) & 63)
                else:
                    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb - 1073741824, offs_m, offs_n,
                                               offs_d, s_kn, s_vn, N, qk_scale, SEL_PRED, True, BLOCK_N, HEAD_DIM,
                                               D_PAD, DOT_PREC, IDX64, LAYOUT)
            else:
                acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn,
                                           s_vn, N, qk_scale, PRED, True, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64,
                                           LAYOUT)
            t += 1
    elif INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
        t = lo
        while t < hi:
            kb = tl.load(PART_IDX + t)
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                       N, qk_scale, PRED, True, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64, LAYOUT, KSEG=KSEG)
            t += 1
    else:
        for t in range(lo, hi):
            kb = tl.load(PART_IDX + t)
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, s_kn, s_vn,
                                       N, qk_scale, PRED, True, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64, LAYOUT, KSEG=KSEG)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    o_base = O + b * s_ob + h * s_oh + start * s_on
    tl.store(o_base + offs_m[:, None].to(tl.int64) * s_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + (b * H + h) * LSE_N + start + offs_m, lse, mask=qok)


# --- the fast kernel (whole sequences: contiguous rows, or a token layout's gathered buffers): a work list of
# query blocks, heaviest first, with tensor-descriptor (TMA) loads.
# Launch-time switches (all tl.constexpr): EVEN (N % BLOCK_N == 0: no key bounds), FOLD (the softmax scale
# folded into one multiply-add, scale > 0), OFF32 (in-head offsets fit int32), CONTIG (every work item's
# FULL key blocks are one run: no index load per tile), TMA (0 pointer loads, 1 host tensor descriptors,
# 2 device tensor descriptors).
@triton.jit
def _load_rows(base, desc, b, h, row0, rows, offs_d, s_n, N, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, BOUND: tl.constexpr, OFF32: tl.constexpr, TMA: tl.constexpr):
    """A [BLOCK, D_PAD] tile of rows row0 .. row0 + BLOCK of one head (zeros outside)."""
    if TMA == 1:
        x = desc.load([b, h, row0, 0]).reshape(BLOCK, D_PAD)
    elif TMA == 2:
        x = desc.load([row0, 0])
    else:
        if OFF32:
            ptrs = base + rows[:, None] * s_n + offs_d[None, :]
        else:
            ptrs = base + rows[:, None].to(tl.int64) * s_n + offs_d[None, :]
        if BOUND:
            x = tl.load(ptrs, mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != D_PAD:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _allowed_at(ii, jj, N, PRED: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr, VAR=None):
    """The pattern allows query ii and key jj (index tensors broadcast against each other, in either
    orientation: [queries, keys] in the forward and dQ, [keys, queries] in dK/dV), and the key exists (EVEN
    says every key block is whole). VAR: a selection case's rank for a dispatching PRED, or None."""
    if IDX64:
        ii = ii.to(tl.int64)
        jj = jj.to(tl.int64)
    if VAR is None:
        ok = PRED(ii, jj, N)
    else:
        ok = PRED(ii, jj, N, VAR)
    if not EVEN:  # one return: triton compiles (and type-checks) a return after a constexpr branch's return too
        ok = ok & (jj < N)
    return ok


@triton.jit
def _pair_ok(offs_m, cols, N, PRED: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr, VAR=None):
    """[queries, keys]: _allowed_at for query rows offs_m and key columns cols."""
    return _allowed_at(offs_m[:, None], cols[None, :], N, PRED, IDX64, EVEN, VAR)


@triton.jit
def _masked(s, offs_m, qok, cols, N, NTOK, PRED: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr,
            LAYOUT: tl.constexpr):
    """Scores s of a PARTIAL tile with the pairs the pattern forbids at -inf. Without LAYOUT, offs_m and cols
    are the tokens. With it, rows of buffers gathered into the layout's order (`layout_order`): offs_m holds
    the query rows' tokens (qok: the row is no padding), the key rows' tokens come from LAYOUT here, and a
    pair is kept iff both rows hold a token and PRED allows them at the token count NTOK (padding rows,
    those past the buffer's N rows included, are never valid: no separate bound)."""
    if LAYOUT is None:
        ok = _pair_ok(offs_m, cols, N, PRED, IDX64, EVEN)
    else:
        ktok, kok = LAYOUT(cols, NTOK)
        ok = _pair_ok(offs_m, ktok, NTOK, PRED, IDX64, True) & qok[:, None] & kok[None, :]
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _online_softmax(s, m_i, l_i, qk_scale, FOLD: tl.constexpr, GUARD: tl.constexpr):
    """One key tile into the running softmax: (p, the old accumulator's rescale, l, m). FOLD: `s` is unscaled
    and the scale rides in the exponent's multiply-add. GUARD: a row may have no key yet (m = -inf), whose
    exponents must see 0 rather than inf - inf."""
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if GUARD:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if FOLD:
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fast_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kb, partial, offs_m, offs_n, offs_d,
               s_kn, s_vn, N, qk_scale, PRED: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
               EVEN: tl.constexpr, FOLD: tl.constexpr, OFF32: tl.constexpr, TMA: tl.constexpr, qok=None, NTOK=None,
               LAYOUT: tl.constexpr = None):
    """Key block kb into the running softmax. MASKED 0: a FULL block (no predicate, no bounds); 1: PARTIAL
    (the pattern's predicate per pair); 2: either, the run-time `partial` deciding (ONE_LOOP). offs_m: the
    query rows' indices as the predicate reads them (with LAYOUT, their tokens; qok: which rows hold one)."""
    cols = kb * BLOCK_N + offs_n
    bounds: tl.constexpr = MASKED > 0 and not EVEN
    k = _load_rows(k_base, k_desc, b, kvh, kb * BLOCK_N, cols, offs_d, s_kn, N, BLOCK_N, HEAD_DIM, D_PAD,
                   bounds, OFF32, TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if not FOLD:
        s = s * qk_scale
    if MASKED == 1:
        s = _masked(s, offs_m, qok, cols, N, NTOK, PRED, IDX64, EVEN, LAYOUT)
    elif MASKED == 2:
        if partial:
            s = _masked(s, offs_m, qok, cols, N, NTOK, PRED, IDX64, EVEN, LAYOUT)
    p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i, qk_scale, FOLD, MASKED > 0)
    v = _load_rows(v_base, v_desc, b, kvh, kb * BLOCK_N, cols, offs_d, s_vn, N, BLOCK_N, HEAD_DIM, D_PAD,
                   bounds, OFF32, TMA)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_stage(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, IDX, lo, hi, kb0, offs_m, offs_n, offs_d,
                s_kn, s_vn, N, qk_scale, PRED: tl.constexpr, MASKED: tl.constexpr, CONTIG: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                IDX64: tl.constexpr, EVEN: tl.constexpr, FOLD: tl.constexpr, OFF32: tl.constexpr,
                TMA: tl.constexpr, INTERPRET: tl.constexpr, qok=None, NTOK=None, LAYOUT: tl.constexpr = None):
    """Key blocks IDX[lo:hi] (or kb0 .. kb0 + hi - lo when CONTIG) into the running softmax; MASKED 0 or 1
    (qok, NTOK, LAYOUT: `_masked`'s, for buffers in a token layout's order)."""
    if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
        t = lo
        while t < hi:
            if CONTIG:
                kb = kb0 + t - lo
            else:
                kb = tl.load(IDX + t)
            acc, l_i, m_i = _fast_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kb, MASKED, offs_m,
                                       offs_n, offs_d, s_kn, s_vn, N, qk_scale, PRED, MASKED, BLOCK_N, HEAD_DIM,
                                       D_PAD, DOT_PREC, IDX64, EVEN, FOLD, OFF32, TMA, qok, NTOK, LAYOUT)
            t += 1
    elif CONTIG:
        for kb in range(kb0, kb0 + hi - lo):
            acc, l_i, m_i = _fast_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kb, MASKED, offs_m,
                                       offs_n, offs_d, s_kn, s_vn, N, qk_scale, PRED, MASKED, BLOCK_N, HEAD_DIM,
                                       D_PAD, DOT_PREC, IDX64, EVEN, FOLD, OFF32, TMA, qok, NTOK, LAYOUT)
    else:
        for t in range(lo, hi):
            kb = tl.load(IDX + t)
            acc, l_i, m_i = _fast_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kb, MASKED, offs_m,
                                       offs_n, offs_d, s_kn, s_vn, N, qk_scale, PRED, MASKED, BLOCK_N, HEAD_DIM,
                                       D_PAD, DOT_PREC, IDX64, EVEN, FOLD, OFF32, TMA, qok, NTOK, LAYOUT)
    return acc, l_i, m_i


@triton.jit
def _attn_one_loop(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, w, FULL_IDX, PART_IDX, offs_m, offs_n,
                   offs_d, s_kn, s_vn, N, qk_scale, PRED: tl.constexpr, CONTIG: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
                   EVEN: tl.constexpr, FOLD: tl.constexpr, OFF32: tl.constexpr, TMA: tl.constexpr,
                   INTERPRET: tl.constexpr, qok=None, NTOK=None, LAYOUT: tl.constexpr = None):
    """Work item w's FULL then PARTIAL key blocks as one loop (step t < nf: FULL block, else PARTIAL), so a
    row of few tiles pays one pipeline fill, not one per stage; the predicate runs under a run-time `if`."""
    flo = tl.load(w + 1)
    nf = tl.load(w + 2) - flo
    kb0 = tl.load(w + 3)
    plo = tl.load(w + 4)
    n = nf + tl.load(w + 5) - plo
    if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
        t = 0
        while t < n:
            kb, partial = _one_loop_block(t, nf, flo, kb0, plo, FULL_IDX, PART_IDX, CONTIG)
            acc, l_i, m_i = _fast_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kb, partial, offs_m,
                                       offs_n, offs_d, s_kn, s_vn, N, qk_scale, PRED, 2, BLOCK_N, HEAD_DIM, D_PAD,
                                       DOT_PREC, IDX64, EVEN, FOLD, OFF32, TMA, qok, NTOK, LAYOUT)
            t += 1
    else:
        for t in range(0, n):
            kb, partial = _one_loop_block(t, nf, flo, kb0, plo, FULL_IDX, PART_IDX, CONTIG)
            acc, l_i, m_i = _fast_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kb, partial, offs_m,
                                       offs_n, offs_d, s_kn, s_vn, N, qk_scale, PRED, 2, BLOCK_N, HEAD_DIM, D_PAD,
                                       DOT_PREC, IDX64, EVEN, FOLD, OFF32, TMA, qok, NTOK, LAYOUT)
    return acc, l_i, m_i


@triton.jit
def _one_loop_block(t, nf, flo, kb0, plo, FULL_IDX, PART_IDX, CONTIG: tl.constexpr):
    """Step t of a one-loop walk over a row's FULL (t < nf; with CONTIG the run kb0, kb0 + 1, ...) then
    PARTIAL blocks: (block, partial)."""
    partial = t >= nf
    kp = tl.load(PART_IDX + plo + t - nf, mask=partial, other=0)
    if CONTIG:
        kf = kb0 + t
    else:
        kf = tl.load(FULL_IDX + flo + t, mask=t < nf, other=0)
    return tl.where(partial, kp, kf), partial


@triton.jit(do_not_specialize=["N", "SLOTS", "NTOK"])
def _attn_fwd_fast(Q, K, V, O, LSE, q_desc, k_desc, v_desc, o_desc, WS_O, WS_L, HEAD_IDS, WORK, FULL_IDX, PART_IDX,
              s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
              N, H, NH, BHN, GROUP, SLOTS, qk_scale,
              PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr,
              FOLD: tl.constexpr, OFF32: tl.constexpr, CONTIG: tl.constexpr, TMA: tl.constexpr,
              INTERPRET: tl.constexpr, ONE_LOOP: tl.constexpr, LAYOUT: tl.constexpr = None, NTOK=None):
    # one work item: a query block (or a slice of its key blocks: `slot` >= 0), heaviest items first,
    # each for every (batch, head) before the next item starts
    # LAYOUT (with NTOK tokens): Q, K, V, O, LSE are buffers of N rows in the token layout's order
    # (`layout_order`); only PARTIAL tiles map rows to tokens (`_masked`), FULL tiles hold no padding row
    pid = tl.program_id(0)
    pid_bh = pid % BHN
    w = WORK + (pid // BHN) * 7
    pid_m = tl.load(w)
    b32 = pid_bh // NH
    h32 = tl.load(HEAD_IDS + pid_bh % NH)
    kvh32 = h32 // GROUP
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    kvh = kvh32.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + kvh * s_kh
    v_base = V + b * s_vb + kvh * s_vh
    if TMA == 2:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N, HEAD_DIM], strides=[s_qn, 1], block_shape=[BLOCK_M, D_PAD])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[N, HEAD_DIM], strides=[s_kn, 1], block_shape=[BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[N, HEAD_DIM], strides=[s_vn, 1], block_shape=[BLOCK_N, D_PAD])
    q = _load_rows(q_base, q_desc, b32, h32, pid_m * BLOCK_M, offs_m, offs_d, s_qn, N, BLOCK_M, HEAD_DIM, D_PAD,
                   True, OFF32, TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    qtok = offs_m  # the query rows as the predicate reads them
    qok = None
    if LAYOUT is not None:  # once per program: the rows' tokens
        qtok, qok = LAYOUT(offs_m, NTOK)
    if ONE_LOOP:  # FULL then PARTIAL blocks in one pipelined loop: no second prologue for a short row's tail
        acc, l_i, m_i = _attn_one_loop(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b32, kvh32, w, FULL_IDX,
                                       PART_IDX, qtok, offs_n, offs_d, s_kn, s_vn, N, qk_scale, PRED, CONTIG,
                                       BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64, EVEN, FOLD, OFF32, TMA, INTERPRET,
                                       qok, NTOK, LAYOUT)
    else:
        # stage 1: FULL key blocks, no predicate, no bounds (ragged blocks are listed PARTIAL)
        acc, l_i, m_i = _attn_stage(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b32, kvh32, FULL_IDX,
                                    tl.load(w + 1), tl.load(w + 2), tl.load(w + 3), qtok, offs_n, offs_d, s_kn,
                                    s_vn, N, qk_scale, PRED, 0, CONTIG, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64,
                                    EVEN, FOLD, OFF32, TMA, INTERPRET, qok, NTOK, LAYOUT)
        # stage 2: PARTIAL key blocks, the pattern's predicate per pair
        acc, l_i, m_i = _attn_stage(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b32, kvh32, PART_IDX,
                                    tl.load(w + 4), tl.load(w + 5), 0, qtok, offs_n, offs_d, s_kn, s_vn,
                                    N, qk_scale, PRED, 1, False, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC, IDX64, EVEN,
                                    FOLD, OFF32, TMA, INTERPRET, qok, NTOK, LAYOUT)
    _store_item(acc, l_i, m_i, tl.load(w + 6), O, LSE, o_desc, WS_O, WS_L, b32, h32, pid_bh, pid_m, offs_m, offs_d,
                s_ob, s_oh, s_on, N, H, SLOTS, BLOCK_M, HEAD_DIM, D_PAD, TMA)


@triton.jit
def _store_item(acc, l_i, m_i, slot, O, LSE, o_desc, WS_O, WS_L, b32, h32, pid_bh, pid_m, offs_m, offs_d,
                s_ob, s_oh, s_on, N, H, SLOTS, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                TMA: tl.constexpr):
    """A work item's result: the output rows and their log-sum-exp (zeros and -inf where no key was
    allowed), or, for one slice of a heavy query block (slot >= 0), its partial result in the workspace,
    merged by _attn_combine."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    rows = tl.arange(0, BLOCK_M)
    if slot < 0:
        if TMA == 1:
            o_desc.store([b32, h32, pid_m * BLOCK_M, 0], out.to(O.dtype.element_ty).reshape(1, 1, BLOCK_M, D_PAD))
        else:
            o_base = O + b32.to(tl.int64) * s_ob + h32.to(tl.int64) * s_oh
            omask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
            tl.store(o_base + offs_m[:, None].to(tl.int64) * s_on + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=omask)
        tl.store(LSE + (b32.to(tl.int64) * H + h32) * N + offs_m, lse2 / 1.4426950408889634, mask=offs_m < N)
    else:
        ws = (pid_bh.to(tl.int64) * SLOTS + slot) * BLOCK_M
        tl.store(WS_O + (ws + rows[:, None]) * D_PAD + offs_d[None, :], out)
        tl.store(WS_L + ws + rows, lse2)


@triton.jit(do_not_specialize=["N", "SLOTS"])
def _attn_combine(O, LSE, WS_O, WS_L, HEAD_IDS, SPLITS, s_ob, s_oh, s_on, N, H, NH, BHN, SLOTS,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the slices of one heavy query block (log-sum-exp weighted) into O and LSE."""
    pid_bh = tl.program_id(0) % BHN
    sp = SPLITS + (tl.program_id(0) // BHN) * 3
    pid_m = tl.load(sp)
    lo = tl.load(sp + 1)
    hi = tl.load(sp + 2)
    b = (pid_bh // NH).to(tl.int64)
    h = tl.load(HEAD_IDS + pid_bh % NH).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    s = lo
    while s < hi:
        ws = (pid_bh.to(tl.int64) * SLOTS + s) * BLOCK_M
        ls = tl.load(WS_L + ws + rows)
        o = tl.load(WS_O + (ws + rows[:, None]) * D_PAD + offs_d[None, :])
        acc, l_i, m_i = _merge_part(acc, l_i, m_i, o, ls)
        s += 1
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    offs_m = pid_m * BLOCK_M + rows
    o_base = O + b * s_ob + h * s_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * s_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + (b * H + h) * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _merge_part(acc, l_i, m_i, o, ls):
    """One slice's partial result (rows normalised: o; their log2-sum-exp: ls, -inf where the slice saw no
    key) into a running log-sum-exp merge (acc, l, m)."""
    m_new = tl.maximum(m_i, ls)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    wt = tl.math.exp2(ls - m_use)
    return acc * alpha[:, None] + o * wt[:, None], l_i * alpha + wt, m_new


# --- a token layout as a permutation (`layout_order`): the rows <-> tokens index and the gathers
@triton.jit
def _layout_index(ROW_TOKEN, TOKEN_ROW, NP, N, LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    """ROW_TOKEN[r]: row r's token, -1 for a padding row; TOKEN_ROW[t]: token t's row."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tok, ok = LAYOUT(r, N)
    ok = ok & (r < NP)
    tl.store(ROW_TOKEN + r, tl.where(ok, tok, -1), mask=r < NP)
    tl.store(TOKEN_ROW + tok, r, mask=ok)


@triton.jit
def _gather_rows(SRC, DST, INDEX, HEADS, s_sb, s_sh, s_sn, s_db, s_dh, s_dn, ROWS, NH, HEAD_DIM: tl.constexpr,
                 D_PAD: tl.constexpr, BLOCK: tl.constexpr, LSE_SRC=None, LSE_DST=None, H=0, SRC_ROWS=0):
    """DST[b, h, r] = SRC[b, h, INDEX[r]] for rows r < ROWS of heads HEADS (every batch), zeros where
    INDEX[r] < 0. With LSE_SRC, also LSE_DST[b, h, r] = LSE_SRC[b, h, INDEX[r]] (both contiguous [B, H, *],
    SRC_ROWS and ROWS rows)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = tl.load(HEADS + pid_bh % NH).to(tl.int64)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = r < ROWS
    src = tl.load(INDEX + r, mask=inside, other=-1)
    d = tl.arange(0, D_PAD)
    cols = (d < HEAD_DIM)[None, :]
    x = tl.load(SRC + b * s_sb + h * s_sh + src[:, None].to(tl.int64) * s_sn + d[None, :],
                mask=(src >= 0)[:, None] & cols, other=0.0)
    tl.store(DST + b * s_db + h * s_dh + r[:, None].to(tl.int64) * s_dn + d[None, :], x, mask=inside[:, None] & cols)
    if LSE_SRC is not None:
        lse = tl.load(LSE_SRC + (b * H + h) * SRC_ROWS + src, mask=src >= 0, other=float("-inf"))
        tl.store(LSE_DST + (b * H + h) * ROWS + r, lse, mask=inside)
