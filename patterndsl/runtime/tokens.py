"""Token-level selectors (`vertical`, `slash`): column and diagonal scores, the selection, and attention.

docs/language.md defines them: from the last `r` query rows' softmax (over the keys the selector's context
allows, scaled by the call's scale) a column j scores the sum of its probabilities and a diagonal d >= 0
the sum of the probabilities at j = i - d; `vertical(n)` keeps the n best columns and `slash(n)` the n best
diagonals, ties to the lower index, one choice per (batch, query head). Then `allowed(i, j) = P_v(i, j)`,
v = [j in V] + 2 [i - j in S] (`selectors.TokenSplit`). Selection is not differentiated.

The kernel visits, per program (one or two query tiles), three disjoint sets of pairs, so no pair counts
twice and memory stays O(N * n) (a membership byte per key and per offset, a bit per offset, the sorted
columns, a byte per tile diagonal):
  A. the static part's tiles (tables of P_0) that no selected diagonal touches, without the selected
     columns (P_0 holds there, since no offset there is selected);
  B. the tiles that a selected diagonal touches in any of the program's query tiles (with square tiles,
     a diagonal touches tile diagonals d // tile and d // tile + 1 in every query tile), every pair by its
     case P_v;
  C. the selected columns outside B's tiles, gathered BLOCK at a time, by P_1 (vertical only).
The same walk serves the forward (online softmax) and the backward (dQ in registers, dK and dV added
atomically in float32), over tables the forward builds once and keeps for the backward (`token_walk`).
A tile's work is its two products and the softmax: its K and V loads wait on nothing but the key tile's
index (`token_early_kv`), and pass B's case comes from a few words of membership bits per tile (which the
pipeline prefetches with K and V) shifted per pair (`token_bits`), not bytes loaded per key and per pair.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import triton
import triton.language as tl

from .common import _INTERPRET, _LOG2E, _d_pad, _dot_prec, _heads, _torch_path
from .evaluate import evaluate
from .fwd_kernels import _online_softmax, _stage_range
from .options import current_options, restored
from .selection import _ordered_keys, _spans, compressed_weights
from .tables import block_tables

if TYPE_CHECKING:
    from .spec import PatternSpec, TokenSelection

TILE = 64  # the kernel's square tile (query and key), also the unit of the tile diagonals


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` indices of highest score per row (ties: lower index first), sorted ascending, int64.
    float64 scores sort in float64 (the tests' reference precision); float32 ones through `_ordered_keys`."""
    n = score.shape[-1]
    count = min(count, n)
    if score.dtype == torch.float64:
        picked = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :count]
    else:
        keys = torch.topk(_ordered_keys(score.float()), count, dim=-1).values
        picked = n - 1 - (keys & 0xFFFFFFFF)
    return torch.sort(picked, dim=-1).values


def token_scores(q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, group: int, context: Any, last: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(column scores, diagonal scores), each [B, len(heads), N] (float64 for float64 inputs, else float32):
    for query head heads[x] (against KV head heads[x] // group), the softmax of the last `last` rows over
    the keys `context` (an index expression) allows, summed per key column and per offset d = i - j in
    [0, N). One KV head at a time, its query heads' rows stacked: memory O(group * last * N)."""
    B, _, N, D = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    L = min(last, N)
    r0 = N - L
    i = torch.arange(r0, N, device=q.device)[:, None]
    j = torch.arange(N, device=q.device)[None, :]
    ok = torch.broadcast_to(torch.as_tensor(evaluate(context, i, j, N), device=q.device), (L, N))
    nh = heads.numel()
    cols = torch.zeros((B, nh, N), dtype=work, device=q.device)
    diags = torch.zeros((B, nh, N), dtype=work, device=q.device)
    for kvh in torch.unique(heads // group).tolist():
        mine = torch.nonzero(heads // group == kvh).squeeze(1)
        g = mine.numel()
        p = compressed_weights(q[:, heads[mine], r0:].to(work).reshape(B, g * L, D), k[:, kvh].to(work),
                               ok.repeat(g, 1), scale=scale).view(B, g, L, N)
        cols[:, mine] = p.sum(-2)
        # rows last first, keys reversed, each row shifted left by its rank: column d holds offset d
        z = torch.nn.functional.pad(p.flip(-2).flip(-1), (0, L)).contiguous()
        skew = z.as_strided((B, g, L, N), (z.stride(0), z.stride(1), N + L + 1, 1))
        diags[:, mine] = skew.sum(-2)
    return cols, diags


def select_tokens(sel: TokenSelection, spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor,
                  scale: float, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, offsets) the selectors keep for query heads `heads`: [B, len(heads), n] each, ascending,
    int64 (n = 0 where the selector is absent). Scores are shared where both selectors score alike."""
    B, _, N, _ = q.shape
    wants = ((sel.vertical, sel.last_vertical, sel.contexts[0]), (sel.slash, sel.last_slash, sel.contexts[1]))
    memo: dict[tuple[int, Any], tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for pick, (count, last, ctx) in enumerate(wants):
        if count == 0:
            out.append(torch.zeros((B, heads.numel(), 0), dtype=torch.int64, device=q.device))
            continue
        key = (min(last, N), spec.predicates[ctx].expr)
        if key not in memo:
            memo[key] = token_scores(q, k, heads, group, spec.predicates[ctx].expr, last, scale)
        out.append(_top(memo[key][pick], count))
    return out[0], out[1]


def membership(cols: torch.Tensor, offs: torch.Tensor, n: int) -> torch.Tensor:
    """int8 [rows, 2, n]: per (batch * head) row whether key j is a selected column ([:, 0]) and whether
    offset d is a selected diagonal ([:, 1])."""
    rows = cols.shape[0] * cols.shape[1]
    out = torch.zeros((rows, 2, n), dtype=torch.int8, device=cols.device)
    out[:, 0].scatter_(1, cols.reshape(rows, -1), 1)
    out[:, 1].scatter_(1, offs.reshape(rows, -1), 1)
    return out


def token_cases(spec: PatternSpec, pat: int, member: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                n: int) -> torch.Tensor:
    """The mask [rows, len(i), len(j)] of a token-selector pattern from its membership: P_v per pair."""
    sel = spec.token_selection(pat)
    assert sel is not None
    d = i - j
    in_v = member[:, 0][:, None, j[0]] != 0
    in_s = (member[:, 1][:, torch.clamp(d, 0, n - 1)] != 0) & (d >= 0)[None]
    case = in_v.long() + 2 * in_s.long()
    ok = torch.zeros(case.shape, dtype=torch.bool, device=case.device)
    for v, c in enumerate(sel.cases):
        if c >= 0:
            ok = torch.where(case == v, torch.as_tensor(evaluate(spec.predicates[c].expr, i, j, n)), ok)
    return ok


# --- the kernel --------------------------------------------------------------------------------------------


class KernelWalk(NamedTuple):
    """A pattern's tables for the kernel (`_walk`), per (batch * head) row r and per program p (query rows
    p * block_m ..., `block_m` a multiple of TILE): P_0's tiles (f_off, f_idx, p_off, p_idx: block_tables of
    block_m x TILE); `cols` the selected columns ascending and `crange` [rows, programs, 2] those P_1 may
    allow; `member` the membership bytes; `diag` [rows, tiles + block_m // TILE - 1] a byte per tile
    diagonal e (counted from the program's last query tile) some selected diagonal touches in some of the
    program's query tiles, `dlist` those e ascending and `dcount` [rows, programs] how many leave a key
    tile >= 0; `bits` int64 [rows, 2, tiles] (`member_bits`): the membership as bits;
    `offs` the selected offsets, int64 [rows, n] (another block_m's tables are built from them)."""

    f_off: torch.Tensor
    f_idx: torch.Tensor
    p_off: torch.Tensor
    p_idx: torch.Tensor
    cols: torch.Tensor
    crange: torch.Tensor
    member: torch.Tensor
    diag: torch.Tensor
    dlist: torch.Tensor
    dcount: torch.Tensor
    bits: torch.Tensor
    offs: torch.Tensor
    block_m: int

    @property
    def tables(self) -> tuple[torch.Tensor, ...]:
        """What the kernel reads, in its arguments' order (F_OFF ... MBITS)."""
        return (self.f_off, self.f_idx, self.p_off, self.p_idx, self.cols, self.crange, self.member, self.diag,
                self.dlist, self.dcount, self.bits)


Walk = KernelWalk | tuple[torch.Tensor]  # a pattern's tables for the kernel or the PyTorch path (`token_walk`)


@triton.jit  # type: ignore[untyped-decorator]
def _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, lok, s_kn, s_vn, s_dn,  # type: ignore[no-untyped-def]
          qk_scale, sm_scale, offs_d, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BWD: tl.constexpr,
          EARLY_KV: tl.constexpr, FOLD: tl.constexpr):
    """One tile of keys `cols` (gathered rows) for the program's queries, pairs `ok` only; `lok`: the
    columns that exist. Forward: the online softmax (acc, l_i, m_i in base 2). Backward: acc is dQ; dK and
    dV are added atomically. EARLY_KV loads K and V by `lok` alone, so the loads need not wait on the
    pairs' reduction over the rows (a column no pair takes is read for nothing); else by that reduction.
    FOLD (forward, qk_scale > 0): the scale rides in the exponent's multiply-add (`_online_softmax`)."""
    dmask = offs_d[None, :] < HEAD_DIM
    rows = cols[:, None].to(tl.int64)
    if BWD or not EARLY_KV:  # the keys some row of the tile may use (a reduction over the mask)
        reached = (tl.max(ok.to(tl.int32), 0) > 0)[:, None] & dmask
    if EARLY_KV:
        lmask = lok[:, None] & dmask
    else:
        lmask = reached
    k = tl.load(k_base + rows * s_kn + offs_d[None, :], mask=lmask, other=0.0)
    v = tl.load(v_base + rows * s_vn + offs_d[None, :], mask=lmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if BWD:
        p = tl.where(ok, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None]) * sm_scale
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        ptr = rows * s_dn + offs_d[None, :]
        tl.atomic_add(dk_base + ptr, dk, mask=reached)
        tl.atomic_add(dv_base + ptr, dv, mask=reached)
        m_new = m_i
    else:
        if not FOLD:
            s = s * qk_scale
        p, alpha, l_i, m_new = _online_softmax(tl.where(ok, s, float("-inf")), m_i, l_i, qk_scale, FOLD, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit  # type: ignore[untyped-decorator]
def _static(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem, diag, F_IDX, P_IDX, t, top,  # type: ignore[no-untyped-def]
            NDIAG, offs_m, offs_n, offs_d, N, s_kn, s_vn, qk_scale, sm_scale, PRED: tl.constexpr,
            FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
            DOT_PREC: tl.constexpr, BWD: tl.constexpr, EARLY_KV: tl.constexpr, FOLD: tl.constexpr):
    """Pass A's key tile kt, entry t of P_0's FULL (FULL) or PARTIAL table: P_0 without the selected
    columns, none where a selected diagonal touches the tile (tile diagonal e = top - kt: pass B's). In a
    FULL tile P_0 holds on every pair, not evaluated. A tile pass B takes is computed here with no pair
    rather than skipped by a branch: an accumulator through a branch makes ptxas wait on every warpgroup
    MMA of the kernel (its C7515), and few of pass A's tiles are pass B's."""
    if FULL:
        kt = tl.load(F_IDX + t)
    else:
        kt = tl.load(P_IDX + t)
    e = top - kt
    off_b = tl.load(diag + e, mask=(e >= 0) & (e < NDIAG), other=0) == 0
    cols = kt * BLOCK_N + offs_n
    kok = cols < N
    keep = kok & (tl.load(mem + cols, mask=kok, other=0) == 0) & off_b
    if FULL:
        ok = tl.broadcast_to(keep[None, :], [BLOCK_M, BLOCK_N])
    else:
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        ok = PRED(offs_m[:, None], cols[None, :], N, zero) & keep[None, :]
    return _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, kok & off_b, s_kn,
                 s_vn, HEAD_DIM, qk_scale, sm_scale, offs_d, HEAD_DIM, DOT_PREC, BWD, EARLY_KV, FOLD)


@triton.jit  # type: ignore[untyped-decorator]
def _band(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem, bits, kt, b, offs_m, offs_n,  # type: ignore[no-untyped-def]
          offs_d, N, s_kn, s_vn, qk_scale, sm_scale, PRED: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BWD: tl.constexpr,
          EARLY_KV: tl.constexpr, BITS: tl.constexpr, FOLD: tl.constexpr):
    """Pass B's key tile kt (>= 0): every pair by its case v = [j in V] + 2 [i - j in S]. The program's
    first query tile lies b tile diagonals above kt. BITS: [j in V] from word kt of the column bits,
    [i - j in S] from the offset bits' words b - 1 ... b + BLOCK_M // 64 (64-bit work per row, 32-bit per
    pair); else bytes from the membership, one per key and one per pair."""
    cols = kt * BLOCK_N + offs_n
    kok = cols < N
    if BITS:
        tl.static_assert(BLOCK_N == 64, "a key tile is one 64-bit word of the column bits")
        nw = tl.cdiv(N, 64)
        v_word = tl.load(bits + kt, mask=kt < nw, other=0).to(tl.uint64, bitcast=True)
        in_v = ((v_word >> offs_n.to(tl.uint64)) & 1).to(tl.int32)
        # row r's 64 offsets from p = 64 (b - 1) + r + 1 up: a funnel shift of two words (per row, cheap);
        # pair (r, c) is offset p + 63 - c: bit 63 - c, a 32-bit shift per pair
        r1 = tl.arange(0, BLOCK_M) + 1
        first = r1 // 64
        at_bit = (r1 % 64).to(tl.uint64)
        lo = tl.zeros([BLOCK_M], dtype=tl.uint64)
        hi = tl.zeros([BLOCK_M], dtype=tl.uint64)
        for w in tl.static_range(BLOCK_M // 64 + 2):
            at = b - 1 + w
            word = tl.load(bits + nw + at, mask=(at >= 0) & (at < nw), other=0)
            word = word.to(tl.uint64, bitcast=True)
            lo = tl.where(first == w, word, lo)
            hi = tl.where(first + 1 == w, word, hi)
        x = (lo >> at_bit) | ((hi << (63 - at_bit)) << 1)
        half = tl.where(offs_n[None, :] < 32, (x >> 32).to(tl.uint32)[:, None], x.to(tl.uint32)[:, None])
        in_s = ((half >> ((31 - offs_n) & 31).to(tl.uint32)[None, :]) & 1).to(tl.int32)
    else:
        in_v = (tl.load(mem + cols, mask=kok, other=0) != 0).to(tl.int32)
        off = offs_m[:, None] - cols[None, :]
        in_s = (tl.load(mem + N + off, mask=(off >= 0) & (off < N), other=0) != 0).to(tl.int32)
    ok = PRED(offs_m[:, None], cols[None, :], N, in_v[None, :] + 2 * in_s) & kok[None, :]
    return _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, kok, s_kn, s_vn,
                 HEAD_DIM, qk_scale, sm_scale, offs_d, HEAD_DIM, DOT_PREC, BWD, EARLY_KV, FOLD)


@triton.jit  # type: ignore[untyped-decorator]
def _gathered(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, col_list, c, c_hi, diag, top,  # type: ignore[no-untyped-def]
              NDIAG, offs_m, offs_n, offs_d, N, s_kn, s_vn, qk_scale, sm_scale, PRED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
              BWD: tl.constexpr, EARLY_KV: tl.constexpr, FOLD: tl.constexpr):
    """Pass C: the selected columns c .. c + BLOCK_N (below c_hi) whose tile pass B does not visit, by P_1."""
    idx = c + offs_n
    valid = idx < c_hi
    cols = tl.load(col_list + idx, mask=valid, other=0)
    e = top - cols // BLOCK_N
    on_b = tl.load(diag + e, mask=valid & (e >= 0) & (e < NDIAG), other=0) != 0
    one = tl.full([BLOCK_M, BLOCK_N], 1, dtype=tl.int32)
    ok = PRED(offs_m[:, None], cols[None, :], N, one) & (valid & ~on_b & (cols < N))[None, :]
    return _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, valid, s_kn, s_vn,
                 HEAD_DIM, qk_scale, sm_scale, offs_d, HEAD_DIM, DOT_PREC, BWD, EARLY_KV, FOLD)


@triton.jit  # type: ignore[untyped-decorator]
def _token_attn(Q, K, V, O, LSE, DO, DELTA, DQ, DK, DV, HEAD_IDS, F_OFF, F_IDX, P_OFF, P_IDX,  # type: ignore[no-untyped-def]  # noqa: E741
                COLS, CRANGE, MEMBER, DIAG, DLIST, DCOUNT, MBITS, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh,
                s_vn, N, H, HKV, NH, GROUP, NV, NDIAG, qk_scale, sm_scale, PRED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                DOT_PREC: tl.constexpr, BWD: tl.constexpr, EARLY_KV: tl.constexpr, BITS: tl.constexpr, FOLD: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Program (query rows BLOCK_M at a time, batch * head of this pattern): passes A, B, C of the module's
    docstring over `KernelWalk`'s tables (BLOCK_N = TILE, BLOCK_M a multiple of it; with BLOCK_M > TILE the
    query tiles of a program share every key tile any of them visits, pairs still by their own case).
    O, DO, DQ: [B, H, N, D] contiguous; DK, DV: float32 [B, HKV, N, D] contiguous; LSE, DELTA [B, H, N].
    Query rows past N compute unmasked (their rows are zero, a backward's lse infinite) and are not stored."""
    pid_m = tl.cdiv(N, BLOCK_M) - 1 - tl.program_id(0)  # heavy (late) query rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = tl.load(HEAD_IDS + pid_bh % NH).to(tl.int64)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    top = (pid_m + 1) * (BLOCK_M // BLOCK_N) - 1  # the program's last query tile
    qok = offs_m < N
    qmask = qok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qn + offs_d[None, :], mask=qmask,
                other=0.0)
    k_base = K + b * s_kb + kvh * s_kh
    v_base = V + b * s_vb + kvh * s_vh
    row_o = ((b * H + h) * N).to(tl.int64)
    o_ptr = (row_o + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    kv_row = ((b * HKV + kvh) * N).to(tl.int64)
    dk_base = DK + kv_row * HEAD_DIM
    dv_base = DV + kv_row * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    do = q  # (forward: unused)
    lse2 = l_i
    delta = l_i
    if BWD:
        do = tl.load(DO + o_ptr, mask=qmask, other=0.0)
        lse = tl.load(LSE + row_o + offs_m, mask=qok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + row_o + offs_m, mask=qok, other=0.0)
    mem = MEMBER + pid_bh.to(tl.int64) * 2 * N
    diag = DIAG + pid_bh.to(tl.int64) * NDIAG
    bits = MBITS + pid_bh.to(tl.int64) * 2 * tl.cdiv(N, 64)  # (64-bit words)
    row_p = pid_bh.to(tl.int64) * tl.cdiv(N, BLOCK_M) + pid_m  # this program's row of DCOUNT and CRANGE
    # A: the static part's tiles off the selected diagonals, without the selected columns
    for stage in tl.static_range(2):
        lo, hi = _stage_range(F_OFF, P_OFF, pid_m, stage)
        if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
            t = lo
            while t < hi:
                acc, l_i, m_i = _static(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem,
                                        diag, F_IDX, P_IDX, t, top, NDIAG, offs_m, offs_n, offs_d, N, s_kn, s_vn,
                                        qk_scale, sm_scale, PRED, stage == 0, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC,
                                        BWD, EARLY_KV, FOLD)
                t += 1
        else:
            for t in range(lo, hi):
                acc, l_i, m_i = _static(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem,
                                        diag, F_IDX, P_IDX, t, top, NDIAG, offs_m, offs_n, offs_d, N, s_kn, s_vn,
                                        qk_scale, sm_scale, PRED, stage == 0, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC,
                                        BWD, EARLY_KV, FOLD)
    # B: the tiles a selected diagonal touches, every pair by its case
    nd = tl.load(DCOUNT + row_p)  # the tile diagonals e <= top: key tile top - e >= 0
    dl = DLIST + pid_bh.to(tl.int64) * NDIAG
    if INTERPRET:
        t = 0
        while t < nd:
            kt = top - tl.load(dl + t)
            acc, l_i, m_i = _band(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem, bits,
                                  kt, pid_m * (BLOCK_M // BLOCK_N) - kt, offs_m, offs_n, offs_d, N,
                                  s_kn, s_vn, qk_scale, sm_scale, PRED, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC, BWD,
                                  EARLY_KV, BITS, FOLD)
            t += 1
    else:
        for t in range(0, nd):
            kt = top - tl.load(dl + t)
            acc, l_i, m_i = _band(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem, bits,
                                  kt, pid_m * (BLOCK_M // BLOCK_N) - kt, offs_m, offs_n, offs_d, N,
                                  s_kn, s_vn, qk_scale, sm_scale, PRED, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC, BWD,
                                  EARLY_KV, BITS, FOLD)
    # C: the selected columns outside B's tiles, gathered
    c_lo = tl.load(CRANGE + row_p * 2)
    c_hi = tl.load(CRANGE + row_p * 2 + 1)
    col_list = COLS + pid_bh.to(tl.int64) * NV
    if INTERPRET:
        c = c_lo
        while c < c_hi:
            acc, l_i, m_i = _gathered(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, col_list,
                                      c, c_hi, diag, top, NDIAG, offs_m, offs_n, offs_d, N, s_kn, s_vn, qk_scale,
                                      sm_scale, PRED, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC, BWD, EARLY_KV, FOLD)
            c += BLOCK_N
    else:
        for c in range(c_lo, c_hi, BLOCK_N):
            acc, l_i, m_i = _gathered(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, col_list,
                                      c, c_hi, diag, top, NDIAG, offs_m, offs_n, offs_d, N, s_kn, s_vn, qk_scale,
                                      sm_scale, PRED, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC, BWD, EARLY_KV, FOLD)
    if BWD:
        tl.store(DQ + o_ptr, acc.to(DQ.dtype.element_ty), mask=qmask)
    else:
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(O + o_ptr, out.to(O.dtype.element_ty), mask=qmask)
        tl.store(LSE + row_o + offs_m, lse, mask=qok)


def member_bits(cols: torch.Tensor, offs: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [rows, 2, ceil(n / 64)]: bit b of word w of [:, 0] set where key 64 w + b is among a row's
    columns `cols`, of [:, 1] where offset 64 w + b is among its offsets `offs` (each [rows, k], distinct
    per row, so adding their bits is or-ing them)."""
    words = torch.zeros((offs.shape[0], 2, -(-n // 64)), dtype=torch.int64, device=offs.device)
    for side, picked in enumerate((cols.long(), offs)):
        words[:, side].scatter_add_(1, picked // 64, torch.bitwise_left_shift(torch.ones_like(picked), picked % 64))
    return words


def _walk(spec: PatternSpec, pat: int, cols: torch.Tensor, offs: torch.Tensor, n: int, device: torch.device,
          block_m: int, member: torch.Tensor | None = None) -> KernelWalk:
    """The kernel's tables for one pattern and query rows `block_m` per program (`KernelWalk`); `member`:
    the picks' membership bytes where already built."""
    sel = spec.token_selection(pat)
    assert sel is not None
    rows = cols.shape[0] * cols.shape[1]
    span = block_m // TILE  # query tiles per program
    nkt = -(-n // TILE)
    nprog = -(-n // block_m)
    f_off, f_idx, p_off, p_idx = block_tables(spec, n, block_m, TILE, device, pat, layout=False)
    member = membership(cols, offs, n) if member is None else member
    offs = offs.reshape(rows, -1)
    # a diagonal d touches tile diagonals d // TILE and d // TILE + 1 of every query tile (index nkt: none)
    touched = torch.zeros((rows, nkt + 1), dtype=torch.int8, device=device)
    touched.scatter_(1, offs // TILE, 1)
    touched.scatter_(1, torch.where(offs % TILE != 0, offs // TILE + 1, nkt), 1)
    # counted from the program's last query tile, query tile span - 1 - s sees them s further
    ndiag = nkt + span - 1
    diag = torch.zeros((rows, ndiag), dtype=torch.int8, device=device)
    for s in range(span):
        diag[:, s:s + nkt] = torch.maximum(diag[:, s:s + nkt], touched[:, :nkt])
    dlist = torch.sort(torch.where(diag != 0, torch.arange(ndiag, device=device), ndiag), 1).values
    dlist = dlist.to(torch.int32).contiguous()
    # per program, how many of them are <= its last query tile (their key tile exists)
    tops = (torch.arange(nprog, device=device, dtype=torch.int32) + 1) * span - 1
    dcount = torch.searchsorted(dlist, tops.expand(rows, -1).contiguous(), right=True).to(torch.int32)
    cols = cols.reshape(rows, -1).to(torch.int32).contiguous()
    crange = torch.zeros((rows, nprog, 2), dtype=torch.int32, device=device)
    if sel.cases[1] >= 0 and cols.shape[1]:
        # per program the key tiles [lo, hi) holding every pair P_1 allows
        bounds = _spans(spec, sel.cases[1], n, TILE, span, device)[1]
        for end in range(2):
            crange[..., end] = torch.searchsorted(cols, (bounds[:, end] * TILE).expand(rows, -1).contiguous())
    return KernelWalk(f_off, f_idx, p_off, p_idx, cols, crange, member, diag.contiguous(), dlist,
                      dcount.contiguous(), member_bits(cols, offs, n), offs, block_m)


def token_walk(spec: PatternSpec, pat: int, q: torch.Tensor, picks: tuple[torch.Tensor, torch.Tensor]) -> Walk:
    """What pattern `pat`'s forward and backward both read, built once from its picks and kept for the
    backward: the kernel's tables (`_walk`, query rows per program from the options' `token_rows`), or on
    the PyTorch path the membership bytes alone (a 1-tuple)."""
    if _torch_path(q):
        return (membership(*picks, q.shape[2]),)
    rows = current_options().token_rows
    if rows not in (TILE, 2 * TILE):
        raise ValueError(f"token_rows must be {TILE} or {2 * TILE}, got {rows}")
    return _walk(spec, pat, picks[0], picks[1], q.shape[2], q.device, rows)


def _launch(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor,
            walk: KernelWalk, scale: float, group: int, out: torch.Tensor, lse: torch.Tensor,
            grads: tuple[torch.Tensor, ...] | None = None) -> None:
    """One kernel launch over the heads `heads` of pattern `pat` with its tables `walk` (forward, or
    backward with `grads` = (do, delta, dq, dk32, dv32))."""
    sel = spec.token_selection(pat)
    assert sel is not None
    B, H, N, D = q.shape
    nh = heads.numel()
    do, delta, dq, dk, dv = grads if grads is not None else (out, lse, out, lse, lse)
    prec = _dot_prec(q)
    opts = current_options()
    bm = walk.block_m
    _token_attn[(-(-N // bm), B * nh)](
        q, k, v, out, lse, do, delta, dq, dk, dv, heads, *walk.tables,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        N, H, k.shape[1], nh, group, walk.cols.shape[1], walk.diag.shape[1], scale * _LOG2E, scale,
        PRED=sel.dispatch, BLOCK_M=bm, BLOCK_N=TILE, HEAD_DIM=D, D_PAD=_d_pad(D), DOT_PREC=prec,
        BWD=grads is not None, EARLY_KV=opts.token_early_kv, BITS=opts.token_bits, FOLD=opts.fold and scale > 0,
        INTERPRET=_INTERPRET,
        num_warps=8 if grads is not None else opts.token_warps or 4 * (bm // TILE),
        num_stages=1 if grads is not None or _INTERPRET else opts.token_stages,
    )  # sm_90, D = 128 (benchmarks/kernel_resources.py): the backward spills least at 8 warps, 1 stage


def token_picks(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, scale: float,
                group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns and offsets pattern `pat` keeps for the query heads `heads`: [B, len(heads), n] each."""
    sel = spec.token_selection(pat)
    assert sel is not None
    return select_tokens(sel, spec, q, k, heads, scale, group)


def token_forward(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  heads: torch.Tensor, walk: Walk, scale: float, group: int, out: torch.Tensor,
                  lse: torch.Tensor) -> None:
    """Pattern `pat`'s heads `heads` into `out` and `lse` ([B, H, N, D] and [B, H, N], written in place);
    `walk`: `token_walk`'s."""
    B, H, N, D = q.shape
    if _torch_path(q):
        _cpu(spec, pat, q, k, v, heads, walk[0], scale, group, out, lse)
        return
    o = out if out.is_contiguous() else torch.empty_like(out)
    ls = lse if lse.is_contiguous() else torch.empty_like(lse)
    assert isinstance(walk, KernelWalk)
    _launch(spec, pat, q, k, v, heads.to(torch.int32), walk, scale, group, o, ls)
    if o is not out:
        out[:, heads] = o[:, heads]
        lse[:, heads] = ls[:, heads]


def token_backward(spec: PatternSpec, pat: int, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, heads: torch.Tensor, walk: Walk, scale: float, group: int,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Pattern `pat`'s gradients for the heads `heads`: dq written, dk and dv (float32) added to; `walk`:
    the forward's `token_walk` (its tables for 64 query rows per program built from it where it has 128)."""
    delta = (o.float() * do.float()).sum(-1).contiguous()
    if _torch_path(q):
        _cpu_bwd(spec, pat, do, q, k, v, lse, delta, heads, walk[0], scale, group, dq, dk, dv)
        return
    assert isinstance(walk, KernelWalk)
    if walk.block_m != TILE:  # 64 query rows per program: 128 spill more (benchmarks/kernel_resources.py)
        walk = _walk(spec, pat, walk.cols[None], walk.offs[None], q.shape[2], q.device, TILE, walk.member)
    _launch(spec, pat, q, k, v, heads.to(torch.int32), walk, scale, group, o.contiguous(), lse.contiguous(),
            (do.contiguous(), delta, dq, dk, dv))


def _only(pat: int, heads: torch.Tensor, H: int) -> tuple[int, ...]:
    """Per head: `pat` for `heads`, -1 (no pattern: not run) for the others."""
    mine = set(heads.tolist())
    return tuple(pat if h in mine else -1 for h in range(H))


def _cpu(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor,
         member: torch.Tensor, scale: float, group: int, out: torch.Tensor, lse: torch.Tensor) -> None:
    """The PyTorch path (`cpu._attention_cpu`) for `heads`, its masks from the membership."""
    from .cpu import _attention_cpu

    _attention_cpu(spec, q, k, v, scale, group, _only(pat, heads, q.shape[1]), out, lse, picks={pat: member})


def _cpu_bwd(spec: PatternSpec, pat: int, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             lse: torch.Tensor, delta: torch.Tensor, heads: torch.Tensor, member: torch.Tensor, scale: float,
             group: int, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """`cpu._attention_cpu_bwd` for `heads`: dq written there, dk and dv added to."""
    from .cpu import _attention_cpu_bwd

    gq, gk, gv = _attention_cpu_bwd(spec, do, q, k, v, lse, delta, scale, group, _only(pat, heads, q.shape[1]),
                                    {pat: member})
    dq[:, heads] = gq[:, heads]
    dk += gk
    dv += gv


def token_patterns(spec: PatternSpec, patterns: int | tuple[int, ...], H: int,
                   device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """(pattern, its query heads) for every token-selector pattern some head runs."""
    out = []
    for pat in range(spec.patterns):
        if spec.token_selection(pat) is not None:
            heads = _heads(pat, patterns, H, device).long()
            if heads.numel():
                out.append((pat, heads))
    return out


class TokenAttention(torch.autograd.Function):
    """Autograd for token-selector patterns: columns and diagonals are picked once in the forward (not
    differentiated) and the tables built from them (`token_walk`) kept for the backward; heads of other
    patterns came in `out`/`lse` from the usual path and are passed through."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base_out: torch.Tensor,
                base_lse: torch.Tensor, scale: float, spec: PatternSpec,
                patterns: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        group = q.shape[1] // k.shape[1]
        out, lse = base_out.clone(), base_lse.clone()
        uses = token_patterns(spec, patterns, q.shape[1], q.device)
        walks = [token_walk(spec, pat, q, token_picks(spec, pat, q, k, heads, scale, group)) for pat, heads in uses]
        for (pat, heads), walk in zip(uses, walks, strict=True):
            token_forward(spec, pat, q, k, v, heads, walk, scale, group, out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.uses, ctx.walks, ctx.scale, ctx.spec = uses, walks, scale, spec
        ctx.options = current_options()  # the backward runs under them, maybe on autograd's own thread
        return out, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        if dlse is not None and bool((dlse != 0).any()):
            raise ValueError("a pattern with vertical/slash takes no gradient through its log-sum-exp yet")
        group = q.shape[1] // k.shape[1]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=work, device=k.device)
        dv = torch.zeros(v.shape, dtype=work, device=v.device)
        mine = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
        with restored(ctx.options):
            for (pat, heads), walk in zip(ctx.uses, ctx.walks, strict=True):
                token_backward(ctx.spec, pat, do, q, k, v, o, lse, heads, walk, ctx.scale, group, dq, dk, dv)
                mine[heads] = True
        # the other heads' gradients flow through base_out / base_lse
        d_out = do.masked_fill(mine[None, :, None, None], 0.0)
        d_lse = None if dlse is None else dlse.masked_fill(mine[None, :, None], 0.0)
        return dq, dk.to(k.dtype), dv.to(v.dtype), d_out, d_lse, None, None, None


def apply_tokens(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, scale: float, patterns: int | tuple[int, ...],
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`out`/`lse` (every head by the usual path: token-selector heads there ran their static part) with
    the token-selector heads recomputed. With `grad`, through `TokenAttention`; else in place."""
    if grad:
        return TokenAttention.apply(q, k, v, out, lse, scale, spec, patterns)  # type: ignore[no-untyped-call, no-any-return]
    group = q.shape[1] // k.shape[1]
    for pat, heads in token_patterns(spec, patterns, q.shape[1], q.device):
        walk = token_walk(spec, pat, q, token_picks(spec, pat, q, k, heads, scale, group))
        token_forward(spec, pat, q, k, v, heads, walk, scale, group, out, lse)
    return out, lse


def selected_tokens(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                    layer: int | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{pattern: (columns, offsets)} each [B, its heads, n] for inspection and tests."""
    from .common import _head_patterns

    patterns = _head_patterns(spec, layer)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    return {pat: token_picks(spec, pat, q, k, heads, s, group)
            for pat, heads in token_patterns(spec, patterns, q.shape[1], q.device)}
