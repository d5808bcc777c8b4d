"""Registers, spill bytes and shared memory of a generated module's kernels on the H100 (sm_90), from CPU.

No GPU needed: each runtime kernel (`patterndsl.runtime.fwd_kernels`, `bwd_kernels`, `selection`, `varlen`),
specialised on the pattern's predicate (`PRED`, a constexpr @triton.jit function of the compiled pattern,
`attn.spec.predicates[0].kernel`; a dynamic pattern's `SEL_PRED` too), is built with `triton.compile` for
`GPUTarget("cuda", 90, 128)` and its PTX
assembled by `ptxas -v` from Triton's bundled toolkit. Spills (local-memory traffic per thread) are what
made the first backward tiles slow (docs/decisions.md, backward tiles); shared memory must stay under the
H100's 227 KiB per block or the launch fails.

`--fwd` builds `_attn_fwd` (the kernel of token layouts, selectors and packed documents), `--fast` the grid
kernel `_attn_fwd_fast` of the other patterns with pointer loads, or with `--tma` through host tensor
descriptors ([B, H, N, D] with [1, 1, block, D] boxes, as `_descriptor` makes them); switches it does not set
are off (at their defaults: no token layout, no packed documents). Pointers and strides are marked divisible by 16, as a launch with aligned
tensors specialises them: without that mark the loads are not vectorised (16-bit loads through registers
instead of 128-bit asynchronous copies), and the registers and spills differ from what the GPU runs (this
tool's earliest figures lacked the mark). A fifth field of --fwd / --fast caps registers per thread
(maxnreg). `blocks/SM` is what registers, shared memory and threads allow on an H100. `wgmma serialized`: ptxas
found too few registers to keep several warpgroup MMAs in flight (its C7512 note), or other instructions
writing an accumulator while its MMA runs (C7515), and waits on each one.
`--sel` builds a dynamic pattern's selection kernels (block means, fused top-k with both forms of the
context, table merge) with the arguments `_selection` and `_dynamic_tables` give them; `--tables` the
packed-document table kernels (`_free_tables`).
`--decode G,NQ,BLOCK,PAGED` builds the decode step's split and merge kernels (`runtime/decode.py`'s launch;
PAGED 1: pages holding whole tiles, 2: smaller pages, gathered per key), the split kernel also under each of
`DECODE_VARIANTS` (the short-row options).
`--tokens ROWS,WARPS,STAGES,EARLY_KV,BITS,BWD` builds the vertical/slash kernel (`runtime/tokens.py`).
`--spans` builds --fwd and --bwd reading their tiles from segment tables (`runtime/positions.py`'s `Spans`).
`--bwd-split` builds --bwd's dK/dV kernel with its heavy rows split into pieces (SPLIT: a float32 workspace)
and the kernel merging them (`_attn_bwd_dkdv_merge`).

    python benchmarks/kernel_resources.py --src "causal & window(1023)" --d 128 --dtype bf16 \
        --fwd 128,64,8,3 --bwd 32,64,64,32,8,3 --bwd 64,128,128,64,8,3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import patterndsl as P  # noqa: E402
from patterndsl.runtime import bwd_kernels, decode_kernels, decode_selection, fwd_kernels, selection, tokens, varlen  # noqa: E402
from patterndsl.runtime.backward import _bwd_config  # noqa: E402
from patterndsl.runtime.options import Options  # noqa: E402

INT32_TABLES = {
    "HEAD_IDS",
    "FULL_OFF",
    "FULL_IDX",
    "PART_OFF",
    "PART_IDX",
    "CU",
    "TILES",
    "KV_IDS",
    "QH_OFF",
    "QH_IDX",
    "QH_RANK",
    "SLOTS",
    "SLOT_ROWS",
}
FP32_BUFFERS = {"LSE", "LSE2", "DELTA", "DLSE", "WS_K", "WS_V"}
SEGMENTS = {"QSEG", "KSEG"}  # rows at given positions (`tables.span_tables`): a path taken when passed, off here
INTS = {"N", "H", "NH", "GROUP", "NKV", "LSE_N", "NP", "NH_SEL", "NKT", "CHUNK", "CHUNKS", "NSLOT"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def resources(kernel, dtype: str, constexprs: dict, warps: int, stages: int, types: dict | None = None,
              maxnreg: int = 0) -> str:  # fmt: skip
    sig = {}
    for p in kernel.params:
        if types and p.name in types:
            sig[p.name] = types[p.name]
        elif p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name == "NTOK":  # the token count beside a token layout's rows; without a layout, absent
            sig[p.name] = "i32" if constexprs.get("LAYOUT") is not None else "constexpr"
        elif p.name in INTS or p.name.startswith("s_"):
            sig[p.name] = "i32"
        elif p.name in ("qk_scale", "scale"):
            sig[p.name] = "fp32"
        elif p.name.lower().endswith("_desc") or p.name in SEGMENTS or p.name == "ORDER":  # pointer loads, no segments,
            # the kernels' own order of query blocks: unused, None
            sig[p.name] = "constexpr"
        else:
            sig[p.name] = "*i32" if p.name in INT32_TABLES else "*fp32" if p.name in FP32_BUFFERS else f"*{dtype}"
    # feature switches this tool does not set (token layout, packed documents, ...) are off: the plain path,
    # a switch with a default at it (LAYOUT=None: a constexpr function argument or None, tested `is not None`)
    consts = {p.name: constexprs.get(p.name, p.default if p.has_default else False)
              for p in kernel.params if p.is_constexpr}  # fmt: skip
    consts.update({p.name: None for p in kernel.params if sig[p.name] == "constexpr" and not p.is_constexpr})
    # what a launch of contiguous [B, H, N, D] tensors with D a multiple of 16 specialises: 16-byte aligned
    # pointers and strides divisible by 16 (every stride: a base pointer's alignment needs all of its terms)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if sig[p.name].startswith("*") or p.name.startswith("s_")}  # fmt: skip
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    built = triton.compile(ASTSource(kernel, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 128), options=options)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(built.asm["ptx"])
        log = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    mma = "wgmma" if "wgmma" in built.asm["ptx"] else "mma.sync"  # Hopper's warpgroup MMA, or the Ampere one
    # too few registers for wgmma's pipeline (C7512), or other instructions writing a wgmma's accumulator
    # while it runs (C7515, e.g. an accumulator through a branch): ptxas waits on each wgmma before the next
    if "C7512" in log or "C7515" in log:
        mma += " serialized"
    n_regs = int(regs.group(1)) if regs else 255
    blocks = min(227 * 1024 // max(built.metadata.shared, 1), 65536 // (n_regs * 32 * warps), 64 // warps)
    return (f"{built.metadata.shared / 1024:6.1f} KiB smem, {n_regs} regs, "
            f"spill st/ld {spill.group(1) if spill else '?'}/{spill.group(2) if spill else '?'} B, {mma}, "
            f"{blocks} blocks/SM")  # fmt: skip


DECODE_VARIANTS = {"merge_chunk4": {"decode_merge_chunk": 4}, "pipelined_picks": {"decode_pipelined_picks": True},
                   "fold_merge": {"decode_fold_merge": True},
                   "all three": {"decode_merge_chunk": 4, "decode_pipelined_picks": True, "decode_fold_merge": True}}


def decode(spec, dtype: str, d: int, d_pad: int, g: int, nq: int, block: int, paged: int) -> None:
    """The decode step's kernel as `runtime.decode` launches it: the split over runs of key blocks, whose
    last program merges (scalars the host passes as ints, the run tables and head packs int32)."""
    nq_pad = triton.next_power_of_2(nq)
    m = max(16, triton.next_power_of_2(g * nq_pad))
    ints = {x: "i32" for x in ("NQ", "NNEW", "CAP", "PAGE", "GROUP", "SPLITS", "s_ptb", "s_lb", "s_lh")}
    tables = {x: "*i32" for x in ("PT", "SEQ", "HEADS", "RUN_OFF", "RUNS", "COUNT", "LOCK")}
    ws = {"WS_O": "*fp32", "WS_L": "*fp32", "LSE": "*fp32"}
    shapes = dict(G=g, NQ_PAD=nq_pad, M=m, DV=d, DV_PAD=d_pad)
    sel = spec.selectors[0]
    prec = "ieee" if dtype == "fp32" else "tf32"
    pred, dispatch = (None, False) if sel is None else selection.sel_kernel(spec, 0)
    dyn = {} if sel is None else dict(SEL_PRED=pred, SEL_VARS=dispatch, SEL_B=sel.block, SEL_KB=sel.kblock)
    sel_t = {"PICK": "*i8", "VD": "*i32", "SLIST": "*i32", "SCOUNT": "*i32", "TWS": "constexpr", "TSEL": "constexpr",
             **{x: "i32" for x in ("H", "SQB", "SNK", "SL", "T_SPLITS")}}
    split_consts = dict(shapes, PRED=spec.predicates[0].kernel, TABLE_M=block, BLOCK_N=block, DQK=d, DQK_PAD=d_pad,
                        PAGED=bool(paged), PAGE_TILES=paged == 1, DOT_PREC=prec, IDX64=spec.idx64, INTERPRET=False,
                        **dyn)  # fmt: skip
    split = resources(decode_kernels._decode_split, dtype, split_consts, 4, 3, {**ints, **tables, **ws, **sel_t})
    kind = ("contiguous", "paged", "paged, pages smaller than a tile")[paged]
    print(f"decode G={g} Nq={nq} block={block} {kind}: split {split}", flush=True)
    for name, opts in DECODE_VARIANTS.items():  # the short-row options (`Options.decode_*`), as decode.py passes them
        c, t = {**split_consts, "MERGE_CHUNK": opts.get("decode_merge_chunk", 0),
                "PIPE_PICKS": opts.get("decode_pipelined_picks", False)}, {**ints, **tables, **ws, **sel_t}
        if opts.get("decode_fold_merge"):
            if sel is None or sel.all[0].kind != "topk":
                continue
            rule = sel.all[0]
            qb = (nq + rule.block - 2) // rule.block + 1
            np2, rm = triton.next_power_of_2(int(rule.param)), triton.next_power_of_2(g * triton.next_power_of_2(qb))
            c |= dict(N_SEL=int(rule.param), T_QB_PAD=triton.next_power_of_2(qb), T_RM=rm, T_NP=np2, T_SP=16)
            t |= {"PICK": "constexpr", "SLIST": "constexpr", "SCOUNT": "constexpr", "TWS": "*i64", "TSEL": "*i32"}
        print(f"  split, {name}: {resources(decode_kernels._decode_split, dtype, c, 4, 3, t)}", flush=True)
    if sel is not None and sel.all[0].kind == "topk":  # the step's selection (`decode_selection._fused`)
        rule = sel.all[0]
        qb = (nq + rule.block - 2) // rule.block + 1
        qb_pad, np2 = triton.next_power_of_2(qb), triton.next_power_of_2(int(rule.param))
        r = max(16, triton.next_power_of_2(g * qb_pad))
        t = {"SEQ": "*i32", "HEADS": "*i32", "RUN_OFF": "*i32", "RUNS": "*i32", "WS": "*i64", "KM": "*bf16",
             "SC": "*i32", "SEL": "*i32", "PICK": "*i8", "SLIST": "*i32", "SCOUNT": "*i32", "SL": "i32",
             **{x: "i32" for x in ("NQ", "NNEW", "CAP", "NK", "PACKS", "HKV", "GROUP", "H", "SPLITS")}}
        bk, rm = max(np2, 32 if d_pad <= 128 else 16), triton.next_power_of_2(g * qb_pad)
        bs, splits = decode_selection._split_blocks(2048, bk, rm)  # a 128k cache of blocks of 64
        c = dict(PRED=spec.predicates[rule.context].kernel, SEL_B=rule.block, KB=rule.kblock, QB=qb, QB_PAD=qb_pad,
                 G=g, R=r, RM=rm, NP=np2, BK=bk, BS=bs, D=d_pad, CH=min(16, rule.kblock & -rule.kblock),
                 DOT_PREC=prec, IDX64=spec.idx64, N_SEL=int(rule.param), SP=triton.next_power_of_2(splits),
                 E_PAD=triton.next_power_of_2(g * qb * int(rule.param)))  # fmt: skip
        m = {k: c.pop(k) for k in ("N_SEL", "SP", "E_PAD")}
        alone = resources(decode_kernels._decode_topk, dtype, c, 4, 1,
                          {k: v for k, v in t.items() if k not in ("PICK", "SLIST", "SCOUNT", "SL", "SEL", "H")})
        m |= {k: c[k] for k in ("QB", "QB_PAD", "G", "RM", "NP")}
        merge = resources(decode_kernels._decode_topk_merge, dtype, m, 4, 1, t)
        # the merge builds the decode kernel's tables (one selector), in a launch of its own
        print(f"decode selection: topk {alone} | merge {merge}", flush=True)
    t = {"SEQ": "*i32", "PT": "*i32", **{x: "i32" for x in ("T", "CAP", "PAGE", "HKV")}}
    c = dict(CH=16 if nq > 1 else 1, DK=d, DK_PAD=d_pad, DV=d, DV_PAD=d_pad, PAGED=bool(paged))
    print(f"decode append: {resources(decode_kernels._append_kv, dtype, c, 4, 1, t)}", flush=True)
    if sel is not None:  # with summaries the append is the summary update's (`KeySummaries.update`)
        t = {"PT": "*i32", "LEN": "*i32", "START": "*i32", "LO": "*fp32", "HI": "*fp32", "MEAN": "*fp32",
             **{x: "i32" for x in ("B0", "NNEW", "NB", "HKV", "CAP", "PAGE")}}
        c = dict(BLK=sel.kblock, CH=min(64, sel.kblock & -sel.kblock), D=d, D_PAD=d_pad, PAGED=bool(paged), DV=d,
                 DV_PAD=d_pad)
        print(f"decode append + summaries: {resources(decode_kernels._summary_kernel, dtype, c, 4, 1, t)}", flush=True)


def selection_kernels(spec, opts: Options, dtype: str, d: int, d_pad: int) -> None:
    """The selection kernels of pattern 0's selector, as `_selection` / `_dynamic_tables` launch them with the
    kernel options `opts`."""
    kind, n, blk, given = spec.selectors[0][:4]
    names = ("NB", "NH", "H", "HKV", "GROUP", "HQ", "HK", "NQT", "NKT", "NQB", "W", "WS", "K1N", "ROWS")
    ints = {x: "i32" for x in names} | {x: "*i32" for x in ("SPAN", "SEL", "ST_KT", "CNT", "OFF", "FIDX", "PIDX")}
    pool = dict(BLK=blk, CH=min(64, blk & -blk), HEAD_DIM=d, D_PAD=d_pad)
    pool_kernel = resources(selection._pool_kernel, dtype, pool, opts.pool_warps, 3, dict(ints, QM="*fp32", KM="*fp32"))
    print(f"pool {'':20s} {pool_kernel}")
    if kind == "topk" and int(n) <= 64:
        bq = opts.topk_rows
        for ranges in (True, False):
            bk = 16 if d_pad > 128 else opts.topk_keys if ranges else 32  # as `_selection` picks it
            c = dict(N_SEL=int(n), NP=triton.next_power_of_2(int(n)), BQ=bq, BK=bk, D_PAD=16 if given else d_pad,
                     DOT_PREC="ieee" if dtype == "fp32" else "tf32", RANGES=ranges, GIVEN=bool(given),
                     FILL=opts.topk_fill and triton.next_power_of_2(int(n)) <= bk)  # fmt: skip
            t = dict(ints, QM="*fp32", KM="*fp32", SCORES="*fp32", CAND="*i32" if ranges else "*u8")
            topk = resources(selection._topk_kernel, dtype, c, opts.topk_warps, 3, t)
            print(f"topk {'ranges' if ranges else 'bytes':20s} {topk}")
    if spec.selectors[0].score == "compressed" and spec.selectors[0].kblock == blk:  # as `_compressed_scores`
        for ranges in (True, False):
            t = {x: "i32" for x in ("q0", "ROWS", "NK", "NR")} | dict(ints, KM=f"*{dtype}", LSE="*fp32", S="*fp32",
                                                                       HLIST="*i32", HCOUNT="*i32", KVH="*i32",
                                                                       CAND="*i32" if ranges else "*u8")  # fmt: skip
            built = []
            for kernel, tiles in ((selection._compressed_lse_kernel, opts.compressed_lse_tiles),
                                  (selection._compressed_score_kernel, opts.compressed_sum_tiles)):
                # NSA's shapes: the 16 query heads of a KV head, 1024 key blocks
                m, bk, warps, stages = selection.score_tiles(tiles, d_pad, 16 * blk, 1024)
                c = dict(BLK=blk, GMAX=16, M=m, BK=bk, HEAD_DIM=d, D_PAD=d_pad, RANGES=ranges, STAGES=stages,
                         DOT_PREC="ieee" if dtype == "fp32" else "tf32", INTERPRET=False, CONSEC=True)  # fmt: skip
                built.append(resources(kernel, dtype, c, warps, stages, t))
            print(f"compressed {'ranges' if ranges else 'bytes':14s} lse {built[0]} | sums {built[1]}")
    t = dict(ints, ST_CLS="*i8", K1="*i64", C1="*i8")
    for write in (False, True):
        c = dict(RQ=1, RK=1, BR=16, SC=16, WC=16, LOG=20, WRITE=write)
        print(f"merge {'write' if write else 'count':19s} {resources(selection._merge_kernel, dtype, c, 4, 3, t)}")


def tables() -> None:
    """The packed-document table kernels of the N-free build (`_free_tables`), as it launches them."""
    ints = {"rows": "i32", "docs": "i32", "steps": "i32"}
    ptr = {x: "*i32" for x in ("DESC", "STORE", "KEY", "TROW", "RDOC", "TILES", "F_OFF", "P_OFF", "SORTED", "SRC",
                               "F_IDX", "P_IDX")}  # fmt: skip
    t = dict(ints, **ptr, ORDER="*i64")
    for name, c, warps in (("_vl_rows", dict(BLOCK=varlen._VL_ROWS), 4), ("_vl_scan", dict(CHUNK=varlen._VL_CHUNK), 8),
                           ("_vl_gather", dict(ROWS=varlen._VL_GATHER, ENTRIES=varlen._VL_ENTRIES), 4)):  # fmt: skip
        print(f"{name:24s} {resources(getattr(varlen, name), 'i32', c, warps, 1, t)}", flush=True)


def token_kernel(spec, dtype: str, d: int, d_pad: int, cfg: str) -> None:
    """`runtime/tokens.py`'s `_token_attn` of the pattern's first head pattern (vertical/slash), as `_launch`
    gives it its tables; cfg: ROWS,WARPS,STAGES,EARLY_KV,BITS,BWD (0/1 switches)."""
    rows, warps, stages, early, bits, bwd = (int(x) for x in cfg.split(","))
    sel = spec.token_selection(0)
    small = {"COLS", "CRANGE", "DLIST", "DCOUNT"}
    t = {**{x: "*i8" for x in ("MEMBER", "DIAG")}, **{x: "*i32" for x in small}, "MBITS": "*i64",
         **{x: "*fp32" for x in ("DK", "DV")}, **{x: "i32" for x in ("HKV", "NV", "NDIAG")},
         **{x: "fp32" for x in ("qk_scale", "sm_scale")}, "F_OFF": "*i32", "F_IDX": "*i32", "P_OFF": "*i32",
         "P_IDX": "*i32"}  # fmt: skip
    c = dict(PRED=sel.dispatch, BLOCK_M=rows, BLOCK_N=tokens.TILE, HEAD_DIM=d, D_PAD=d_pad,
             DOT_PREC="ieee" if dtype == "fp32" else "tf32", BWD=bool(bwd), EARLY_KV=bool(early),
             BITS=bool(bits), FOLD=True, INTERPRET=False)  # fmt: skip
    print(f"tokens {cfg:20s} {resources(tokens._token_attn, dtype, c, warps, stages, t)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="causal & window(1023)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--fwd", action="append", default=[], help="BM,BN,warps,stages[,maxnreg]")
    ap.add_argument("--fast", action="append", default=[], help="BM,BN,warps,stages[,maxnreg]: the grid kernel")
    ap.add_argument("--tma", action="store_true", help="--fast with host TMA descriptors instead of pointer loads")
    ap.add_argument(
        "--bwd",
        action="append",
        default=[],
        help="BM1,BN1,BM2,BN2,warps,stages (both kernels) or BM1,BN1,BM2,BN2,warps1,stages1,warps2,stages2",
    )
    ap.add_argument("--decode", action="append", default=[],
                    help="G,NQ,BLOCK,paged: the decode kernel (split, merging) for G query heads per KV head, NQ "
                         "queries, key blocks of BLOCK, a paged cache (1) or not (0)")
    ap.add_argument("--tokens", action="append", default=[],
                    help="ROWS,WARPS,STAGES,EARLY_KV,BITS,BWD: the vertical/slash kernel (options token_*)")
    ap.add_argument("--sel", action="store_true", help="the selection kernels of a dynamic pattern (topk)")
    ap.add_argument("--tables", action="store_true", help="the packed-document table kernels (cu_seqlens)")
    ap.add_argument("--topk-rows", type=int, help="query blocks per top-k program (the topk_rows option)")
    ap.add_argument("--topk-warps", type=int, help="its warps (topk_warps)")
    ap.add_argument("--topk-keys", type=int, help="its key blocks per tile (topk_keys)")
    ap.add_argument("--topk-fill", type=int, choices=[0, 1], help="its first tile by a bitonic top-k (topk_fill)")
    ap.add_argument("--lse-tiles", help="rows,keys,warps,stages: the compressed log-sum-exp pass (compressed_lse_tiles)")
    ap.add_argument("--sum-tiles", help="rows,keys,warps,stages: the compressed weight sums (compressed_sum_tiles)")
    ap.add_argument("--spans", action="store_true",
                    help="--fwd and --bwd with segment tables (rows at given positions: context parallelism)")
    ap.add_argument("--bwd-split", action="store_true",
                    help="--bwd's dK/dV kernel splitting heavy rows (SPLIT), and the merge kernel")
    a = ap.parse_args()
    spans = {x: "*i32" for x in SEGMENTS} if a.spans else None
    # a whole program (layouts, params) where --src holds one; else a bare expression named p
    spec = P.compile(a.src if "pattern " in a.src else f"pattern p = {a.src}\n").spec
    given = {"topk_rows": a.topk_rows, "topk_warps": a.topk_warps, "topk_keys": a.topk_keys,
             "topk_fill": None if a.topk_fill is None else bool(a.topk_fill),
             "compressed_lse_tiles": a.lse_tiles and tuple(int(x) for x in a.lse_tiles.split(",")),
             "compressed_sum_tiles": a.sum_tiles and tuple(int(x) for x in a.sum_tiles.split(","))}  # fmt: skip
    opts = dataclasses.replace(Options(), **{k: v for k, v in given.items() if v is not None})  # the defaults, and these
    d_pad = max(16, triton.next_power_of_2(a.d))
    sel = spec.selectors[0]  # a dynamic pattern's kernels also mask its selected blocks (SEL_PRED)
    common = dict(PRED=spec.predicates[0].kernel, HEAD_DIM=a.d, D_PAD=d_pad,
                  DOT_PREC="ieee" if a.dtype == "fp32" else "tf32", IDX64=spec.idx64, INTERPRET=False, ACCUM=False,
                  SEL_PRED=None if sel is None else spec.predicates[sel.selected].kernel)  # fmt: skip
    common["LAYOUT"] = spec.layouts[0].kernel if spec.layouts[0] is not None else None  # a token layout's rows
    for cfg in a.fwd:
        bm, bn, w, s, *cap = (int(x) for x in cfg.split(","))
        c = dict(common, BLOCK_M=bm, BLOCK_N=bn)
        fwd = resources(fwd_kernels._attn_fwd, a.dtype, c, w, s, spans, maxnreg=cap[0] if cap else 0)
        print(f"fwd  {cfg:20s} {fwd}", flush=True)
    for cfg in a.fast:
        bm, bn, w, s, *cap = (int(x) for x in cfg.split(","))
        c = dict(common, BLOCK_M=bm, BLOCK_N=bn, EVEN=True, FOLD=True, OFF32=True, CONTIG=True, TMA=int(a.tma))
        t = {"WORK": "*i32", "WS_O": "*fp32", "WS_L": "*fp32", **{x: "i32" for x in ("BHN", "SLOTS")}}
        if a.tma:
            t.update({f"{x}_desc": f"tensordesc<{a.dtype}[1,1,{bm if x in 'qo' else bn},{d_pad}]>" for x in "qkvo"})
        name = cfg + (" tma" if a.tma else "")
        fast = resources(fwd_kernels._attn_fwd_fast, a.dtype, c, w, s, t, cap[0] if cap else 0)
        print(f"fast {name:20s} {fast}", flush=True)
    for cfg in a.decode:
        decode(spec, a.dtype, a.d, d_pad, *(int(x) for x in cfg.split(",")))
    for cfg in a.tokens:
        token_kernel(spec, a.dtype, a.d, d_pad, cfg)
    if a.sel:
        selection_kernels(spec, opts, a.dtype, a.d, d_pad)
    if a.tables:
        tables()
    asked = a.fwd or a.fast or a.sel or a.tables or a.decode or a.tokens  # the backward's default tiles when nothing else is asked
    for cfg in a.bwd or ([] if asked else [",".join(map(str, _bwd_config(spec, d_pad)))]):
        c = [int(x) for x in cfg.split(",")]
        bm1, bn1, bm2, bn2, w1, s1, w2, s2 = c if len(c) == 8 else (*c, *c[4:])
        dq = resources(bwd_kernels._attn_bwd_dq, a.dtype, dict(common, BLOCK_M=bm2, BLOCK_N=bn2), w2, s2, spans)
        c1 = dict(common, BLOCK_M=bm1, BLOCK_N=bn1, SPLIT=a.bwd_split)
        dkdv = resources(bwd_kernels._attn_bwd_dkdv, a.dtype, c1, w1, s1, spans)
        print(f"bwd  {cfg:20s} dK/dV{' split' if a.bwd_split else ''}: {dkdv} | dQ: {dq}", flush=True)
        if a.bwd_split:
            merge = resources(bwd_kernels._attn_bwd_dkdv_merge, a.dtype, dict(common, BLOCK_N=bn1), 4, 1)
            print(f"merge {cfg:19s} {merge}", flush=True)


if __name__ == "__main__":
    main()
