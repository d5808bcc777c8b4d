"""An independent brute-force reading of LANGUAGE.md: `allowed(i, j)` for every static primitive.

Written from the spec's table, one plain Python loop over (i, j), on purpose sharing nothing with
`patterndsl.semantics` or `patterndsl.expr` (not even their evaluator): the IR's integer arguments are
walked here by class name. The one import from the library is `random_keys`, because for `random` the
draw *is* the definition. Slow by design; keep N small (<= ~64).
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal
from typing import Any

import numpy as np

from patterndsl import ir
from patterndsl.semantics import random_keys


def value(e: Any, n: int, i: int = 0, j: int = 0) -> Any:
    """An index expression of the IR, evaluated with Python's integers (floor // and %)."""
    kind = type(e).__name__
    if kind == "Const":
        return e.value
    if kind == "Var":
        return {"i": i, "j": j, "N": n}[e.name]
    if kind == "Arith":
        a, b = value(e.a, n, i, j), value(e.b, n, i, j)
        ops = {
            "+": lambda: a + b,
            "-": lambda: a - b,
            "*": lambda: a * b,
            "//": lambda: a // b,
            "%": lambda: a % b,
            "**": lambda: a**b,
            "min": lambda: min(a, b),
            "max": lambda: max(a, b),
        }
        return ops[e.op]()
    if kind == "Abs":
        return abs(value(e.a, n, i, j))
    if kind == "Log2":  # the largest m with 2**m <= x; -1 when there is none (x <= 0)
        x, m = value(e.a, n, i, j), -1
        while 2 ** (m + 1) <= x:
            m += 1
        return m
    if kind == "Cmp":
        a, b = value(e.a, n, i, j), value(e.b, n, i, j)
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[e.op]
    if kind == "And":
        return all(value(x, n, i, j) for x in e.args)
    if kind == "Or":
        return any(value(x, n, i, j) for x in e.args)
    if kind == "Not":
        return not value(e.a, n, i, j)
    if kind == "IfElse":
        return value(e.then, n, i, j) if value(e.cond, n, i, j) else value(e.other, n, i, j)
    raise TypeError(f"the reference does not evaluate {kind} inside an argument")


def in_token_set(t: int, tokens: ir.TokenSet, n: int) -> bool:
    """`t in S`: slices as Python slices (negative bounds from N, clipped); list items counted from N."""
    if isinstance(tokens, ir.TokenSlice):
        start = None if tokens.start is None else value(tokens.start, n)
        stop = None if tokens.stop is None else value(tokens.stop, n)
        return t in range(*slice(start, stop, value(tokens.step, n)).indices(n))
    for x in tokens.items:
        v = value(x, n)
        if (v + n if v < 0 else v) == t:
            return True
    return False


def is_power(d: int, base: int) -> bool:
    p = 1
    while p < d:
        p *= base
    return p == d


@functools.cache
def _random_rows(n: int, r: int, seed: int) -> tuple[frozenset[int], ...]:
    keys = random_keys(np.arange(n), n, r, seed)
    return tuple(frozenset(int(k) for k in row) for row in keys)


def coords(t: int, dims: tuple[int, ...]) -> list[int]:
    """Row-major coordinates, last axis fastest."""
    out = []
    for d in reversed(dims):
        out.append(t % d)
        t //= d
    return out[::-1]


def on_cells(t: int, layout: ir.Grid) -> bool:
    """Token t is a cell of the grid: after its `prefix` extra tokens, before its `suffix` ones."""
    return layout.prefix <= t < layout.prefix + int(np.prod(layout.dims))


def neighborhood_axis(x: int, y: int, n: int, k: int, d: int, s: int, causal: bool) -> bool:
    """One axis of NATTEN's neighborhood, read off LANGUAGE.md line by line."""
    g = x % d
    p = x // d
    m = -(-(n - g) // d)  # ceil((n - g) / d)
    if y % d != g:
        return False
    q = y // d
    if causal:  # the window starts where the stride group's last query's would, ends at the query
        p_l = min(s * (p // s) + s - 1, m - 1)
        return max(0, p_l - k + 1) <= q <= p
    p_c = min(s * (p // s) + s // 2, m - 1)  # the group's centre query (right-hand one for even s)
    start = min(max(p_c - k // 2, 0), m - k)
    return start <= q < start + k


def allowed(p: ir.Pattern, i: int, j: int, n: int) -> bool:
    """LANGUAGE.md's `allowed(i, j)`, one primitive per branch."""
    match p:
        case ir.Full():
            return True
        case ir.Empty():
            return False
        case ir.Causal():
            return j <= i
        case ir.Window(before, after, dilation):
            a, b, d = value(before, n), value(after, n), value(dilation, n)
            return -b * d <= i - j <= a * d and (i - j) % d == 0
        case ir.Stride(step):
            return (i - j) % value(step, n) == 0
        case ir.Sink(count):
            return j < value(count, n)
        case ir.Global(tokens):
            return in_token_set(i, tokens, n) or in_token_set(j, tokens, n)
        case ir.Rows(tokens):
            return in_token_set(i, tokens, n)
        case ir.Cols(tokens):
            return in_token_set(j, tokens, n)
        case ir.Hops(base):
            dist = abs(i - j)
            return dist == 0 or is_power(dist, base)
        case ir.Blockwise(block, inner):
            b = value(block, n)
            return allowed(inner, i // b, j // b, -(-n // b))
        case ir.Where(cond, layout):  # a layout's condition holds between its cells only
            return (layout is None or on_cells(i, layout) and on_cells(j, layout)) and bool(value(cond, n, i, j))
        case ir.Random(count, seed):
            return j in _random_rows(n, value(count, n), seed)[i]
        case ir.Neighborhood(layout, kernel, dilation, stride, causal):
            if not (on_cells(i, layout) and on_cells(j, layout)):
                return False  # the layout's extra tokens (prefix, suffix) have no coordinates
            x, y = coords(i - layout.prefix, layout.dims), coords(j - layout.prefix, layout.dims)
            return all(
                neighborhood_axis(x[a], y[a], layout.dims[a], kernel[a], dilation[a], stride[a], causal[a])
                for a in range(len(layout.dims))
            )
        case ir.Union(a, b):
            return allowed(a, i, j, n) or allowed(b, i, j, n)
        case ir.Inter(a, b):
            return allowed(a, i, j, n) and allowed(b, i, j, n)
        case ir.Complement(a):
            return not allowed(a, i, j, n)
    raise TypeError(f"the reference has no meaning for {p!r}")


def reference_mask(body: ir.Body, n: int) -> np.ndarray:
    """[n, n] bool (or [H, n, n] for heads) by brute force."""
    if isinstance(body, ir.Heads):
        return np.stack([reference_mask(body.pattern_for(h), n) for h in range(body.count)])
    return np.array([[allowed(body, i, j, n) for j in range(n)] for i in range(n)], dtype=bool).reshape(n, n)


# --- dynamic selectors, read off LANGUAGE.md literally ---------------------------------------------


def selection(
    sel: ir.TopK | ir.Threshold, context: np.ndarray, q: np.ndarray, k: np.ndarray, given: np.ndarray | None = None,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """[B, H, query blocks, key blocks] bool: the key blocks the selector keeps per query block, in float64.

    q [B, H, N, D], k [B, Hkv, N, D] (query head h reads kv head h // (H / Hkv)); `context` [N, N] is the
    static part A of `A & sel` (only key blocks where A allows a pair are candidates); `given` the
    caller's scores for score=given. Ties: the lower block index first (a stable sort on -score).
    `present` [N] bool: the query rows there are (a decode step's; default all): a query block is its
    present rows (their mean query, their pairs of the context)."""
    bsz, heads, n, d = q.shape
    b = sel.block  # query blocks
    bk = sel.key_block or b  # key blocks
    nb, nk = -(-n // b), -(-n // bk)
    group = heads // k.shape[1]
    here = np.ones(n, dtype=bool) if present is None else present
    out = np.zeros((bsz, heads, nb, nk), dtype=bool)
    cand = np.zeros((nb, nk), dtype=bool)
    for qb in range(nb):
        for kb in range(nk):
            rows = context[qb * b : (qb + 1) * b][here[qb * b : (qb + 1) * b]]
            cand[qb, kb] = bool(rows[:, kb * bk : (kb + 1) * bk].any())
    rule = sel.score if isinstance(sel, ir.TopK) else "mean"

    def score(bi: int, h: int, qb: int, kb: int) -> float:
        if given is not None:
            return float(given[bi, h, qb, kb])
        qs = q[bi, h, qb * b : (qb + 1) * b][here[qb * b : (qb + 1) * b]].astype(np.float64)
        qbar = qs.mean(0)
        keys = k[bi, h // group, kb * bk : (kb + 1) * bk].astype(np.float64)
        if rule == "mean":
            return float(qbar @ keys.mean(0))
        if rule == "max":
            return max(float(qbar @ kj) for kj in keys)
        if rule == "quest":
            return sum(max(qbar[x] * keys[:, x].max(), qbar[x] * keys[:, x].min()) for x in range(d))
        # compressed: each query's softmax over the candidates' mean keys, its share at kb, summed over the block
        total = 0.0
        for qi in qs:
            z = {c: float(qi @ k[bi, h // group, c * bk : (c + 1) * bk].astype(np.float64).mean(0)) / np.sqrt(d)
                 for c in range(nk) if cand[qb, c]}  # fmt: skip
            top = max(z.values())
            total += np.exp(z[kb] - top) / sum(np.exp(v - top) for v in z.values())
        return total

    for bi in range(bsz):
        for h in range(heads):
            # share=kv: the scores of every query head of h's KV head, summed
            mates = [x for x in range(heads) if x // group == h // group] if getattr(sel, "share", False) else [h]
            for qb in range(nb):
                scores = {}
                for kb in range(nk):
                    if cand[qb, kb]:
                        scores[kb] = sum(score(bi, x, qb, kb) for x in mates)
                ranked = sorted(scores, key=lambda kb: (-scores[kb], kb))
                if isinstance(sel, ir.TopK) and sel.fraction is not None:  # ceil(p * c), p the decimal written
                    keep = ranked[: math.ceil(Decimal(repr(sel.fraction)) * len(ranked))]
                elif isinstance(sel, ir.TopK):
                    keep = ranked[: sel.count if isinstance(sel.count, int) else value(sel.count, n)]
                else:
                    z = {kb: scores[kb] / np.sqrt(d) for kb in ranked}
                    top = max(z.values()) if z else 0.0
                    total = sum(np.exp(v - top) for v in z.values())
                    keep, mass = [], 0.0
                    for kb in ranked:
                        if mass >= sel.mass:
                            break
                        keep.append(kb)
                        mass += np.exp(z[kb] - top) / total
                for kb in keep:
                    out[bi, h, qb, kb] = True
    return out


def token_selection(sel: ir.Vertical | ir.Slash, context: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """[B, H, N] bool: the key columns (vertical) or offsets i - j (slash) kept, in float64. The last
    `sel.last` query rows' softmax over the keys `context` allows, scale 1/sqrt(D), summed per column or
    per offset in [0, N); the `sel.count` highest, ties to the lower index."""
    bsz, heads, n, d = q.shape
    group = heads // k.shape[1]
    out = np.zeros((bsz, heads, n), dtype=bool)
    for bi in range(bsz):
        for h in range(heads):
            score = [0.0] * n
            for i in range(max(0, n - sel.last), n):
                z = {j: float(q[bi, h, i].astype(np.float64) @ k[bi, h // group, j].astype(np.float64)) / np.sqrt(d)
                     for j in range(n) if context[i, j]}  # fmt: skip
                if not z:
                    continue
                top = max(z.values())
                total = sum(np.exp(v - top) for v in z.values())
                for j, v in z.items():
                    at = j if isinstance(sel, ir.Vertical) else i - j
                    if at >= 0:
                        score[at] += np.exp(v - top) / total
            for x in sorted(range(n), key=lambda x: (-score[x], x))[: sel.count]:
                out[bi, h, x] = True
    return out


def dynamic_mask(
    p: ir.Pattern, q: np.ndarray, k: np.ndarray, given: np.ndarray | None = None, present: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """([B, H, N, N] allowed pairs, [B, H, nb, nb] blocks some block selector picked) of a pattern with any
    number of selectors (vertical and slash: token_selection), evaluated as sets node by node. A selector's candidates are where the static
    operands of the intersections above it allow a pair (`a - b` is `a & ~b`; a complement passes its
    context through); a selector written twice is one selection, over the union of its contexts.
    `present`: the query rows there are, as `selection`'s."""
    bsz, heads, n, _ = q.shape
    contexts: dict[ir.Pattern, np.ndarray] = {}

    def static(x: ir.Pattern) -> np.ndarray:
        return np.array([[allowed(x, i, j, n) for j in range(n)] for i in range(n)], dtype=bool)

    def collect(x: ir.Pattern, ctx: np.ndarray) -> None:
        if isinstance(x, ir.TopK | ir.Threshold | ir.Vertical | ir.Slash):
            contexts[x] = contexts.get(x, np.zeros_like(ctx)) | ctx
        elif isinstance(x, ir.Union):
            collect(x.a, ctx)
            collect(x.b, ctx)
        elif isinstance(x, ir.Inter):
            collect(x.a, ctx if ir.is_dynamic(x.b) else ctx & static(x.b))
            collect(x.b, ctx if ir.is_dynamic(x.a) else ctx & static(x.a))
        elif isinstance(x, ir.Complement):
            collect(x.a, ctx)

    collect(p, np.ones((n, n), dtype=bool))
    picked = {
        x: selection(x, c, q, k, given if isinstance(x, ir.TopK) and x.given else None, present)  # type: ignore[arg-type]
        for x, c in contexts.items() if isinstance(x, ir.TopK | ir.Threshold)
    }
    kept = {x: token_selection(x, c, q, k) for x, c in contexts.items() if isinstance(x, ir.Vertical | ir.Slash)}
    offset = np.arange(n)[:, None] - np.arange(n)[None, :]

    def go(x: ir.Pattern) -> np.ndarray:
        if not ir.is_dynamic(x):
            return np.broadcast_to(static(x), (bsz, heads, n, n))
        if isinstance(x, ir.Vertical):  # j in V
            return np.broadcast_to(kept[x][:, :, None, :], (bsz, heads, n, n))
        if isinstance(x, ir.Slash):  # i - j in S
            return kept[x][:, :, np.clip(offset, 0, n - 1)] & (offset >= 0)
        if isinstance(x, ir.TopK | ir.Threshold):
            rows, cols = np.arange(n) // x.block, np.arange(n) // (x.key_block or x.block)
            return picked[x][:, :, rows][:, :, :, cols]
        if isinstance(x, ir.Union):
            return go(x.a) | go(x.b)
        if isinstance(x, ir.Complement):
            return ~go(x.a)
        assert isinstance(x, ir.Inter)
        return go(x.a) & go(x.b)

    mask = go(p)
    some = None
    for s in picked.values():
        some = s if some is None else some | s
    return np.ascontiguousarray(mask), some


# --- permuted tokens, read off docs/language.md literally ----------------------------------------


def permuted_mask(inner: np.ndarray, perm_q: np.ndarray, perm_k: np.ndarray) -> np.ndarray:
    """`permute(B, ...)` in the caller's order: allowed(i, j) = B(rank_q[i], rank_k[j]), rank the inverse of
    each permutation (perm[r] is the caller's token at permuted position r). `inner` [..., N, N] is B's mask
    over permuted positions and the permutations [..., N] broadcast against its leading dimensions."""
    n = inner.shape[-1]
    lead = np.broadcast_shapes(inner.shape[:-2], perm_q.shape[:-1], perm_k.shape[:-1])
    pq, pk = np.broadcast_to(perm_q, (*lead, n)), np.broadcast_to(perm_k, (*lead, n))
    m = np.broadcast_to(inner, (*lead, n, n))
    out = np.zeros((*lead, n, n), dtype=bool)
    for idx in np.ndindex(*lead):  # the permuted pair (r, c) is the caller's pair (perm_q[r], perm_k[c])
        out[idx][np.ix_(pq[idx], pk[idx])] = m[idx]
    return out
