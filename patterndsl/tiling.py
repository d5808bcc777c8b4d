"""Tiles of a predicate: which query-block x key-block tiles hold an allowed pair, and which hold only allowed pairs.

The one tile builder of patterndsl. The kernels' block tables (`runtime.tables`, torch, on the tensors'
device), `patterndsl.blocks`, and the analyser's block counts, layout choice and block reach (numpy, without
importing torch) all call `tiling`. It is written against an array module `xp` (numpy or torch), as
`intervals.classify` is, so the runtime builds on its device and `patc analyze` runs where torch is absent.

How, for a BQ x BK grid over rows and columns 0 .. extent - 1:
1. A `blockwise(b, ...)` predicate whose tiles are made of whole pattern blocks is asked on its own block
   grid: the same tiles, with b x b fewer pairs behind each.
2. `rest | random(r)`: the tiles of the rest, plus the tiles the drawn keys fall in (every row's draws,
   enumerated up to DRAWS_ENUMERATED rows). Interval reasoning can only say SOME for a wide row range of
   draws, which would leave every tile PARTIAL.
3. A quad tree over the block grid: square cells of blocks, all of one level classified at once by
   `intervals.classify`; NONE cells are dropped, ALL cells kept whole (FULL rectangles), SOME cells split in
   four until one tile wide (PARTIAL). Interval reasoning is inclusion-monotone, so each tile gets the
   verdict of its own rectangle whatever cell it was decided in.
4. `refine` settles the PARTIAL tiles by splitting their pair rectangles until one part is seen ALL and one
   NONE (bounded work): an empty tile is dropped, a full one promoted.

Sound: a tile is left out only when proven empty, FULL only when proven full. Work grows with the cells on
the boundary of the allowed region (times a few levels), never with the FULL area. On torch every round
costs one host synchronisation (a stable sort and one read of its group sizes), not one per boolean mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import expr as E
from .expr import Expr
from .intervals import ALL, NONE, SOME, classify
from .runtime.draw import random_keys

DRAWS_ENUMERATED = 1 << 22  # rows whose `random` draws are enumerated into tiles; past it they are classified

Spend = Callable[[int, Expr], None]  # charged with (rectangles classified, the predicate classified)


@dataclass(frozen=True, slots=True)
class Tiling:
    """The tiles holding an allowed pair: FULL rectangles of the block grid (block indices, half-open; every
    pair of every tile in them allowed) and PARTIAL tiles (one each). Arrays of the builder's `xp`."""

    q_lo: Any
    q_hi: Any
    k_lo: Any
    k_hi: Any
    part_q: Any
    part_k: Any

    @property
    def visited(self) -> int:
        """Tiles listed, FULL and PARTIAL."""
        return int(((self.q_hi - self.q_lo) * (self.k_hi - self.k_lo)).sum()) + int(self.part_q.shape[0])


@dataclass(frozen=True, slots=True)
class _Ops:
    """The few array operations the builder needs that numpy and torch spell differently."""

    xp: Any
    device: Any

    @property
    def torch(self) -> bool:
        return self.xp is not np

    def arange(self, k: int) -> Any:
        return self.xp.arange(k, dtype=self.xp.int64, **self._on)

    def full(self, k: int, value: int) -> Any:
        return self.xp.full((k,), value, dtype=self.xp.int64, **self._on)

    def asarray(self, a: np.ndarray) -> Any:
        return self.xp.from_numpy(a).to(self.device) if self.torch else a

    def cat(self, parts: list[Any]) -> Any:
        return self.xp.cat(parts) if self.torch else np.concatenate(parts)

    def cap(self, a: Any, top: int | Any) -> Any:
        """min(a, top) elementwise; `top` an int or an array like a."""
        if self.torch:
            return self.xp.clamp(a, max=top) if isinstance(top, int) else self.xp.minimum(a, top)
        return np.minimum(a, top)

    def repeat(self, values: Any, counts: Any, total: int) -> Any:
        if self.torch:  # an explicit output size: without one, slow on CPU and a sync on GPU
            return self.xp.repeat_interleave(values, counts, output_size=total)
        return np.repeat(values, counts)

    def int32(self, a: Any) -> Any:
        return a.int() if self.torch else a.astype(np.int32)

    def nonzero(self, a: Any) -> Any:
        return self.xp.nonzero(a).reshape(-1) if self.torch else np.flatnonzero(a)

    def add_at(self, target: Any, index: Any, values: Any) -> None:
        if self.torch:
            target.index_put_((index,), values, accumulate=True)
        else:
            np.add.at(target, index, values)

    @property
    def _on(self) -> dict[str, Any]:
        return {"device": self.device} if self.torch else {}


def partition(code: Any, k: int) -> list[Any]:
    """Positions where `code` == c, ascending, for c in range(k) (numpy or torch): on torch one stable sort
    and one read of the k counts, i.e. one host sync where k boolean masks would take one each."""
    if isinstance(code, np.ndarray):
        code = code.astype(np.int64, copy=False)
        order = np.argsort(code, kind="stable")
        return np.split(order, np.cumsum(np.bincount(code, minlength=k)[: k - 1]))
    torch = _torch()
    code = code.long()
    order = torch.argsort(code, stable=True)
    return list(torch.split(order, (code[:, None] == torch.arange(k, device=code.device)).sum(0).tolist()))


def tiling(pred: Expr, extent: int, bq: int, bk: int, *, n: int | None = None, xp: Any = np, device: Any = None,
           spend: Spend | None = None, refine_pairs: int | None = None) -> Tiling:
    """Every tile of the BQ x BK grid over rows and columns 0 .. extent - 1 that holds an allowed pair of
    `pred`, FULL where all its pairs are allowed. `n`: the value of N in `pred` (None when N is bound).
    `spend`, if given, is charged per rectangle the quad tree classifies (and may raise to stop it);
    `refine_pairs`, if given, bounds refinement to the PARTIAL tiles whose pairs fit it (the others stay
    PARTIAL): the analyser's time box, where the kernels' tables refine every tile."""
    ops = _Ops(xp, device)
    blocked = block_form(pred)
    if blocked is not None and bq % blocked[0] == 0 and bk % blocked[0] == 0:
        b = blocked[0]  # the same tiles, on the pattern's own block grid
        return tiling(blocked[1], -(-extent // b), bq // b, bk // b, n=n, xp=xp, device=device, spend=spend,
                      refine_pairs=None if refine_pairs is None else refine_pairs // (b * b))
    draws = [a for a in pred.args if isinstance(a, E.RandomMember) and is_plain_random(a)] if isinstance(pred, E.Or) else []
    if draws and extent <= DRAWS_ENUMERATED and all(E.evaluate_int(d.n, n) == extent for d in draws):
        return _with_draws(pred, draws, extent, bq, bk, n, ops, spend, refine_pairs)
    fq_lo, fq_hi, fk_lo, fk_hi, pq, pk = _quad_tree(pred, extent, bq, bk, n, ops, spend)
    return _settle(pred, extent, bq, bk, n, ops, (fq_lo, fq_hi, fk_lo, fk_hi), pq, pk, refine_pairs)


def _quad_tree(pred: Expr, extent: int, bq: int, bk: int, n: int | None, ops: _Ops,
               spend: Spend | None) -> tuple[Any, ...]:
    """(FULL rectangles q_lo, q_hi, k_lo, k_hi; PARTIAL tiles q, k) by quad-tree subdivision of the grid."""
    return _quad_trees(pred, extent, extent, bq, bk, n, ops, spend)[:6]


def _quad_trees(pred: Expr, extent: Any, longest: int, bq: int, bk: int, n: Any, ops: _Ops,
                spend: Spend | None) -> tuple[Any, ...]:
    """`_quad_tree` over several grids at once: `extent` and `n` are ints (one grid) or arrays with one entry
    per document (packed documents: each its own grid, its own N), `longest` the largest extent. Returns
    the FULL rectangles and PARTIAL tiles as `_quad_tree` does, then each one's document (FULL, PARTIAL;
    empty for one grid, whose cells carry no document)."""
    per_doc = not isinstance(extent, int)
    docs = int(extent.shape[0]) if per_doc else 1
    nq_all, nk_all = (extent + bq - 1) // bq, (extent + bk - 1) // bk
    size = 1 << max(0, (max(-(-longest // bq), -(-longest // bk)) - 1).bit_length())
    cells = (ops.full(docs, 0), ops.full(docs, 0)) + ((ops.arange(docs),) if per_doc else ())  # qb, kb[, doc]
    full: list[tuple[Any, ...]] = []
    part: list[tuple[Any, ...]] = []
    while cells[0].shape[0]:
        qb, kb = cells[0], cells[1]
        ext, nq, nk, nn = (a[cells[2]] if per_doc else a for a in (extent, nq_all, nk_all, n))
        q_hi, k_hi = ops.cap(qb + size, nq), ops.cap(kb + size, nk)  # exclusive, in blocks
        if spend is not None:
            spend(int(qb.shape[0]), pred)
        verdict = classify(pred, qb * bq, ops.cap(q_hi * bq, ext) - 1, kb * bk, ops.cap(k_hi * bk, ext) - 1,
                           ops.xp, nn)
        if per_doc:  # an empty document's cell covers an empty range, which the classifier reads as one row
            verdict = ops.xp.where(ext > 0, verdict, NONE)
        if size == 1:
            _, p, f = partition(verdict, 3)  # NONE, SOME, ALL
            full.append((qb[f], q_hi[f], kb[f], k_hi[f], *(c[f] for c in cells[2:])))
            part.append(tuple(c[p] for c in cells))
            break
        half = size // 2
        # 0: drop, 1: FULL, 2 + s: split, s telling which children lie inside the grid (1: the lower ones, 2: the right)
        split = 2 + (qb + half < nq) * 1 + (kb + half < nk) * 2
        groups = partition(ops.xp.where(verdict == ALL, 1, ops.xp.where(verdict == SOME, split, 0)), 6)
        f = groups[1]
        full.append((qb[f], q_hi[f], kb[f], k_hi[f], *(c[f] for c in cells[2:])))
        kids: list[tuple[Any, ...]] = []
        for s, g in enumerate(groups[2:]):
            q0, k0, *d0 = (c[g] for c in cells)
            for dq, dk in ((0, 0), (half, 0), (0, half), (half, half)):
                if (not dq or s & 1) and (not dk or s & 2):
                    kids.append((q0 + dq, k0 + dk, *d0))
        cells = tuple(ops.cat(list(c)) for c in zip(*kids, strict=True)) if kids else tuple(c[:0] for c in cells)
        size = half
    empty = ops.full(0, 0)
    fq_lo, fq_hi, fk_lo, fk_hi, *fd = (ops.cat([empty, *c]) for c in zip(*full, strict=True)) if full else (empty,) * (4 + per_doc)
    pq, pk, *pd = part[0] if part else (empty,) * (2 + per_doc)
    return fq_lo, fq_hi, fk_lo, fk_hi, pq, pk, fd[0] if fd else empty, pd[0] if pd else empty


def doc_tiles(pred: Expr, lengths: Any, longest: int, bq: int, bk: int) -> tuple[Any, ...]:
    """The tiles of packed documents (torch, on `lengths`' device): each document of lengths[d] tokens is
    its own grid with N = lengths[d]. Returns (FULL rectangles q_lo, q_hi, k_lo, k_hi and their documents;
    PARTIAL tiles q, k and their documents), block indices counted from each document's start. PARTIAL
    tiles are not refined here: the caller refines them with its own per-tile N (`refine`)."""
    ops = _Ops(_torch(), lengths.device)
    fq_lo, fq_hi, fk_lo, fk_hi, pq, pk, fd, pd = _quad_trees(pred, lengths, longest, bq, bk, lengths, ops, None)
    return fq_lo, fq_hi, fk_lo, fk_hi, fd, pq, pk, pd


def _with_draws(pred: Expr, draws: list[E.RandomMember], extent: int, bq: int, bk: int, n: int | None, ops: _Ops,
                spend: Spend | None, refine_pairs: int | None) -> Tiling:
    """`rest | random(r)`: the tiles of the rest, plus the tiles of the drawn keys that the rest misses
    (PARTIAL), all then settled against the whole predicate (the draws may fill a tile up)."""
    assert isinstance(pred, E.Or)
    rest = E.disj(*(a for a in pred.args if a not in draws))
    fq_lo, fq_hi, fk_lo, fk_hi, pq, pk = _quad_tree(rest, extent, bq, bk, n, ops, spend)
    rows = np.arange(extent, dtype=np.int64)
    keys = np.concatenate([random_keys(rows, extent, E.evaluate_int(d.r, n), d.seed) for d in draws], axis=1)
    nk = -(-extent // bk)
    drawn = np.sort((rows[:, None] // bq * nk + keys // bk).reshape(-1))
    first = np.ones(drawn.shape, dtype=bool)  # sorted, then distinct: far faster than np.unique's hashing
    first[1:] = drawn[1:] != drawn[:-1]  # (no draws at all where r is 0)
    drawn = drawn[first]
    tq, tk = ops.asarray(drawn // nk), ops.asarray(drawn % nk)
    verdict = classify(rest, tq * bq, ops.cap((tq + 1) * bq, extent) - 1, tk * bk, ops.cap((tk + 1) * bk, extent) - 1,
                       ops.xp, n)
    new = partition(verdict, 3)[NONE]
    return _settle(pred, extent, bq, bk, n, ops, (fq_lo, fq_hi, fk_lo, fk_hi), ops.cat([pq, tq[new]]),
                   ops.cat([pk, tk[new]]), refine_pairs)


def _settle(pred: Expr, extent: int, bq: int, bk: int, n: int | None, ops: _Ops, full: tuple[Any, ...], pq: Any,
            pk: Any, refine_pairs: int | None) -> Tiling:
    """The tiling with its PARTIAL tiles refined (the first ones, within `refine_pairs`): empty ones dropped,
    full ones promoted to 1 x 1 rectangles."""
    take = int(pq.shape[0]) if refine_pairs is None else max(0, refine_pairs // (bq * bk))
    rq, rk, promoted = refine(pred, n, extent, bq, bk, pq[:take], pk[:take], xp=ops.xp)
    stay, up = partition(promoted, 2)
    q_lo, q_hi, k_lo, k_hi = full
    return Tiling(ops.cat([q_lo, rq[up]]), ops.cat([q_hi, rq[up] + 1]), ops.cat([k_lo, rk[up]]),
                  ops.cat([k_hi, rk[up] + 1]), ops.cat([rq[stay], pq[take:]]), ops.cat([rk[stay], pk[take:]]))


def refine(pred: Expr, n: Any, extent: Any, bq: int, bk: int, pq: Any, pk: Any, tag: Any = None,
           *, xp: Any = None) -> tuple[Any, Any, Any]:
    """Settle PARTIAL tiles by splitting their pair rectangles until one part is seen ALL and one NONE:
    (tiles kept, their key blocks, promoted to FULL). A tile whose parts outgrow the bounded work stays PARTIAL.

    `n` is N (None when bound in `pred`), or per tile its document's length (an array like pq); `extent` the
    rows and columns, likewise. `tag`, if given, is returned in pq's place. On torch, one host sync per round
    of splitting, and one at the end."""
    ops = _Ops(np, None) if isinstance(pq, np.ndarray) else _Ops(xp or _torch(), pq.device)
    tiles = int(pq.shape[0])
    seen_true = ops.int32(ops.full(tiles, 0))  # counts: repeated tiles accumulate
    seen_false = ops.int32(ops.full(tiles, 0))
    unsettled = ops.full(tiles, 0) > 0
    t = ops.arange(tiles)
    i_lo, i_hi = pq * bq, ops.cap((pq + 1) * bq, extent) - 1
    j_lo, j_hi = pk * bk, ops.cap((pk + 1) * bk, extent) - 1
    budget = 8 * tiles + (1 << 16)
    while t.shape[0]:
        if t.shape[0] > budget:
            unsettled[t] = True
            break
        verdict = classify(pred, i_lo, i_hi, j_lo, j_hi, ops.xp, n if n is None or isinstance(n, int) else n[t])
        ops.add_at(seen_true, t, ops.int32(verdict == ALL))
        ops.add_at(seen_false, t, ops.int32(verdict == NONE))
        keep = (verdict == SOME) & ~((seen_true[t] > 0) & (seen_false[t] > 0))
        single = (i_hi == i_lo) & (j_hi == j_lo)
        _, one, more = partition(ops.xp.where(keep, ops.xp.where(single, 1, 2), 0), 3)
        unsettled[t[one]] = True
        t, i_lo, i_hi, j_lo, j_hi = (x[more] for x in (t, i_lo, i_hi, j_lo, j_hi))
        rows = (i_hi - i_lo) >= (j_hi - j_lo)
        i_mid, j_mid = (i_lo + i_hi) // 2, (j_lo + j_hi) // 2
        t = ops.cat([t, t])
        i_lo, i_hi = ops.cat([i_lo, ops.xp.where(rows, i_mid + 1, i_lo)]), ops.cat([ops.xp.where(rows, i_mid, i_hi), i_hi])
        j_lo, j_hi = ops.cat([j_lo, ops.xp.where(rows, j_lo, j_mid + 1)]), ops.cat([ops.xp.where(rows, j_hi, j_mid), j_hi])
    is_true, is_false = seen_true > 0, seen_false > 0
    keep = ops.nonzero(is_true | unsettled)
    promoted = ~is_false & ~unsettled & is_true
    return (pq if tag is None else tag)[keep], pk[keep], promoted[keep]


def full_rows(t: Tiling, xp: Any = np, device: Any = None) -> tuple[Any, Any, Any]:
    """The FULL rectangles as one key-block range per query block they cover: (row, k_lo, k_hi), half-open."""
    ops = _Ops(xp, device)
    heights = t.q_hi - t.q_lo
    rows = int(heights.sum())  # one host sync on torch
    rect = ops.repeat(ops.arange(int(heights.shape[0])), heights, rows)
    first = ops.xp.cumsum(heights, 0) - heights
    return t.q_lo[rect] + ops.arange(rows) - first[rect], t.k_lo[rect], t.k_hi[rect]


def expand(row: Any, lo: Any, hi: Any, xp: Any = np, device: Any = None) -> tuple[Any, Any]:
    """(q, k) of every tile of the key-block ranges [lo, hi) of query blocks `row`."""
    ops = _Ops(xp, device)
    width = hi - lo
    total = int(width.sum())  # one host sync on torch
    start = ops.xp.cumsum(width, 0) - width
    return ops.repeat(row, width, total), ops.repeat(lo - start, width, total) + ops.arange(total)


def full_tiles(t: Tiling, xp: Any = np, device: Any = None) -> tuple[Any, Any]:
    """(q, k) of every tile of the FULL rectangles, row-major within each rectangle (one host sync on torch)."""
    ops = _Ops(xp, device)
    width = t.k_hi - t.k_lo
    area = (t.q_hi - t.q_lo) * width
    total = int(area.sum())
    rect = ops.repeat(ops.arange(int(area.shape[0])), area, total)
    at = ops.arange(total) - (ops.xp.cumsum(area, 0) - area)[rect]  # the tile's place in its rectangle
    w = width[rect]
    return t.q_lo[rect] + at // w, t.k_lo[rect] + at % w


def is_plain_random(e: Expr) -> bool:
    """`random(r)` over the token indices themselves (not inside a blockwise or a layout)."""
    return isinstance(e, E.RandomMember) and e.row == E.I and e.col == E.J


def block_form(e: Expr) -> tuple[int, Expr] | None:
    """(b, predicate over block indices) when i and j only appear as i // b and j // b."""
    b = _find_block(e)
    if b is None or b < 2:
        return None
    out = _unblock(e, b)
    return None if out is None else (b, out)


def _find_block(e: Expr) -> int | None:
    match e:
        case E.Arith("//", E.Var("i" | "j"), E.Const(b)):
            return int(b)
        case E.Arith(_, a, b) | E.Cmp(_, a, b):
            return _find_block(a) or _find_block(b)
        case E.Abs(a) | E.Not(a) | E.IsPow(a, _):
            return _find_block(a)
        case E.And(args) | E.Or(args):
            for a in args:
                found = _find_block(a)
                if found:
                    return found
        case E.IfElse(c, t, o):
            return _find_block(c) or _find_block(t) or _find_block(o)
        case E.RandomMember(row, col, _, _, _):
            return _find_block(row) or _find_block(col)
    return None


def _unblock(e: Expr, b: int) -> Expr | None:
    match e:
        case E.Arith("//", E.Var("i" | "j") as v, E.Const(c)) if int(c) == b:
            return v
        case E.Var("i" | "j"):
            return None
        case E.Const() | E.Var():
            return e
        case E.Arith(op, x, y) | E.Cmp(op, x, y):
            ux, uy = _unblock(x, b), _unblock(y, b)
            if ux is None or uy is None:
                return None
            return E.Arith(op, ux, uy) if isinstance(e, E.Arith) else E.Cmp(op, ux, uy)  # type: ignore[arg-type]
        case E.Abs(x):
            a = _unblock(x, b)
            return None if a is None else E.Abs(a)
        case E.Not(x):
            a = _unblock(x, b)
            return None if a is None else E.Not(a)
        case E.IsPow(x, base):
            a = _unblock(x, b)
            return None if a is None else E.IsPow(a, base)
        case E.And(args) | E.Or(args):
            xs = [_unblock(a, b) for a in args]
            if any(x is None for x in xs):
                return None
            return E.And(tuple(xs)) if isinstance(e, E.And) else E.Or(tuple(xs))  # type: ignore[arg-type]
        case E.IfElse(c, t, o):
            xs3 = [_unblock(a, b) for a in (c, t, o)]
            return None if any(x is None for x in xs3) else E.IfElse(*xs3)  # type: ignore[arg-type]
        case E.RandomMember(row, col, nn, r, seed):
            rr, cc = _unblock(row, b), _unblock(col, b)
            return None if rr is None or cc is None else E.RandomMember(rr, cc, nn, r, seed)
    return None


def _torch() -> Any:
    import torch

    return torch
