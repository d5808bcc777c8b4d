"""A paged KV cache that keeps only what a pattern can still read: StreamingLLM's rolling cache, derived.

`PatternKVCache(pattern, ...)` holds keys and values in pages `[pages, page_size, Hkv, D]` with a page
table `[B, max_pages]` (int32; logical page p of sequence b holds positions p * page_size .. and lives
in physical page `page_table[b, p]`) and `cache_seqlens [B]` on the device: the layout
`attn.decode(q, k_pages, v_pages, cache_seqlens, page_table=page_table)` reads. Which pages stay is
`analysis.retention`'s closed form: after n tokens, a page is kept while some query at or after n may
still read one of its keys. So a window keeps a ring of pages behind the newest token, sinks keep their
first pages for ever, dense attention keeps every page, and `memory_bytes()` of a window plus sinks does
not grow with the context.

Host and device: every sequence of the batch has the same length, which the cache tracks as a Python
int (the caller says how many tokens each `append` adds), so choosing pages to free and to fill is host
arithmetic on a few intervals and the device only sees writes: `append` never reads a device value back
(no synchronisation). A step's decode call sees tensors of fixed shape; without `max_seqlen` they are
reallocated (doubled) when the context outgrows the page table, or, for a pattern whose retained set grows
with the context (dense, strided, hops), its pages; a window's and sinks' pages never are.

A pattern with selectors (`topk`, `threshold`) also keeps `summaries`, the per-block min, max and mean of
its keys (`KeySummaries`) that `attn.decode(..., summaries=cache.summaries)` scores key blocks with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import ir
from .analysis.retention import decode_consistent, merge_intervals, retention

DEFAULT_PAGE = 64
_FIRST_PAGES = 16  # pages per sequence to start with when the retained set grows with the context


class PatternKVCache:
    """A paged KV cache for decoding with a decode-consistent pattern; see the module's doc.

    `pattern`: pattern text, a pattern (`patterndsl.pattern(...)`) or a heads body (pages are kept for
    the union of its heads). `max_append`: the most tokens one `append` adds (default: a page); pages are
    sized so that the keys of those tokens' queries are all still held when they attend. `max_seqlen`:
    the longest context (fixes the page table's width; without it the table and, for patterns that keep
    every key, the pages grow by doubling)."""

    def __init__(
        self,
        pattern: str | ir.Body,
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        page_size: int | None = None,
        max_append: int | None = None,
        max_seqlen: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(pattern, str):
            from . import pattern as parse_pattern

            pattern = parse_pattern(pattern)
        ok, why = decode_consistent(pattern)
        if not ok:
            raise ValueError(f"PatternKVCache needs a decode-consistent pattern: {why}")
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            _positive(name, value)
        self.pattern = pattern
        self.retention = retention(pattern)
        self.page_size = (_positive("page_size", page_size) if page_size is not None
                          else self.retention.page_size(DEFAULT_PAGE))
        self.max_append = _positive("max_append", max_append) if max_append is not None else self.page_size
        self.max_seqlen = _positive("max_seqlen", max_seqlen) if max_seqlen is not None else None
        self.batch, self.kv_heads = batch, kv_heads
        self.head_dim, self.value_dim = head_dim, value_dim or head_dim
        self.device = torch.device(device)
        p = self.page_size
        table = -(-self.max_seqlen // p) if self.max_seqlen else _FIRST_PAGES
        need = self.retention.max_pages(p, self.max_append)
        self._bounded = need is not None
        slots = need if need is not None else table
        if self.max_seqlen is not None:
            slots = min(slots, table)
        self._slots = slots
        self.k_pages = torch.zeros(batch * slots, p, kv_heads, head_dim, dtype=dtype, device=self.device)
        self.v_pages = torch.zeros(batch * slots, p, kv_heads, self.value_dim, dtype=dtype, device=self.device)
        self.page_table = torch.zeros(batch, table, dtype=torch.int32, device=self.device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.device = self.page_table.device  # "cuda" made concrete ("cuda:0"), to compare with inputs
        self._base = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None] * slots
        self._length = 0
        self._resident: dict[int, int] = {}  # logical page -> slot within its sequence's share
        self._free = list(range(slots - 1, -1, -1))
        self._live: list[tuple[int, int]] = []  # pages that may be resident, as [first, stop)
        # a pattern with selectors: its key blocks' summaries, kept with the keys (`attn.decode(summaries=)`)
        self.summaries: KeySummaries | None = None
        sels = [x for p in _patterns(pattern) for x in ir.walk(p) if isinstance(x, ir.TopK | ir.Threshold)]
        if sels:
            self.summaries = KeySummaries.build(self.k_pages, self.cache_seqlens, sels[0].key_block or sels[0].block,
                                                page_table=self.page_table)

    @property
    def length(self) -> int:
        """Tokens appended so far (every sequence of the batch has this many)."""
        return self._length

    def memory_bytes(self) -> int:
        """Bytes of the key and value pages (the page table adds 4 bytes per page of context and sequence)."""
        return self.k_pages.nbytes + self.v_pages.nbytes

    def resident_positions(self) -> list[tuple[int, int]]:
        """The positions whose keys the cache still holds, as sorted [a, b) (host bookkeeping only)."""
        p = self.page_size
        pages = sorted(self._resident)
        out: list[tuple[int, int]] = []
        for lp in pages:
            a, b = lp * p, min((lp + 1) * p, self._length)
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            elif a < b:
                out.append((a, b))
        return out

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add T tokens' keys and values, `[B, Hkv, T, D]` (the layout of `attn`'s k and v), at positions
        length .. length + T - 1, after freeing the pages no query from `length` on can read. Then the
        queries of those T positions may attend (`attn.decode(..., page_table=cache.page_table)`)."""
        t = self._check(k_new, v_new)
        if t == 0:
            return
        n, p = self._length, self.page_size
        self._keep(merge_intervals([*self.retention.pages(n, p), (n // p, -(-(n + t) // p))]))
        self._write(k_new, v_new, n, n, n + t)
        self._advance(t)

    def append_attended(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add T tokens whose queries have already attended (a prompt run through the forward pass), `[B,
        Hkv, T, D]`, at positions length .. length + T - 1: only the keys a query from length + T on can read
        are written, so a long prompt costs the pages it leaves behind, not T / max_append appends. T is not
        bounded by max_append."""
        t = self._check(k, v, bounded=False)
        if t == 0:
            return
        n, p = self._length, self.page_size
        end = n + t
        live = self.retention.pages(end, p)
        self._keep(live)
        for first, stop in live:  # the new tokens each run of live pages holds
            self._write(k, v, n, max(first * p, n), min(stop * p, end))
        self._advance(t)

    def _write(self, k: torch.Tensor, v: torch.Tensor, n: int, a: int, b: int) -> None:
        """Write positions a .. b - 1 of the tokens k, v [B, Hkv, T, D] that start at position n, placing
        the pages they fall in first."""
        if a >= b:
            return
        p = self.page_size
        for lp in range(a // p, -(-b // p)):
            if lp not in self._resident:
                self._place(lp)
        pos = torch.arange(a, b, device=self.device)
        phys = self.page_table[:, pos // p].long()  # [B, b - a]
        off = (pos % p)[None, :]
        self.k_pages[phys, off] = k[:, :, a - n:b - n].transpose(1, 2)
        self.v_pages[phys, off] = v[:, :, a - n:b - n].transpose(1, 2)

    def _advance(self, t: int) -> None:
        """After writing t tokens: the summaries of the blocks they touched, then the lengths."""
        if self.summaries is not None:
            self.summaries.update(self.k_pages, self.cache_seqlens, t, page_table=self.page_table)
        self._length += t
        self.cache_seqlens.fill_(self._length)

    def _keep(self, live: list[tuple[int, int]]) -> None:
        """Free the pages outside `live` (sorted [first, stop) runs of logical pages); they become `_live`."""
        for first, stop in _minus(self._live, live):
            for lp in range(first, stop):
                slot = self._resident.pop(lp, None)
                if slot is not None:
                    self._free.append(slot)
        self._live = live

    def _place(self, lp: int) -> None:
        if lp >= self.page_table.shape[1]:
            if self.max_seqlen is not None:
                raise ValueError(f"the cache holds at most max_seqlen = {self.max_seqlen} tokens")
            wider = torch.zeros(self.batch, 2 * lp + 1, dtype=torch.int32, device=self.device)
            wider[:, : self.page_table.shape[1]] = self.page_table
            self.page_table = wider
            if self.summaries is not None:  # as many key blocks as the wider table holds
                self.summaries = self.summaries.widened(-(-wider.shape[1] * self.page_size // self.summaries.block))
        if not self._free:
            if self._bounded:  # max_pages is an upper bound on what is ever live: this is a bug
                raise RuntimeError("PatternKVCache ran out of pages its retention bound promised")
            self._grow()
        slot = self._free.pop()
        self._resident[lp] = slot
        self.page_table[:, lp] = self._base[:, 0] + slot

    def _grow(self) -> None:
        """Double each sequence's pages (a retained set that grows with the context, no max_seqlen)."""
        old, new = self._slots, 2 * self._slots
        for name in ("k_pages", "v_pages"):
            pages = getattr(self, name)
            grown = pages.new_zeros((self.batch * new, *pages.shape[1:]))
            grown.view(self.batch, new, *pages.shape[1:])[:, :old] = pages.view(self.batch, old, *pages.shape[1:])
            setattr(self, name, grown)
        shift = torch.arange(self.batch, dtype=torch.int32, device=self.device)[:, None] * (new - old)
        self.page_table += shift
        self._base = self._base // old * new
        self._free.extend(range(new - 1, old - 1, -1))
        self._slots = new

    def _check(self, k: torch.Tensor, v: torch.Tensor, bounded: bool = True) -> int:
        for name, x, d in (("k_new", k, self.head_dim), ("v_new", v, self.value_dim)):
            if not torch.is_tensor(x) or x.dim() != 4:
                raise ValueError(f"{name} must be a 4-d tensor [B, Hkv, T, D], got {_shape(x)}")
            want = (self.batch, self.kv_heads, d)
            if (x.shape[0], x.shape[1], x.shape[3]) != want:
                raise ValueError(
                    f"{name} must be [B={self.batch}, Hkv={self.kv_heads}, T, D={d}], got {list(x.shape)}"
                )
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}")
            if x.dtype != self.k_pages.dtype:
                raise ValueError(f"{name} is {x.dtype} but the cache holds {self.k_pages.dtype}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k_new has {k.shape[2]} tokens but v_new has {v.shape[2]}")
        t = int(k.shape[2])
        if bounded and t > self.max_append:
            raise ValueError(
                f"append adds at most max_append = {self.max_append} tokens at a time, got {t} "
                "(append in chunks, or build the cache with a larger max_append)"
            )
        if self.max_seqlen is not None and self._length + t > self.max_seqlen:
            raise ValueError(f"the cache holds at most max_seqlen = {self.max_seqlen} tokens")
        return t


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _shape(x: object) -> str:
    return str(list(x.shape)) if torch.is_tensor(x) else type(x).__name__


def _minus(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The integers of the sorted disjoint intervals a that are in none of b."""
    out = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi <= cur or blo >= hi:
                continue
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
        if cur < hi:
            out.append((cur, hi))
    return out


@dataclass(frozen=True)
class KeySummaries:
    """Per key block of a cache, the element-wise min, max and mean of its keys (Quest's page bounds and the
    mean key): what a decode step scores a `topk` / `threshold` selector's key blocks with, instead of reading
    the keys. `lo`, `hi`, `mean` are [B, Hkv, blocks, D] over the keys below each sequence's length; a block
    with no key yet holds zeros. They are stored in the cache's dtype for a 16-bit cache (min and max exactly,
    the mean rounded once from its float32 sum: the scoring reads half the bytes), else in float32 (float64
    for a float64 cache); `build(dtype=torch.float32)` keeps a 16-bit cache's means unrounded. The caller
    keeps one object per layer between steps (`attn.decode(..., summaries=s)` updates it when k_new is appended); `update` after
    a write of its own. Updating recomputes only the blocks the new tokens touch, from the cache, with the
    code that builds them from scratch, so incremental and from-scratch summaries are the same numbers.
    Every shape is fixed and no value is read back: a step stays CUDA-graph capturable."""

    block: int
    lo: torch.Tensor
    hi: torch.Tensor
    mean: torch.Tensor

    @classmethod
    def build(cls, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, block: int, *,
              page_table: torch.Tensor | None = None, chunk: int = 256, dtype: torch.dtype | None = None) -> KeySummaries:
        """The summaries of every block of an existing cache (contiguous [B, Hkv, max_seqlen, D], or paged
        [pages, page_size, Hkv, D] with `page_table`), over the keys below `cache_seqlens`; `chunk` key
        blocks at a time (the gather's memory). `dtype`: how they are stored (default: the class's rule;
        float16, bfloat16, float32 or float64)."""
        _positive("block", block)
        b, hkv, cap, d = _cache_dims(k_cache, cache_seqlens, page_table)
        store = dtype or (k_cache.dtype if k_cache.dtype in _HALF else
                          torch.float64 if k_cache.dtype == torch.float64 else torch.float32)
        if store not in (*_HALF, torch.float32, torch.float64):
            raise ValueError(f"summaries are stored in float16, bfloat16, float32 or float64, got {store}")
        nb = -(-cap // block)
        out = [torch.zeros((b, hkv, nb, d), dtype=store, device=k_cache.device) for _ in range(3)]
        s = cls(block, *out)
        if s._kernel(k_cache):  # one launch over every block
            s._write(k_cache, cache_seqlens, 0, page_table, 0, nb)
        else:
            for b0 in range(0, nb, chunk):
                s._write(k_cache, cache_seqlens, 0, page_table, b0, min(nb, b0 + chunk) - b0)
        return s

    def widened(self, blocks: int) -> KeySummaries:
        """The same summaries over `blocks` key blocks (a cache that grew), the new ones zeros."""
        grown = [torch.zeros((*x.shape[:2], blocks, x.shape[3]), dtype=x.dtype, device=x.device) for x in
                 (self.lo, self.hi, self.mean)]
        for new, old in zip(grown, (self.lo, self.hi, self.mean), strict=True):
            new[:, :, :old.shape[2]] = old
        return KeySummaries(self.block, *grown)

    def update(self, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, n_new: int, *,
               page_table: torch.Tensor | None = None,
               append: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """After `n_new` keys were written at positions cache_seqlens .. + n_new - 1 (`cache_seqlens` the
        lengths before the write), recompute the blocks they fall in (a fixed number: a graph replays it;
        one launch off the PyTorch path, the blocks found on the device). `append` = (k_new, v_new,
        v_cache): the keys and values are not written yet; they are, in the same launch."""
        if n_new <= 0:
            return
        from .runtime.decode_selection import query_blocks

        if append is not None and not self._kernel(k_cache):
            from .runtime.decode import append as write

            write(k_cache, append[2], cache_seqlens, page_table, append[0], append[1])
            append = None
        touched = query_blocks(n_new, self.block)  # the blocks n_new consecutive positions may touch
        self._write(k_cache, cache_seqlens, n_new, page_table, cache_seqlens, touched, append)

    def _kernel(self, k_cache: torch.Tensor) -> bool:
        from .runtime.common import _torch_path

        return not _torch_path(k_cache) and self.mean.dtype != torch.float64

    def _write(self, k_cache: torch.Tensor, lengths: torch.Tensor, n_new: int, page_table: torch.Tensor | None,
               start: torch.Tensor | int, count: int,
               append: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Summaries over the keys below lengths + n_new ([B] lengths) of `count` key blocks per sequence from
        block `start` (an int, or per sequence the block of position start[b]; past the last block: the
        last), written in place: one Triton launch (`runtime.decode_kernels._summary_kernel`, which also
        writes `append`'s keys and values at `lengths` first), or PyTorch on the CPU path and for float64."""
        from .runtime.common import _d_pad

        b, hkv, cap, d = _cache_dims(k_cache, lengths, page_table)
        blk, nb = self.block, self.lo.shape[2]
        if self._kernel(k_cache):
            from .runtime.decode_kernels import _summary_kernel

            paged = page_table is not None
            strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)) if paged else k_cache.stride()[:3]
            lengths = lengths.contiguous()
            new: dict[str, Any] = {}
            if append is not None:
                kn, vn, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in append)
                dv = vn.shape[-1]
                v_strides = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)) if paged else v_cache.stride()[:3]
                new = dict(KN=kn, VN=vn, V=v_cache, s_knb=kn.stride(0), s_knh=kn.stride(1), s_knt=kn.stride(2),
                           s_vnb=vn.stride(0), s_vnh=vn.stride(1), s_vnt=vn.stride(2), s_vb=v_strides[0],
                           s_vh=v_strides[1], s_vn=v_strides[2], DV=dv, DV_PAD=_d_pad(dv))
            _summary_kernel[(count, b * hkv)](
                k_cache, page_table if paged else lengths, lengths, start if torch.is_tensor(start) else None,
                self.lo, self.hi, self.mean, *strides, page_table.stride(0) if paged else 0,  # type: ignore[union-attr]
                0 if torch.is_tensor(start) else start, n_new, nb, hkv, cap, k_cache.shape[1] if paged else 1,
                BLK=blk, CH=min(64, blk & -blk), D=d, D_PAD=_d_pad(d), PAGED=paged, **new,
            )
            return
        first = start.long()[:, None] // blk if torch.is_tensor(start) else torch.full((b, 1), start, device=k_cache.device)
        ids = (first + torch.arange(count, device=k_cache.device)).clamp(max=nb - 1)  # [B, T]
        t = count
        lengths = lengths + n_new
        pos = ids[:, :, None] * blk + torch.arange(blk, device=ids.device)  # [B, T, blk]
        here = (pos < lengths.long()[:, None, None]) & (pos < cap)
        at = pos.clamp(max=cap - 1)
        if page_table is None:
            keys = torch.gather(k_cache, 2, at.reshape(b, 1, t * blk, 1).expand(b, hkv, t * blk, d))
        else:
            size = k_cache.shape[1]
            page = torch.gather(page_table.long(), 1, (at // size).reshape(b, t * blk))
            keys = k_cache[page, (at % size).reshape(b, t * blk)].permute(0, 2, 1, 3)  # [B, Hkv, T * blk, D]
        work = torch.float64 if self.mean.dtype == torch.float64 else torch.float32
        keys = keys.to(work).reshape(b, hkv, t, blk, d)
        ok = here[:, None, :, :, None]
        count_k = here.sum(-1).to(keys.dtype)[:, None, :, None]  # [B, 1, T, 1]
        some = count_k > 0
        lo = torch.where(ok, keys, float("inf")).amin(3)
        hi = torch.where(ok, keys, float("-inf")).amax(3)
        mean = torch.where(ok, keys, 0.0).sum(3) / count_k.clamp(min=1)
        idx = ids[:, None, :, None].expand(b, hkv, t, d)
        for dst, src in ((self.lo, lo), (self.hi, hi), (self.mean, mean)):
            dst.scatter_(2, idx, torch.where(some, src, 0.0).to(dst.dtype))


_HALF = (torch.float16, torch.bfloat16)


def _patterns(body: ir.Body) -> list[ir.Pattern]:
    return [r.pattern for r in body.ranges] if isinstance(body, ir.Heads) else [body]


def _cache_dims(k_cache: torch.Tensor, lengths: torch.Tensor, page_table: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(batch, kv heads, capacity, head_dim) of a contiguous or paged cache."""
    if page_table is None:
        return k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    return page_table.shape[0], k_cache.shape[2], page_table.shape[1] * k_cache.shape[1], k_cache.shape[3]
