"""Kernel options: per call or per block of code, never module globals.

`with attn.options(one_loop=True, tiles=(64, 64)): ...` sets them for the calls inside the block, in this
thread or task only (a context variable), and restores them on exit. The defaults are the choices the H100
measurements settled (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Options:
    """tma_mode: 0 pointer loads, 1 host tensor descriptors (TMA), 2 device tensor descriptors.
    fold: fold the softmax scale into the exponent's multiply-add.
    contig: walk a query block's FULL key blocks as one run when every block's run is contiguous.
    one_loop: the fast kernel walks FULL and PARTIAL blocks in one loop (the tuner may also pick it).
    maxnreg: > 0 caps the fast kernel's registers per thread (ptxas .maxnreg).
    split_tiles: None splits a query block only when it would finish last by far; 0 never; k: slices of k tiles.
    topk_rows, topk_warps, topk_keys, topk_fill, pool_warps: the fused top-k and block-mean kernels' shape.
    compressed_lse_tiles, compressed_sum_tiles: the compressed rule's two scoring kernels' tiles (query rows,
    key blocks, warps, pipeline stages): its log-sum-exp pass and its weight sums.
    bwd_fuse_pre: the dQ kernel computes delta and lse2 (one launch less).
    bwd_tma: static patterns without a token layout read Q, dO and K, V tiles through TMA descriptors.
    layout_gather: patterns with a token layout run the fast kernel on q, k, v gathered into the layout's
    order (`runtime.layout_order`, True) or read them in place on the pointer-load kernel `_attn_fwd`
    (False); None (the default) lets the tuner time both at the first call per shape (gathered where
    nothing is tuned). The backward reads the layout in place unless this is True: then it runs on q, k,
    v, the output and dO gathered so (TMA tiles), which was measured slower (docs/decisions.md); a
    `heads { }` pattern whose KV head mixes predicates reads its layout in place either way.
    autotune: False launches the configured tiles (as PATTERNDSL_AUTOTUNE=0 does).
    tiles: a forward config (BLOCK_M, BLOCK_N[, warps, stages[, tma, one_loop, maxnreg]]) to launch, no tuning.
    bwd_split: None cuts a key block's dK/dV work (its query blocks times the group's query heads) into pieces
    for several programs only where it would finish last by far (a sink's, a global token's); 0 never; k:
    every row with more than k tile iterations, in pieces of at least k.
    bwd_tiles: a backward config (BM1, BN1, BM2, BN2, warps1, stages1, warps2, stages2), no tuning.
    decode_block: the decode kernel's key block (a power of two >= 16; 0: by head_dim).
    decode_splits: the decode kernel's splits per row (0: from batch, heads and blocks against the SMs).
    decode_warps, decode_stages: the decode kernel's warps and pipeline stages (0: 4 warps, Triton's stages).
    decode_tma: a contiguous cache's tiles through TMA (1) or pointer loads (0); -1: the tuner's pick.
    decode_merge_chunk: the decode split that finishes last merges the splits' partial results this many
    splits per load (a power of two), of the rows the output has (0: one split at a time, every row: one
    wait on L2 per split, which a selector's short rows at batch 1 feel).
    decode_pipelined_picks: the decode kernel walks a selector's picked tiles in a for loop, which Triton's
    pipeliner prefetches (the pick list, the rows' cases, K and V of the next tiles), instead of a while loop
    whose every tile waits on that chain of loads.
    decode_fold_merge: a lone topk's selection at decode launches no merge of its splits: each decode kernel
    program merges them itself (the pack's picks in registers) where a pack's rows x picks are few
    (`decode_selection.FOLD_ENTRIES`): one launch less a step, a top-n merge more per program.
    decode_select_keys: the key blocks a decode step's top-n scores per tile (a power of two >= 16; 0: 32,
    16 past head_dim 128); a split's tiles are loaded one after the other, so wider tiles wait on fewer loads.
    token_warps, token_stages: the vertical/slash forward kernel's warps (0: 4 per 64 query rows) and
    pipeline stages.
    token_rows: the vertical/slash kernel's query rows per program (64 or 128: two 64-row tiles sharing the
    key tiles either visits). token_early_kv: it loads K and V tiles without waiting on the pairs' mask.
    token_bits: it reads a tile's kept columns and diagonals from bit-packed words, not bytes per key and
    per pair.
    direct_launch: a launch plan's later launches go through the compiled kernel's own launcher with the
    arguments Triton bound at its first launch (`runtime.plans`), skipping Triton's per-launch binding; off by
    default until the GPU suite has covered it.
    fa4: FlashAttention-4 (`runtime.fa4`) for patterns that are a band of offsets around the diagonal (no mask,
    causal, sliding windows): None (the default) lets the tuner time it against the Triton kernels at the
    first call per shape where its package imports and the GPU is sm90/sm100; True takes it wherever it can
    run the call; False never. Everything FA4 cannot take runs on the Triton kernels.
    async_checks: checks that need the device's values (a run-time permutation maps each segment onto
    itself) become device-side assertions: no host synchronisation, so a call can be captured in a CUDA
    graph; a violation then fails at the next synchronisation, naming the check, instead of at the call."""

    tma_mode: int = 1
    fold: bool = True
    contig: bool = True
    one_loop: bool = False
    maxnreg: int = 0
    split_tiles: int | None = None
    topk_rows: int = 64
    topk_warps: int = 4
    topk_keys: int = 64
    topk_fill: bool = True
    pool_warps: int = 4
    compressed_lse_tiles: tuple[int, int, int, int] = (128, 128, 8, 2)
    compressed_sum_tiles: tuple[int, int, int, int] = (128, 128, 8, 2)
    bwd_fuse_pre: bool = True
    bwd_tma: bool = True
    layout_gather: bool | None = None
    autotune: bool = True
    tiles: tuple[int, ...] | None = None
    bwd_tiles: tuple[int, ...] | None = None
    bwd_split: int | None = None
    decode_block: int = 0
    decode_splits: int = 0
    decode_warps: int = 0
    decode_stages: int = 0
    decode_tma: int = -1
    decode_merge_chunk: int = 0
    decode_pipelined_picks: bool = False
    decode_fold_merge: bool = False
    decode_select_keys: int = 0
    token_warps: int = 0
    token_stages: int = 2
    token_rows: int = 64
    token_early_kv: bool = True
    token_bits: bool = True
    async_checks: bool = False
    fa4: bool | None = None
    direct_launch: bool = False


_CURRENT: ContextVar[Options] = ContextVar("patterndsl_options", default=Options())  # noqa: B039 (frozen)


def current_options() -> Options:
    return _CURRENT.get()


@contextlib.contextmanager
def restored(saved: Options) -> Iterator[Options]:
    """Run a block under options captured earlier: the backward pass of a call runs under the options its
    forward saw, also where autograd runs it on another thread (CUDA), which a context variable does not
    reach."""
    token = _CURRENT.set(saved)
    try:
        yield saved
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def options(**changes: Any) -> Iterator[Options]:
    """Set kernel options for the calls inside the block (see `Options`); unknown names are an error."""
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
