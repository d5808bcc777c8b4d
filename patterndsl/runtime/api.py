"""The typed user API of a compiled pattern: `Attention` (callable like SDPA) and `BlockMask`.

`patterndsl.compile(...)` and every generated module hand out one `Attention` built from the pattern's
`PatternSpec`. Options are per call or per block (`with attn.options(...)`), outputs may be passed in
(`out=`, `lse=`), and a `BlockMask` built once (tables on the device) is reusable and can be captured in a
CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import autograd, fa4, tables
from .backward import _backward, _varlen_backward
from .checks import _check, _check_docs, _need_scores, check_dtypes, check_n
from .common import _d_pad, _head_patterns, _on_device_of, _pow2, _tma_mode, _torch_path
from .forward import _choose, _config, _forward, _layout_way, _varlen_forward
from .options import options as _options
from .selection import selected_blocks as _selected_blocks
from .spec import PatternSpec
from .tokens import apply_tokens


def _no_tokens(spec: PatternSpec, what: str) -> None:
    """Refuse what token-level selectors (vertical, slash) do not support yet, in one sentence."""
    if spec.tokens and any(t is not None for t in spec.tokens):
        raise ValueError(f"'{spec.name}' selects columns and diagonals (vertical/slash): {what} not supported for it yet")


@dataclass(frozen=True)
class BlockMask:
    """A pattern's block tables at one sequence length, for one layer: per predicate the FULL and PARTIAL
    key blocks of each query block (CSR, int32, on `device`) and their transposes (query blocks per key block).
    Built once by `Attention.block_mask`; passing it to a call launches with its tiles."""

    n: int
    block_m: int
    block_n: int
    device: torch.device
    patterns: int | tuple[int, ...]  # the predicate of every head (an int: all heads alike)
    tables: dict[int, tuple[Any, Any, Any, Any]]  # predicate -> (full_off, full_idx, part_off, part_idx)
    tables_t: dict[int, tuple[Any, Any, Any, Any]]
    layout: dict[int, str | None]  # predicate -> its token layout (None: contiguous rows)

    def to_dense(self) -> torch.Tensor:
        """[query blocks, key blocks] int8 per predicate: 0 none, 1 PARTIAL, 2 FULL (a view for inspection)."""
        out = {}
        for pat, (f_off, f_idx, p_off, p_idx) in self.tables.items():
            rows = f_off.numel() - 1
            cols = -(-self.n // self.block_n) if self.layout[pat] is None else int(max(
                [int(f_idx.max()) + 1 if f_idx.numel() else 0, int(p_idx.max()) + 1 if p_idx.numel() else 0, 1]))
            dense = torch.zeros((rows, cols), dtype=torch.int8, device=f_off.device)
            for off, idx, value in ((f_off, f_idx, 2), (p_off, p_idx, 1)):
                r = torch.repeat_interleave(torch.arange(rows, device=off.device), (off[1:] - off[:-1]).long())
                dense[r, idx.long()] = value
            out[pat] = dense
        if isinstance(self.patterns, int):
            return out[self.patterns]
        return torch.stack([out[p] for p in self.patterns])

    def sparsity(self) -> float:
        """The fraction of tiles the kernels skip, over the heads' predicates."""
        per: list[float] = []
        heads = (self.patterns,) if isinstance(self.patterns, int) else self.patterns
        for pat in heads:
            f_off, f_idx, p_off, p_idx = self.tables[pat]
            rows = f_off.numel() - 1
            cols = -(-self.n // self.block_n)
            per.append(1.0 - (f_idx.numel() + p_idx.numel()) / max(1, rows * cols))
        return sum(per) / len(per)


class Attention:
    """A compiled pattern, callable as `attn(q, k, v)` with q [B, H, N, D] and k, v [B, Hkv, N, D] (Hkv
    divides H: GQA, MQA), returning [B, H, N, D] like scaled_dot_product_attention."""

    def __init__(self, spec: PatternSpec) -> None:
        self.spec = autograd.register(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> str:
        return self.spec.source

    def __repr__(self) -> str:
        return f"<patterndsl.Attention {self.spec.kind} '{self.spec.name}'>"

    def options(self, **changes: Any) -> Any:
        """Kernel options for the calls inside a `with` block (see `patterndsl.runtime.options.Options`)."""
        return _options(**changes)

    def check_n(self, n: int) -> None:
        """Raise ValueError when the pattern cannot run at sequence length n (its arguments, its layout)."""
        check_n(self.spec, n)

    def __call__(self, q: Any, k: Any, v: Any, *, block_mask: BlockMask | None = None, return_lse: bool = False,
                 cu_seqlens: Any = None, max_seqlen: int | None = None, layer: int | None = None,
                 scale: float | None = None, scores: Any = None, out: Any = None, lse: Any = None,
                 cu_seqlens_q: Any = None, cu_seqlens_k: Any = None, permutation: Any = None) -> Any:
        """Attention with this pattern. `return_lse`: also the log-sum-exp [B, H, N] (float32, natural log).
        `layer` (models only): which layer's pattern applies. `scores`: the caller's block scores of a
        `topk(..., score=given)`. `cu_seqlens` (packed documents, FlashAttention's convention): q, k, v
        [total, H, D] or [1, H, total, D], the pattern inside each document. `out`, `lse`: tensors to write
        the results into (no autograd). `block_mask`: tables built by `block_mask()`, launched with its tiles.
        A query with no allowed key gets zeros and log-sum-exp -inf. `cu_seqlens_q` with `cu_seqlens_k`
        (chunked prefill): document d's queries are the last rows of its keys' pattern (q packed by
        cu_seqlens_q, k and v by cu_seqlens_k). `permutation` (`permute(...)` patterns only): int [B or 1,
        (H or Hkv or 1,) N] mapping each segment onto itself, or a pair (queries' order, keys' order); the pattern
        applies in the permuted order and the results come back in the caller's order (`runtime.permutation`)."""
        if permutation is not None or self.spec.permute is not None:
            return self._permuted(q, k, v, permutation, block_mask, return_lse, cu_seqlens, max_seqlen, layer,
                                  scale, scores, out, lse, cu_seqlens_q, cu_seqlens_k)
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            if block_mask is not None or cu_seqlens is not None:
                raise ValueError("cu_seqlens_q and cu_seqlens_k take neither cu_seqlens nor block_mask")
            got = self._chunks(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, layer, scale, out, lse)
            return got if return_lse else got[0]
        got = self._tiled(q, k, v, block_mask, cu_seqlens, max_seqlen, layer, scale, scores, out, lse)
        return got if return_lse else got[0]

    def _tiled(self, q: Any, k: Any, v: Any, block_mask: Any, cu_seqlens: Any, max_seqlen: Any, layer: Any,
               scale: Any, scores: Any, out: Any, lse: Any) -> tuple[Any, Any]:
        """(out, lse) of one call, launched with `block_mask`'s tiles where given."""
        if block_mask is None:
            return self._call(q, k, v, cu_seqlens, max_seqlen, layer, scale, scores, out, lse)
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must come from attn.block_mask(...), got {type(block_mask).__name__}")
        if torch.is_tensor(q) and q.dim() == 4 and q.shape[2] != block_mask.n:
            raise ValueError(f"block_mask was built for N = {block_mask.n}, got N = {q.shape[2]}")
        with _options(tiles=(block_mask.block_m, block_mask.block_n)):
            return self._call(q, k, v, cu_seqlens, max_seqlen, layer, scale, scores, out, lse)

    def _permuted(self, q: Any, k: Any, v: Any, permutation: Any, block_mask: Any, return_lse: bool,
                  cu_seqlens: Any, max_seqlen: Any, layer: Any, scale: Any, scores: Any, out: Any, lse: Any,
                  cu_seqlens_q: Any, cu_seqlens_k: Any) -> Any:
        """A call of a `permute(...)` pattern: the plain call on q, k, v gathered into the permuted order."""
        from .permutation import permuted

        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("a permuted pattern takes neither cu_seqlens_q nor cu_seqlens_k")
        if (out is not None or lse is not None) and all(torch.is_tensor(t) for t in (q, k, v)) \
                and autograd.differentiable(q, k, v):
            raise ValueError("out= and lse= take no gradients: call under torch.no_grad() or without them")

        def run(qp: Any, kp: Any, vp: Any) -> tuple[Any, Any]:
            return self._tiled(qp, kp, vp, block_mask, cu_seqlens, max_seqlen, layer, scale, scores, None, None)

        got = _into(out, lse, *permuted(self.spec, q, k, v, permutation, cu_seqlens=cu_seqlens,
                                        max_seqlen=max_seqlen, layer=layer, run=run))
        return got if return_lse else got[0]

    def attention(self, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        """`attn(q, k, v, ...)`: the output alone."""
        return self(q, k, v, **kwargs)

    def attention_lse(self, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        """(out, lse): `attn(q, k, v, ..., return_lse=True)`."""
        return self(q, k, v, return_lse=True, **kwargs)

    def _call(self, q: Any, k: Any, v: Any, cu_seqlens: Any, max_seqlen: Any, layer: Any, scale: Any, scores: Any,
              out: Any, lse: Any) -> tuple[Any, Any]:
        spec = self.spec
        patterns = _head_patterns(spec, layer)
        dynamic = any(sel is not None for sel in spec.selectors)
        code = -1 if layer is None else layer
        if spec.tokens and (cu_seqlens is not None or _suffix_rows(q, k, v)):
            _no_tokens(spec, "packed documents and fewer queries than keys are")
        if cu_seqlens is not None:
            if dynamic:
                raise ValueError("packed documents (cu_seqlens) are not supported for dynamic selectors yet")
            return self._varlen(q, k, v, scale, cu_seqlens, max_seqlen, patterns, code, out, lse)
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        if _suffix_rows(q, k, v):
            return self._suffix(q, k, v, layer, scale, scores, out, lse)
        group = _check(spec, q, k, v, scale, patterns)
        _need_scores(spec, q, scores)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        given = _outputs(q, out, lse, (*q.shape[:3],))
        grad = autograd.differentiable(q, k, v)
        if grad and given:
            raise ValueError("out= and lse= take no gradients: call under torch.no_grad() or without them")
        on_fa4 = fa4.chosen(spec, patterns, q, k, v, scale,
                            lambda: _forward(spec, q, k, v, scale, group, patterns, scores, None))
        if on_fa4 is not None:
            return _into(out, lse, *fa4.attention(q, k, v, scale, on_fa4))
        if grad:
            if dynamic:
                o, ls = autograd.DynamicAttention.apply(q, k, v, scale, code, scores, spec.key)  # type: ignore[no-untyped-call]
            else:
                o, ls = autograd.static_attention(q, k, v, scale, code, spec.key)
            return apply_tokens(spec, q, k, v, o, ls, scale, patterns, True) if spec.tokens else (o, ls)
        o, ls = _forward(spec, q, k, v, scale, group, patterns, scores, None, out, lse)
        return apply_tokens(spec, q, k, v, o, ls, scale, patterns, False) if spec.tokens else (o, ls)

    def _suffix(self, q: Any, k: Any, v: Any, layer: Any, scale: Any, scores: Any, out: Any,
                lse: Any) -> tuple[Any, Any]:
        """Fewer queries than keys (the last Nq rows of the pattern at N = Nk, FlashAttention's bottom-right
        alignment), or v's head_dim unlike q's and k's: the same kernels and block tables at N = Nk, on
        queries zero-padded at the top to Nk rows and head dims zero-padded to the wider one (zero columns
        change no dot product; zero rows of dO give the padded queries no gradient). Empty inputs give
        empty outputs."""
        spec = self.spec
        B, H, Nq, Dqk = q.shape
        Nk, Dv = k.shape[2], v.shape[3]
        check_dtypes(q, k, v)
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"k and v must have the same shape but for head_dim, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        rows = q.new_empty((1, 1, 1, 1)).expand(B, H, Nk, Dqk)  # q's checks at Nk rows, no memory
        _check(spec, rows, k, k, scale, _head_patterns(spec, layer), check_length=Nk > 0)
        if Nq > Nk:
            raise ValueError(f"k, v must be [{B}, kv_heads, Nk, {Dqk}] with Nk >= Nq to match q {tuple(q.shape)} "
                             f"(its rows are the last Nq of Nk), got {tuple(k.shape)}")
        if any(sel is not None for sel in spec.selectors) and Nq < Nk:
            raise ValueError("fewer queries than keys is not supported for dynamic selectors yet")
        shape = (B, H, Nq, Dv)
        scale = 1.0 / math.sqrt(Dqk) if scale is None else float(scale)
        if Nq == 0:
            o = q.new_zeros(shape)
            if autograd.differentiable(q, k, v):
                o = o + (q.sum() + k.sum() + v.sum()) * 0  # empty, yet a node autograd can reach q, k, v through
            got = o, q.new_empty(shape[:3], dtype=torch.float32)
        elif Nq * (H // k.shape[1]) <= 64 and not autograd.differentiable(q, k, v) and \
                not any(sel is not None for sel in spec.selectors):
            got = self._suffix_decode(q, k, v, layer, scale)
        else:
            D = max(Dqk, Dv)
            pad = torch.nn.functional.pad
            o, lse_all = self._call(pad(q, (0, D - Dqk, Nk - Nq, 0)), pad(k, (0, D - Dqk)), pad(v, (0, D - Dv)),
                                    None, None, layer, scale, scores, None, None)
            got = o[:, :, Nk - Nq:, :Dv], lse_all[:, :, Nk - Nq:]
        return _into(out, lse, *got)

    def _chunks(self, q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_seqlen: Any, layer: Any, scale: Any,
                out: Any, lse: Any) -> tuple[Any, Any]:
        """Packed documents with fewer queries than keys: the packed-documents path at the keys' lengths, on
        queries scattered to the last rows of their documents (zeros elsewhere) and head dims zero-padded
        to the wider one, as `_suffix` does for one sequence."""
        _no_tokens(self.spec, 'chunked prefill (cu_seqlens_q, cu_seqlens_k) is')
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k come together")
        for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if not torch.is_tensor(t):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        packed = q.dim() == 3
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != q.dim() or t.dim() not in (3, 4) or (t.dim() == 4 and t.shape[0] != 1):
                raise ValueError(f"with cu_seqlens_q, q, k, v must all be [total, heads, head_dim] or all "
                                 f"[1, heads, total, head_dim], got {name} of shape {tuple(t.shape)}")
        q3, k3, v3 = (t if packed else t[0].transpose(0, 1) for t in (q, k, v))
        if (cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.dtype not in (torch.int32, torch.int64)
                or cu_q.device != q.device):
            raise ValueError(f"cu_seqlens_q must be a 1-D int32 or int64 tensor on q's device with as many "
                             f"entries as cu_seqlens_k, got {tuple(cu_q.shape)}, {cu_q.dtype}, {cu_q.device}")
        cq, ck = cu_q.tolist(), cu_k.tolist()
        lq = [b - a for a, b in zip(cq[:-1], cq[1:], strict=True)]
        lk = [b - a for a, b in zip(ck[:-1], ck[1:], strict=True)]
        if cq[0] != 0 or cq[-1] != q3.shape[0] or min(lq, default=0) < 0:
            raise ValueError(f"cu_seqlens_q must rise from 0 to q's packed length {q3.shape[0]}, got {cq}")
        bad = [d for d in range(len(lq)) if lq[d] > lk[d]]
        if bad:
            raise ValueError(f"document {bad[0]} has {lq[bad[0]]} queries but {lk[bad[0]]} keys: at most as many "
                             "queries as keys")
        total, H, Dqk = q3.shape
        Dv = v3.shape[-1]
        scale = 1.0 / math.sqrt(Dqk) if scale is None else float(scale)
        doc = torch.repeat_interleave(torch.arange(len(lq), device=q.device), torch.tensor(lq, device=q.device),
                                      output_size=total)
        at = torch.arange(total, device=q.device) + (cu_k[1:] - cu_q[1:]).long()[doc]  # each query's key row
        D = max(Dqk, Dv)
        pad = torch.nn.functional.pad
        if total == 0:
            o = q3.new_zeros((0, H, Dv)) + (q3.sum() + k3.sum() + v3.sum()) * 0
            got_l = q3.new_empty((H, 0), dtype=torch.float32)
        else:
            rows = q3.new_zeros((k3.shape[0], H, D)).index_copy(0, at, pad(q3, (0, D - Dqk)))
            o, l_all = self._call(rows, pad(k3, (0, D - Dqk)), pad(v3, (0, D - Dv)), cu_k, max_seqlen, layer,
                                  scale, None, None, None)
            o, got_l = o[at, :, :Dv], l_all[:, at]
        return _into(out, lse, *((o, got_l) if packed else (o.transpose(0, 1)[None], got_l[None])))

    def _suffix_decode(self, q: Any, k: Any, v: Any, layer: Any, scale: float) -> tuple[Any, Any]:
        """A few queries without gradients: the decode kernel, k and v as a full contiguous cache (its run
        tables at Nk, or for an N-free pattern at the next power of two, shared by nearby lengths)."""
        from . import decode as dec

        spec = self.spec
        patterns = _head_patterns(spec, layer)
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        capacity = Nk
        if dec.decode_consistent(spec, patterns):
            try:
                check_n(spec, _pow2(Nk))
                capacity = _pow2(Nk)
            except ValueError:
                pass
        seqlens = torch.full((B,), Nk, dtype=torch.int32, device=q.device)
        out = torch.empty((B, H, Nq, v.shape[3]), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
        return dec.decode(spec, q, k, v, seqlens, None, 0, scale, H // k.shape[1], patterns, capacity, out, lse)

    def _varlen(self, q: Any, k: Any, v: Any, scale: Any, cu_seqlens: Any, max_seqlen: Any, patterns: Any,
                code: int, out: Any, lse: Any) -> tuple[Any, Any]:
        spec = self.spec
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not torch.is_tensor(t):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != q.dim() or t.dim() not in (3, 4) or (t.dim() == 4 and t.shape[0] != 1):
                raise ValueError(f"with cu_seqlens, q, k, v must all be [total, heads, head_dim] or all "
                                 f"[1, heads, total, head_dim], got {name} of shape {tuple(t.shape)}")
        packed = q.dim() == 3
        q4, k4, v4 = (t.permute(1, 0, 2)[None] if packed else t for t in (q, k, v))
        _check(spec, q4, k4, v4, scale, patterns, check_length=False)
        starts, lengths = _check_docs(spec, q4, cu_seqlens, max_seqlen)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        lse_shape = (q4.shape[1], q4.shape[2]) if packed else (1, q4.shape[1], q4.shape[2])
        given = _outputs(q, out, lse, lse_shape)
        grad = autograd.differentiable(q, k, v)
        if grad and given:
            raise ValueError("out= and lse= take no gradients: call under torch.no_grad() or without them")
        longest = max(lengths)
        docs = fa4.Docs(cu_seqlens, longest) if longest and q.device.type == "cuda" else None
        on_fa4 = None if docs is None else fa4.chosen(
            spec, patterns, q4, k4, v4, scale,
            lambda: _varlen_forward(spec, q, k, v, cu_seqlens, scale, patterns, starts, lengths), docs)
        if on_fa4 is not None:
            o4, lse4 = fa4.attention(q4, k4, v4, scale, on_fa4, docs)
            return _into(out, lse, o4[0].permute(1, 0, 2) if packed else o4, lse4[0] if packed else lse4)
        if grad:
            o, lse_out = autograd.varlen_attention(q, k, v, cu_seqlens, scale, code, spec.key)
        else:
            l4 = None if lse is None else (lse[None] if packed else lse)
            o, lse_out = _varlen_forward(spec, q, k, v, cu_seqlens, scale, patterns, starts, lengths, out, l4)
        return o, (lse_out[0] if packed else lse_out)

    def context_parallel(self, q: Any, k: Any, v: Any, group: Any = None, *, placement: Any = None,
                         return_lse: bool = False, cu_seqlens: Any = None, layer: int | None = None,
                         scale: float | None = None, block: int = 128) -> Any:
        """This rank's output rows [B, H, N_local, D] (and lse) of attention over a sequence spread over the
        ranks of a torch.distributed `group`: q, k, v are the rank's shards, by default contiguous
        (`x.tensor_split(world, dim=2)`), else as `placement` (`patterndsl.distributed.Placement`) holds.
        Each rank receives exactly the key rows its queries need (tiles of `block`), with gradients.
        `cu_seqlens`: packed documents over the whole sequence (batch 1)."""
        _no_tokens(self.spec, 'context parallelism is')
        from ..distributed.context_parallel import context_parallel

        _no_permute(self.spec, "context_parallel()")
        return context_parallel(self, q, k, v, group, placement=placement, return_lse=return_lse,
                                cu_seqlens=cu_seqlens, layer=layer, scale=scale, block=block)

    def backward(self, do: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, dlse: Any = None,
                 scale: float | None = None, layer: int | None = None, cu_seqlens: Any = None,
                 dq: Any = None, dk: Any = None, dv: Any = None) -> tuple[Any, Any, Any]:
        """(dq, dk, dv) for the output gradient `do` (and `dlse`) of a forward call that returned out, lse:
        for callers that write their own autograd. dq, dk, dv: tensors to write into (contiguous, the inputs'
        shapes and dtypes). Static patterns only (a selector's picks live in its forward's autograd)."""
        _no_tokens(self.spec, 'the explicit backward() is (use autograd)')
        spec = self.spec
        _no_permute(spec, "backward()")
        if any(sel is not None for sel in spec.selectors):
            raise ValueError("backward() serves static patterns; a selector's gradients come through autograd")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        grads = None
        if dq is not None or dk is not None or dv is not None:
            for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
                if g is None or g.shape != like.shape or g.dtype != like.dtype or not g.is_contiguous():
                    raise ValueError(f"{name} must be a contiguous tensor shaped and typed like its input "
                                     f"({tuple(like.shape)}, {like.dtype}) when any of dq, dk, dv is given")
            grads = (dq, dk, dv)
        code = -1 if layer is None else layer
        if cu_seqlens is not None:
            packed = q.dim() == 3
            l4 = lse[None] if packed else lse
            dl4 = None if dlse is None else (dlse[None] if packed else dlse)
            return _varlen_backward(spec, do, q, k, v, out, l4, dl4, cu_seqlens, scale, code, grads)
        _check(spec, q, k, v, scale, _head_patterns(spec, layer))
        return _backward(spec, do, q, k, v, out, lse, dlse, scale, code, None, grads)

    def decode(self, q: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, *, page_table: Any = None,
               k_new: Any = None, v_new: Any = None, return_lse: bool = False, layer: int | None = None,
               scale: float | None = None, out: Any = None, lse: Any = None, summaries: Any = None,
               scores: Any = None, selected: Any = None, return_selected: bool = False) -> Any:
        """A decode step: q [B, H, Nq, D] at positions seqlen - Nq .. seqlen - 1 of each sequence against a
        contiguous cache k_cache [B, Hkv, max_seqlen, D], v_cache [B, Hkv, max_seqlen, Dv], or a paged one
        [pages, page_size, Hkv, D] with `page_table` [B, max_pages] int32 (logical page p of sequence b is
        physical page page_table[b, p]). `cache_seqlens` [B] int32 on the device: tokens in the cache;
        `k_new`, `v_new` [B, Hkv, n, D] are written at cache_seqlens first, then seqlen = cache_seqlens + n.
        No host synchronisation: a step is CUDA-graph capturable (after one warm-up call), so on the GPU the
        lengths and page numbers are the caller's to keep in range (CPU calls check them). Returns
        [B, H, Nq, Dv] (and the log-sum-exp [B, H, Nq] with `return_lse`). No autograd.

        Selectors (topk, threshold) score the cache's key blocks from `summaries` (a
        `patterndsl.cache.KeySummaries` of the selector's key blocks, kept by the caller between steps and
        updated here when k_new is appended), or from `scores` [B, H, query blocks of the step, key blocks
        of the cache] for score=given. `return_selected=True` also returns the selection (last): a tuple,
        one int32 tensor [B, H, query blocks of the step, width] per selector, the key blocks each (batch,
        head, query block) picked, -1 padding; `selected=` takes one from an earlier call (an earlier layer,
        as TidalDecode) instead of scoring."""
        _no_tokens(self.spec, 'decoding is')
        from . import decode as dec

        spec = self.spec
        _no_permute(spec, "decode()")
        patterns = _head_patterns(spec, layer)
        group, capacity = dec.check_decode(spec, q, k_cache, v_cache, cache_seqlens, page_table, k_new, v_new,
                                           scale, patterns)
        dec.check_selectors(spec, patterns, q, q.shape[1] // group, capacity, scores, summaries, selected,
                            return_selected)
        B, H, Nq, D = q.shape
        shape = (B, H, Nq, v_cache.shape[-1])
        if out is None:
            out = torch.empty(shape, dtype=q.dtype, device=q.device)
        elif not torch.is_tensor(out) or out.shape != shape or out.dtype != q.dtype or out.device != q.device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of shape {list(shape)}, {q.dtype}, on {q.device}")
        _outputs(q, None, lse, (B, H, Nq))
        if lse is None:
            lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        with torch.no_grad():
            n_new = 0
            if k_new is not None:
                dec.append(k_cache, v_cache, cache_seqlens, page_table, k_new, v_new, summaries)
                n_new = k_new.shape[2]
            picks = dec.selections(spec, q, cache_seqlens, n_new, group, patterns, capacity, q.shape[1] // group,
                                   scores, summaries, selected)
            dec.decode(spec, q, k_cache, v_cache, cache_seqlens, page_table, n_new, scale, group, patterns,
                       capacity, out, lse, picks)
        result = (out, lse) if return_lse else (out,)
        if return_selected:
            result += (tuple(next(iter(picks.values())).sel),)
        return result if len(result) > 1 else out

    def selected_blocks(self, q: Any, k: Any, *, scores: Any = None, layer: int | None = None,
                        permutation: Any = None) -> Any:
        """The blocks the selectors pick, as a dense bool tensor [B, H, blocks, blocks] (heads with a static
        pattern: all False), for inspection and tests. A `permute(...)` pattern takes its `permutation` and
        gives blocks of the permuted order."""
        if permutation is not None or self.spec.permute is not None:
            from .permutation import permuted_qk

            q, k = permuted_qk(self.spec, q, k, permutation)
        return _selected_blocks(self.spec, q, k, scores=scores, layer=layer)

    def selected_tokens(self, q: Any, k: Any, *, scale: float | None = None, layer: int | None = None) -> Any:
        """{pattern: (columns, offsets)} of the vertical/slash patterns some head runs: each [B, the
        pattern's heads, n] int64, ascending, as the forward picks them (for inspection and tests)."""
        from .tokens import selected_tokens

        return selected_tokens(self.spec, q, k, scale, layer)

    def to_flex_block_mask(self, n: int, *, device: Any = "cpu", layer: int | None = None,
                           block_size: int = 128) -> Any:
        """FlexAttention's `BlockMask` for this pattern at length n, from the analytic tables (see
        `to_flex_block_mask` in this module)."""
        _no_tokens(self.spec, 'a FlexAttention block mask is')
        return to_flex_block_mask(self, n, device=device, layer=layer, block_size=block_size)

    def config(self, q: Any, k: Any, v: Any, *, layer: int | None = None) -> tuple[int, ...]:
        """The forward config (BLOCK_M, BLOCK_N, warps, stages, tma, one_loop, maxnreg) a call with these
        inputs launches, tuning first where a call would (scratch outputs; the inputs are not written)."""
        spec = self.spec
        patterns = _head_patterns(spec, layer)
        group = _check(spec, q, k, v, None, patterns)
        return _config_for(spec, q, k, v, group, patterns)

    def backend(self, q: Any, k: Any, v: Any, *, layer: int | None = None) -> str:
        """Which kernels `attn(q, k, v)` runs with these inputs: "fa4" (FlashAttention-4, `runtime.fa4`),
        "triton" or "torch" (the CPU path), deciding first as a call would (the tuner may time both)."""
        spec = self.spec
        patterns = _head_patterns(spec, layer)
        group = _check(spec, q, k, v, None, patterns)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if fa4.chosen(spec, patterns, q, k, v, scale, lambda: _forward(spec, q, k, v, scale, group, patterns)):
            return "fa4"
        return "torch" if _torch_path(q) else "triton"

    def block_mask(self, n: int, *, device: Any = "cpu", layer: int | None = None, block_size: tuple[int, int] |
                   None = None, head_dim: int = 128, dtype: Any = torch.bfloat16) -> BlockMask:
        """The block tables at sequence length n, built now on `device` (reused by later calls and safe to
        capture in a CUDA graph): for tiles `block_size` (BLOCK_M, BLOCK_N), by default the configured tiles
        for `head_dim` and `dtype`. Static patterns only."""
        _no_tokens(self.spec, 'prebuilt block tables are')
        spec = self.spec
        check_n(spec, n)
        if any(sel is not None for sel in spec.selectors):
            raise ValueError("a selector's blocks depend on q and k: block_mask() serves static patterns")
        patterns = _head_patterns(spec, layer)
        dev = torch.device(device)
        if block_size is None:
            itemsize = torch.empty((), dtype=dtype).element_size()
            block_size = tuple(_config(spec, _d_pad(head_dim), itemsize)[:2])  # type: ignore[assignment]
        bm, bn = (int(x) for x in block_size)  # type: ignore[union-attr]
        if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"block_size must be powers of two >= 16, got {block_size}")
        used = sorted({patterns} if isinstance(patterns, int) else set(patterns))
        return BlockMask(
            n=n, block_m=bm, block_n=bn, device=dev, patterns=patterns,
            tables={p: tables.block_tables(spec, n, bm, bn, dev, p) for p in used},
            tables_t={p: tables.block_tables_t(spec, n, bm, bn, dev, p) for p in used},
            layout={p: None if spec.layouts[p] is None else spec.layouts[p].description for p in used},  # type: ignore[union-attr]
        )


def to_flex_block_mask(attn: Attention, n: int, *, device: Any = "cpu", layer: int | None = None,
                       block_size: int = 128) -> Any:
    """FlexAttention's `BlockMask` for this pattern at length n, built from the analytic tables (no mask_mod
    evaluated per block, as `create_block_mask` does), with a mask_mod that evaluates the pattern's predicate
    for PARTIAL blocks. Both directions (key blocks per query block, and the query blocks per key block that
    Flex's backward reads) come from our tables, so the time follows the non-empty blocks, not the
    (n / block_size)**2 evaluations of `create_block_mask` or `BlockMask.from_kv_blocks`' dense transpose;
    the index arrays themselves are Flex's format, (n / block_size)**2 int32s each. One batch entry
    (broadcast); one head (broadcast) unless the pattern gives heads their own predicates."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    from .evaluate import evaluate

    spec = attn.spec
    check_n(spec, n)
    if any(sel is not None for sel in spec.selectors):
        raise ValueError("a selector's blocks depend on q and k: to_flex_block_mask() serves static patterns")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    dev = torch.device(device)
    patterns = _head_patterns(spec, layer)
    heads = (patterns,) if isinstance(patterns, int) else tuple(patterns)
    nb = -(-n // block_size)
    lists: dict[int, list[tuple[Any, Any]]] = {}
    for pat in dict.fromkeys(heads):
        # over the token order: a layout's default tables are over its physical rows
        by_row = tables.block_tables(spec, n, block_size, block_size, dev, pat, layout=False)
        by_col = tables.block_tables_t(spec, n, block_size, block_size, dev, pat, layout=False)
        lists[pat] = [_flex_lists(off, idx, nb) for tabs in (by_row, by_col)
                      for off, idx in zip(tabs[::2], tabs[1::2], strict=True)]
    # per side: full KV, partial KV, full Q, partial Q (Flex's "kv" lists are the non-full blocks)
    side = [(torch.stack([lists[p][s][0] for p in heads])[None], _stacked([lists[p][s][1] for p in heads]))
            for s in range(4)]
    exprs = {p: spec.predicates[p].expr for p in heads}
    if len(set(heads)) == 1:
        only = exprs[heads[0]]

        def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
            return evaluate(only, q, k, n)
    else:
        which = torch.tensor(heads, device=dev)

        def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
            out = evaluate(exprs[heads[0]], q, k, n)
            for p in dict.fromkeys(heads[1:]):
                out = torch.where(which[h] == p, evaluate(exprs[p], q, k, n), out)
            return out

    return FlexBlockMask(seq_lengths=(n, n), kv_num_blocks=side[1][0], kv_indices=side[1][1],
                         full_kv_num_blocks=side[0][0], full_kv_indices=side[0][1], q_num_blocks=side[3][0],
                         q_indices=side[3][1], full_q_num_blocks=side[2][0], full_q_indices=side[2][1],
                         BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def _stacked(lists: list[Any]) -> Any:
    """Per-head index arrays [rows, width_h] as one [1, heads, rows, max width] (zero padded)."""
    width = max(x.shape[1] for x in lists)
    return torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in lists])[None]


def _flex_lists(off: Any, idx: Any, rows: int) -> tuple[Any, Any]:
    """A CSR table as Flex's (counts [rows] int32, indices [rows, rows] int32, listed first, the rest 0).
    The index arrays span every block, as Flex's BlockMask defines them: Flex reads the mask's extent off
    their width (a narrower array made its compiled kernels refuse the mask on the CPU and compute wrong
    outputs on the GPU)."""
    counts = (off[1:] - off[:-1]).to(torch.int32)
    out = torch.zeros((rows, max(1, rows)), dtype=torch.int32, device=off.device)
    if idx.numel():
        r = torch.repeat_interleave(torch.arange(rows, device=off.device), counts.long(), output_size=idx.numel())
        at = torch.arange(idx.numel(), device=off.device) - off[:-1].long()[r]
        out[r, at] = idx.to(torch.int32)
    return counts, out


@_on_device_of
def _config_for(spec: PatternSpec, q: Any, k: Any, v: Any, group: int, patterns: Any) -> tuple[int, ...]:
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    tma = _tma_mode((q, k, v, out), _d_pad(D))
    with _layout_way(spec, q, k, v, out, lse, scale, group, patterns, tma):
        return tuple(_choose(spec, q, k, v, out, lse, scale, group, patterns, tma))


def _suffix_rows(q: Any, k: Any, v: Any) -> bool:
    """Fewer queries than keys, empty inputs, or v's head_dim unlike k's: `Attention._suffix` serves them."""
    if not (torch.is_tensor(q) and torch.is_tensor(k) and torch.is_tensor(v) and q.dim() == k.dim() == v.dim() == 4):
        return False
    return q.shape[2] != k.shape[2] or k.shape[2] == 0 or v.shape[3] != k.shape[3]


def _no_permute(spec: PatternSpec, what: str) -> None:
    """Calls that take no permutation refuse a `permute(...)` pattern (its meaning needs one)."""
    if spec.permute is not None:
        raise ValueError(f"{what} does not take permuted patterns: '{spec.name}' needs a permutation per call, "
                         "given to attn(q, k, v, permutation=...)")


def _into(out: Any, lse: Any, o: Any, o_lse: Any) -> tuple[Any, Any]:
    """The results (o, o_lse), copied into the caller's `out=` / `lse=` where given, each checked against
    the result's shape, dtype and device first."""
    for name, t, x in (("out", out, o), ("lse", lse, o_lse)):
        if t is not None and (not torch.is_tensor(t) or t.shape != x.shape or t.dtype != x.dtype
                              or t.device != x.device):
            raise ValueError(f"{name} must be a tensor of shape {list(x.shape)}, {x.dtype}, on {x.device}")
    if out is not None:
        out.copy_(o)
    if lse is not None:
        lse.copy_(o_lse)
    return (o if out is None else out), (o_lse if lse is None else lse)


def _outputs(q: Any, out: Any, lse: Any, lse_shape: tuple[int, ...]) -> bool:
    """Check tensors passed in for the results: out like q, lse float32 `lse_shape`, both contiguous."""
    if out is not None:
        if not torch.is_tensor(out) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor like q ({tuple(q.shape)}, {q.dtype}, {q.device})")
    if lse is not None:
        if not torch.is_tensor(lse) or tuple(lse.shape) != tuple(lse_shape) or lse.dtype != torch.float32 \
                or lse.device != q.device or not lse.is_contiguous():
            raise ValueError(f"lse must be a contiguous float32 tensor of shape {list(lse_shape)} on {q.device}")
    return out is not None or lse is not None
