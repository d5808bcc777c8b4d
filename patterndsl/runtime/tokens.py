"""Token-level selectors (`vertical`, `slash`): column and diagonal scores, the selection, and attention.

docs/language.md defines them: from the last `r` query rows' softmax (over the keys the selector's context
allows, scaled by the call's scale) a column j scores the sum of its probabilities and a diagonal d >= 0
the sum of the probabilities at j = i - d; `vertical(n)` keeps the n best columns and `slash(n)` the n best
diagonals, ties to the lower index, one choice per (batch, query head). Then `allowed(i, j) = P_v(i, j)`,
v = [j in V] + 2 [i - j in S] (`selectors.TokenSplit`). Selection is not differentiated.

The kernel visits, per query tile, three disjoint sets of pairs, so no pair counts twice and memory stays
O(N * n) (a membership byte per key and per offset, the sorted columns, a byte per tile diagonal):
  A. the static part's tiles (tables of P_0) that no selected diagonal touches, without the selected
     columns (P_0 holds there, since no offset there is selected);
  B. the tiles that a selected diagonal touches (with square tiles, a diagonal touches tile diagonals
     d // tile and d // tile + 1 in every query tile), every pair by its case P_v;
  C. the selected columns outside B's tiles, gathered BLOCK at a time, by P_1 (vertical only).
The same walk serves the forward (online softmax) and the backward (dQ in registers, dK and dV added
atomically in float32), over tables the forward builds once and keeps for the backward (`token_walk`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from .common import _INTERPRET, _LOG2E, _d_pad, _heads, _torch_path
from .evaluate import evaluate
from .fwd_kernels import _stage_range
from .options import current_options
from .selection import _ordered_keys, _spans, compressed_weights
from .tables import block_tables

if TYPE_CHECKING:
    from .spec import PatternSpec, TokenSelection

TILE = 64  # the kernel's square tile (query and key), also the unit of the tile diagonals
Walk = tuple[torch.Tensor, ...]  # a pattern's tables for the kernel or the PyTorch path (`token_walk`)


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


@triton.jit  # type: ignore[untyped-decorator]
def _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, s_kn, s_vn, s_dn,  # type: ignore[no-untyped-def]
          qk_scale, sm_scale, offs_d, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BWD: tl.constexpr):
    """One tile of keys `cols` (gathered rows) for the program's queries, pairs `ok` only. Forward: the
    online softmax (acc, l_i, m_i in base 2). Backward: acc is dQ; dK and dV are added atomically."""
    kok = tl.max(ok.to(tl.int32), 0) > 0
    dmask = offs_d[None, :] < HEAD_DIM
    k = tl.load(k_base + cols[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=kok[:, None] & dmask, other=0.0)
    v = tl.load(v_base + cols[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=kok[:, None] & dmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if BWD:
        p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None]) * sm_scale
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        ptr = cols[:, None].to(tl.int64) * s_dn + offs_d[None, :]
        tl.atomic_add(dk_base + ptr, dk, mask=kok[:, None] & dmask)
        tl.atomic_add(dv_base + ptr, dv, mask=kok[:, None] & dmask)
        m_new = m_i
    else:
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit  # type: ignore[untyped-decorator]
def _band(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem, kt, offs_m, offs_n, offs_d,  # type: ignore[no-untyped-def]
          qok, N, s_kn, s_vn, qk_scale, sm_scale, PRED: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
          DOT_PREC: tl.constexpr, BWD: tl.constexpr):
    """Pass B's key tile kt (>= 0): every pair by its case v = [j in V] + 2 [i - j in S]."""
    cols = kt * BLOCK + offs_n
    kok = cols < N
    in_v = (tl.load(mem + cols, mask=kok, other=0) != 0).to(tl.int32)
    off = offs_m[:, None] - cols[None, :]
    in_s = (tl.load(mem + N + off, mask=(off >= 0) & (off < N), other=0) != 0).to(tl.int32)
    ok = PRED(offs_m[:, None], cols[None, :], N, in_v[None, :] + 2 * in_s) & kok[None, :] & qok[:, None]
    return _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, s_kn, s_vn,
                 HEAD_DIM, qk_scale, sm_scale, offs_d, HEAD_DIM, DOT_PREC, BWD)


@triton.jit  # type: ignore[untyped-decorator]
def _gathered(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, col_list, c, c_hi, diag, pid_m,  # type: ignore[no-untyped-def]
              NKT, offs_m, offs_n, offs_d, qok, N, s_kn, s_vn, qk_scale, sm_scale, PRED: tl.constexpr,
              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BWD: tl.constexpr):
    """Pass C: the selected columns c .. c + BLOCK (below c_hi) whose tile pass B does not visit, by P_1."""
    idx = c + offs_n
    valid = idx < c_hi
    cols = tl.load(col_list + idx, mask=valid, other=0)
    dt = pid_m - cols // BLOCK
    on_b = tl.load(diag + dt, mask=valid & (dt >= 0) & (dt < NKT), other=0) != 0
    one = tl.full([BLOCK, BLOCK], 1, dtype=tl.int32)
    ok = PRED(offs_m[:, None], cols[None, :], N, one) & (valid & ~on_b & (cols < N))[None, :] & qok[:, None]
    return _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok, s_kn, s_vn,
                 HEAD_DIM, qk_scale, sm_scale, offs_d, HEAD_DIM, DOT_PREC, BWD)


@triton.jit  # type: ignore[untyped-decorator]
def _token_attn(Q, K, V, O, LSE, DO, DELTA, DQ, DK, DV, HEAD_IDS, F_OFF, F_IDX, P_OFF, P_IDX,  # type: ignore[no-untyped-def]  # noqa: E741
                COLS, CRANGE, MEMBER, DIAG, DLIST, DCOUNT, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                N, H, HKV, NH, GROUP, NV, NKT, qk_scale, sm_scale, PRED: tl.constexpr, BLOCK: tl.constexpr,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BWD: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Program (query tile, batch * head of this pattern): passes A, B, C of the module's docstring.
    O, DO, DQ: [B, H, N, D] contiguous; DK, DV: float32 [B, HKV, N, D] contiguous; LSE, DELTA [B, H, N];
    MEMBER int8 [B * NH, 2, N]; DIAG int8 [B * NH, NKT] (a selected diagonal touches tile diagonal d);
    DLIST int32 [B * NH, NKT] those d ascending, DCOUNT [B * NH, query tiles] how many are <= the tile;
    COLS int32 [B * NH, NV] ascending, CRANGE int32 [B * NH, query tiles, 2] the columns P_1 may allow."""
    pid_m = tl.cdiv(N, BLOCK) - 1 - tl.program_id(0)  # heavy (late) query tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = tl.load(HEAD_IDS + pid_bh % NH).to(tl.int64)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
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
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    do = q  # (forward: unused)
    lse2 = l_i
    delta = l_i
    if BWD:
        do = tl.load(DO + o_ptr, mask=qmask, other=0.0)
        lse = tl.load(LSE + row_o + offs_m, mask=qok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + row_o + offs_m, mask=qok, other=0.0)
    mem = MEMBER + pid_bh.to(tl.int64) * 2 * N
    diag = DIAG + pid_bh.to(tl.int64) * NKT
    zero = tl.zeros([BLOCK, BLOCK], dtype=tl.int32)
    # A: the static part's tiles off the selected diagonals, without the selected columns
    for stage in tl.static_range(2):
        lo, hi = _stage_range(F_OFF, P_OFF, pid_m, stage)
        t = lo
        while t < hi:  # (the CPU interpreter cannot take loaded scalars as range() bounds)
            if stage == 0:
                kt = tl.load(F_IDX + t)
            else:
                kt = tl.load(P_IDX + t)
            dt = pid_m - kt
            if tl.load(diag + dt, mask=(dt >= 0) & (dt < NKT), other=0) == 0:
                cols = kt * BLOCK + offs_n
                kok = cols < N
                in_v = tl.load(mem + cols, mask=kok, other=0) != 0
                ok = PRED(offs_m[:, None], cols[None, :], N, zero) & (kok & ~in_v)[None, :] & qok[:, None]
                acc, l_i, m_i = _tile(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, cols, ok,
                                      s_kn, s_vn, HEAD_DIM, qk_scale, sm_scale, offs_d, HEAD_DIM, DOT_PREC, BWD)
            t += 1
    # B: the tiles a selected diagonal touches, every pair by its case
    nd = tl.load(DCOUNT + pid_bh.to(tl.int64) * tl.cdiv(N, BLOCK) + pid_m)  # those d <= pid_m: kt >= 0
    dl = DLIST + pid_bh.to(tl.int64) * NKT
    if INTERPRET:  # the CPU interpreter cannot take loaded scalars as range() bounds
        t = 0
        while t < nd:
            acc, l_i, m_i = _band(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem,
                                  pid_m - tl.load(dl + t), offs_m, offs_n, offs_d, qok, N, s_kn, s_vn, qk_scale,
                                  sm_scale, PRED, BLOCK, HEAD_DIM, DOT_PREC, BWD)
            t += 1
    else:
        for t in range(0, nd):
            acc, l_i, m_i = _band(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, mem,
                                  pid_m - tl.load(dl + t), offs_m, offs_n, offs_d, qok, N, s_kn, s_vn, qk_scale,
                                  sm_scale, PRED, BLOCK, HEAD_DIM, DOT_PREC, BWD)
    # C: the selected columns outside B's tiles, gathered
    c_lo = tl.load(CRANGE + (pid_bh.to(tl.int64) * tl.cdiv(N, BLOCK) + pid_m) * 2)
    c_hi = tl.load(CRANGE + (pid_bh.to(tl.int64) * tl.cdiv(N, BLOCK) + pid_m) * 2 + 1)
    col_list = COLS + pid_bh.to(tl.int64) * NV
    if INTERPRET:
        c = c_lo
        while c < c_hi:
            acc, l_i, m_i = _gathered(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, col_list,
                                      c, c_hi, diag, pid_m, NKT, offs_m, offs_n, offs_d, qok, N, s_kn, s_vn,
                                      qk_scale, sm_scale, PRED, BLOCK, HEAD_DIM, DOT_PREC, BWD)
            c += BLOCK
    else:
        for c in range(c_lo, c_hi, BLOCK):
            acc, l_i, m_i = _gathered(acc, l_i, m_i, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, col_list,
                                      c, c_hi, diag, pid_m, NKT, offs_m, offs_n, offs_d, qok, N, s_kn, s_vn,
                                      qk_scale, sm_scale, PRED, BLOCK, HEAD_DIM, DOT_PREC, BWD)
    if BWD:
        tl.store(DQ + o_ptr, acc.to(DQ.dtype.element_ty), mask=qmask)
    else:
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(O + o_ptr, out.to(O.dtype.element_ty), mask=qmask)
        tl.store(LSE + row_o + offs_m, lse, mask=qok)


def _walk(spec: PatternSpec, pat: int, cols: torch.Tensor, offs: torch.Tensor, n: int,
          device: torch.device) -> Walk:
    """The kernel's tables for one pattern: P_0's tiles, the columns and per query tile the range of them
    P_1 may allow, membership bytes, the tile diagonals the selected offsets touch."""
    sel = spec.token_selection(pat)
    assert sel is not None
    rows = cols.shape[0] * cols.shape[1]
    nqt = nkt = -(-n // TILE)
    f_off, f_idx, p_off, p_idx = block_tables(spec, n, TILE, TILE, device, pat, layout=False)
    member = membership(cols, offs, n)
    offs = offs.reshape(rows, -1)
    diag = torch.zeros((rows, nkt + 1), dtype=torch.int8, device=device)
    diag.scatter_(1, offs // TILE, 1)
    diag.scatter_(1, torch.where(offs % TILE != 0, offs // TILE + 1, nkt), 1)
    diag = diag[:, :nkt].contiguous()
    dlist = torch.sort(torch.where(diag != 0, torch.arange(nkt, device=device), nkt), 1).values.to(torch.int32)
    # per query tile qt, how many of them are <= qt (their key tile qt - d exists)
    tiles = torch.arange(nqt, device=device, dtype=torch.int32).expand(rows, -1).contiguous()
    dcount = torch.searchsorted(dlist.contiguous(), tiles, right=True).to(torch.int32)
    cols = cols.reshape(rows, -1).to(torch.int32).contiguous()
    crange = torch.zeros((rows, nqt, 2), dtype=torch.int32, device=device)
    if sel.cases[1] >= 0 and cols.shape[1]:
        span = _spans(spec, sel.cases[1], n, TILE, 1, device)[1]  # per query tile the key tiles [lo, hi) of P_1
        for end in range(2):
            crange[..., end] = torch.searchsorted(cols, (span[:, end] * TILE).expand(rows, -1).contiguous())
    return f_off, f_idx, p_off, p_idx, cols, crange, member, diag, dlist.contiguous(), dcount.contiguous()


def token_walk(spec: PatternSpec, pat: int, q: torch.Tensor, picks: tuple[torch.Tensor, torch.Tensor]) -> Walk:
    """What pattern `pat`'s forward and backward both read, built once from its picks and kept for the
    backward: the kernel's tables (`_walk`), or on the PyTorch path the membership bytes alone (a 1-tuple)."""
    if _torch_path(q):
        return (membership(*picks, q.shape[2]),)
    return _walk(spec, pat, picks[0], picks[1], q.shape[2], q.device)


def _launch(spec: PatternSpec, pat: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor,
            walk: Walk, scale: float, group: int, out: torch.Tensor, lse: torch.Tensor,
            grads: tuple[torch.Tensor, ...] | None = None) -> None:
    """One kernel launch over the heads `heads` of pattern `pat` with its tables `walk` (forward, or
    backward with `grads` = (do, delta, dq, dk32, dv32))."""
    sel = spec.token_selection(pat)
    assert sel is not None
    B, H, N, D = q.shape
    nh = heads.numel()
    do, delta, dq, dk, dv = grads if grads is not None else (out, lse, out, lse, lse)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    opts = current_options()
    _token_attn[(-(-N // TILE), B * nh)](
        q, k, v, out, lse, do, delta, dq, dk, dv, heads, *walk,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        N, H, k.shape[1], nh, group, walk[4].shape[1], walk[7].shape[1], scale * _LOG2E, scale,
        PRED=sel.dispatch, BLOCK=TILE, HEAD_DIM=D, D_PAD=_d_pad(D), DOT_PREC=prec, BWD=grads is not None,
        INTERPRET=_INTERPRET,
        num_warps=8 if grads is not None else opts.token_warps,
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
    _launch(spec, pat, q, k, v, heads.to(torch.int32), walk, scale, group, o, ls)
    if o is not out:
        out[:, heads] = o[:, heads]
        lse[:, heads] = ls[:, heads]


def token_backward(spec: PatternSpec, pat: int, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, heads: torch.Tensor, walk: Walk, scale: float, group: int,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Pattern `pat`'s gradients for the heads `heads`: dq written, dk and dv (float32) added to; `walk`:
    the forward's `token_walk`."""
    delta = (o.float() * do.float()).sum(-1).contiguous()
    if _torch_path(q):
        _cpu_bwd(spec, pat, do, q, k, v, lse, delta, heads, walk[0], scale, group, dq, dk, dv)
        return
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
