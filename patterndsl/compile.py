"""The compiler driver: a `.pat` pattern becomes a self-contained Python module with a Triton kernel.

`compile_source(...)` returns the module's text (byte-identical for identical input); `compile(...)`
also loads it. The module imports only torch and triton: its predicates, its tile classifier and its
argument checks are rendered here (`codegen.py`) from `semantics.predicate` and `check`'s constraints.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from . import __version__, ir
from . import expr as E
from .check import _constraints
from .codegen import (
    INT32_MAX,
    CodegenError,
    doc_text,
    indent,
    render_intervals,
    render_python,
    render_triton,
    safe_int,
    safe_name,
)
from .intervals import RANDOM_ROWS_ENUMERATED
from .layout import Layout, choose, describe, layout_predicate, logical_index
from .layout import rows as layout_rows
from .layout import valid as layout_valid
from .mask import magnitude_bound
from .resources import codegen_template
from .selectors import Split, split
from .semantics import predicate
from .source import PatternError

__all__ = ["Compiled", "compile", "compile_source", "DEFAULT_CONFIGS", "TUNE_CONFIGS"]

# (largest padded head_dim, (BLOCK_M, BLOCK_N, num_warps, num_stages)); tuned on the H100 (docs/perf-notes.md)
DEFAULT_CONFIGS: tuple[tuple[int, tuple[int, int, int, int]], ...] = (
    (64, (128, 64, 4, 3)),
    (128, (128, 64, 8, 3)),
    (256, (64, 64, 8, 2)),
)
# Grid neighborhoods run in a tiled token layout where no key tile is seen by every query of a query tile:
# every tile is PARTIAL, and smaller tiles visit fewer wasted pairs. On the H100 (docs/benchmarks/
# layouts_h100.json, D = 128) 64 x 32 beat 128 x 64 by 1.1x (2-D), 1.8x (dilated 2-D) and 1.4x (3-D video);
# D = 64 and 256 are not measured.
GRID_CONFIGS: tuple[tuple[int, tuple[int, int, int, int]], ...] = (
    (64, (64, 32, 4, 3)),
    (128, (64, 32, 4, 3)),
    (256, (64, 32, 8, 2)),
)
# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA 0/1[, one loop 0/1[, maxnreg]]) a generated module times on
# its first call per head_dim (autotuning of the fast kernel; patterns with a token layout time their own kernel
# over DEFAULT_CONFIGS' tiles and these candidates' tiles, warps and stages, selectors keep DEFAULT_CONFIGS).
# For D = 128 the four best of the v3 sweep over the five benchmark patterns
# (docs/perf-notes.md); 64 x 64, which the 2026-11-25 20:47 sweep found 1.5x faster than 128 x 128 on
# PowerAttention (its 64-token blocks; docs/benchmarks/forward_sweep_oneloop_h100.json); and the grid kernel
# with FULL and PARTIAL blocks in one loop (the sixth field), 3-5% faster on the 1024 window and PowerAttention
# in that sweep's quick medians, which wander by about as much: the tuner decides on the machine at hand.
# D = 64 takes the same additions, unmeasured there.
# The seventh field caps registers per thread (ptxas .maxnreg) so that two 8-warp blocks share an SM, the one
# way left to overlap one block's softmax with another's matrix products (triton 3.6 does not warp-specialise
# on sm_90). sm_90 compiles with triton 3.6 (benchmarks/kernel_resources.py --fast [--tma], 2026-11-25 23:30):
# D = 128, 128 x 64, 2 stages: with TMA 147 registers uncapped (1 block per SM), 124 capped at 128 without
# spills (2 blocks of 96 KiB of shared memory); with pointer loads 197 uncapped, at 128 it spills 60 B for
# causal (3 stores and 4 loads a step of its FULL loop; 116 B for the 1024 window). D = 64: 128 x 64 fits in 128
# registers uncapped, 128 x 128 at 128 spills 12 B with pointer loads and none with TMA. The tuner keeps them
# only where they are faster: on the H100 (2026-11-25 23:17, N = 16384, D = 128) the capped TMA 128 x 64 won
# causal (2.153 ms, 0.5% ahead of 128 x 128) and the 1024 window (0.345 ms, 6% ahead) and lost elsewhere; D = 64
# unmeasured. At the cap ptxas serialises that tile's warpgroup MMAs (its note C7512: each one waited on before
# the next; kernel_resources says `wgmma serialized`); 128 x 32 tiles fit two blocks per SM without a cap (114
# registers, MMAs pipelined) but ran 11-20% slower on every benchmark pattern (H100, 2026-11-26 01:03): not here.
TUNE_CONFIGS: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = (
    (64, ((128, 128, 4, 3, 1), (128, 64, 4, 3, 1), (128, 128, 8, 3, 1), (128, 64, 4, 3, 0), (64, 64, 4, 2, 1),
          (128, 128, 4, 3, 1, 1), (64, 64, 4, 2, 1, 1), (128, 64, 8, 2, 1, 0, 128), (128, 128, 8, 2, 1, 0, 128))),
    (128, ((128, 128, 8, 3, 1), (128, 128, 8, 3, 0), (128, 128, 8, 2, 1), (128, 64, 8, 3, 1), (64, 64, 4, 2, 1),
           (128, 128, 8, 3, 1, 1), (64, 64, 4, 2, 1, 1), (128, 64, 8, 2, 1, 0, 128), (128, 64, 8, 2, 0, 0, 128))),
    (256, ((64, 64, 8, 2, 1), (128, 64, 8, 2, 1), (64, 64, 4, 2, 0))),
)


# Backward tiles: (largest padded head_dim, (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps1, stages1, warps2,
# stages2)); dK/dV run BLOCK_N1 keys against BLOCK_M1 queries with warps1/stages1, dQ BLOCK_M2 queries against
# BLOCK_N2 keys with warps2/stages2. Float32 takes the row of a head_dim twice as wide.
# Both rows from the H100 sweeps of 2026-11-25 17:10 (benchmarks/sweep_backward.py, docs/benchmarks/
# sweep_backward{,_d64}_h100.json; D = 256 unmeasured): pointer loads (token layouts, packed documents,
# selectors) with 4 warps and 2 stages took half the time of the earlier 8-warp, 3-stage tiles, though
# ptxas reports more spills for them; TMA loads serve every other pattern.
DEFAULT_BWD_CONFIGS: tuple[tuple[int, tuple[int, int, int, int, int, int, int, int]], ...] = (
    (64, (32, 64, 64, 64, 4, 2, 4, 2)),
    (128, (32, 64, 64, 64, 4, 2, 4, 2)),
    (256, (32, 32, 32, 32, 8, 2, 8, 2)),
)
DEFAULT_BWD_TMA_CONFIGS: tuple[tuple[int, tuple[int, int, int, int, int, int, int, int]], ...] = (
    (64, (32, 64, 64, 64, 4, 2, 4, 2)),
    (128, (64, 64, 64, 64, 4, 2, 4, 2)),
    (256, (32, 32, 32, 32, 8, 2, 8, 2)),
)
# What a module times on its first backward per shape (unless bwd_config is given): the dK/dV halves
# (BM1, BN1, warps1, stages1) of these rows against each other, and their dQ halves (BM2, BN2, warps2, stages2),
# besides the default row. The best of the 2026-11-25 17:10 sweep per pattern and kernel (causal preferred
# dK/dV 64 x 64, a PowerAttention run the earlier 32 x 64 with 3 stages and dQ 128 x 64).
BWD_TUNE_CONFIGS: tuple[tuple[int, tuple[tuple[int, int, int, int, int, int, int, int], ...]], ...] = (
    (64, ((32, 64, 64, 64, 4, 2, 4, 2), (64, 64, 64, 64, 4, 2, 4, 2), (32, 64, 64, 32, 4, 3, 4, 3))),
    (128, ((64, 64, 64, 64, 4, 2, 4, 2), (32, 64, 128, 64, 4, 3, 8, 2), (32, 64, 128, 128, 4, 2, 8, 2))),
    (256, ((32, 32, 32, 32, 8, 2, 8, 2),)),
)
# Added for grid neighborhoods, whose forward runs fastest with 32-key tiles (layouts v2 in perf-notes: the
# 2-D neighborhood's backward took 4x its forward with 64 x 64 tiles). Not yet measured: the tuner keeps
# them only where they are faster.
BWD_GRID_TUNE_CONFIGS: tuple[tuple[int, tuple[tuple[int, int, int, int, int, int, int, int], ...]], ...] = (
    (64, ((64, 32, 64, 32, 4, 3, 4, 3), (32, 32, 32, 32, 4, 3, 4, 3))),
    (128, ((64, 32, 64, 32, 4, 3, 4, 3), (32, 32, 32, 32, 4, 3, 4, 3))),
    (256, ((32, 32, 32, 32, 4, 2, 4, 2),)),
)
_NS_MARK = "\x00ns\x00"  # cannot occur in rendered text otherwise: doc_text and repr escape NUL


@dataclass(frozen=True)
class Compiled:
    name: str
    text: str
    sha256: str


def _select(program: ir.Program, name: str | None) -> ir.PatternDef | ir.Model:
    from .cli.common import select

    return select(program, name)


def _assign(body: ir.Body, pats: list[ir.Pattern]) -> int | tuple[int, ...]:
    """Index `body`'s patterns into `pats` (appending new ones): one int, or one per head."""

    def index(p: ir.Pattern) -> int:
        if p not in pats:
            pats.append(p)
        return pats.index(p)

    if isinstance(body, ir.Heads):
        return tuple(index(body.pattern_for(h)) for h in range(body.count))
    return index(body)


def _distinct(
    item: ir.PatternDef | ir.Model,
) -> tuple[tuple[ir.Pattern, ...], tuple[int, ...] | None, tuple[int | tuple[int, ...], ...] | None]:
    """The distinct patterns (one kernel predicate each), the per-head assignment of a pattern, and for a
    model the assignment of every layer."""
    pats: list[ir.Pattern] = []
    if isinstance(item, ir.Model):
        layers = tuple(_assign(body, pats) for body in item.schedule)
        return tuple(pats), None, layers
    got = _assign(item.body, pats)
    return tuple(pats), (got if isinstance(got, tuple) else None), None


def _index_width(preds: list[E.Expr]) -> tuple[int, bool]:
    """(MAX_N, IDX64): the largest power-of-two N whose arithmetic provably fits 32 bits (preferred
    when it reaches 2**21) or else 64 bits."""
    for limit, wide in ((INT32_MAX, False), ((1 << 63) - 1, True)):
        n = 1 << 30
        while n >= 1 and any(magnitude_bound(p, n) > limit for p in preds):
            n >>= 1
        if n >= (1 << 21) or (wide and n >= 1):
            return n, wide
    raise PatternError("the pattern's integer arithmetic does not fit 64 bits even at N = 1")


def _check_lines(p: ir.Pattern, nvar: str, depth: int = 0) -> Iterator[str]:
    """Python lines that raise ValueError when the pattern's arguments are out of range at N."""
    for value, minimum, what, _span in _constraints(p):
        if not E.free_vars(value):
            continue  # a literal: the checker already proved it
        lines, res = render_python(value, {"N": nvar})
        yield from lines
        msg = f"{what} must be at least {minimum}"
        yield f"if {res} < {safe_int(minimum)}:"
        yield f"    raise ValueError({msg!r} + f', got {{{res}}} at N = {{N}}')"
    match p:
        case ir.Neighborhood(layout) | ir.Where(_, layout) if layout is not None:
            size = safe_int(layout.size)
            msg = f"layout '{layout.name}' = grid{layout.dims} holds {layout.size} tokens"
            yield f"if {nvar} != {size}:"
            yield f"    raise ValueError({msg!r} + f' but N = {{{nvar}}}')"
        case ir.Blockwise(block, inner):
            lines, res = render_python(block, {"N": nvar})
            yield from lines
            inner_n = safe_name(f"n{depth + 1}")
            yield f"{inner_n} = ({nvar} + {res} - 1) // {res}"
            yield from _check_lines(inner, inner_n, depth + 1)
            return
    for child in ir.children(p):
        yield from _check_lines(child, nvar, depth)


def compile_source(
    source: str | Path,
    pattern: str | None = None,
    defines: Mapping[str, str | int | float] | None = None,
    *,
    path: str | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    bwd_config: tuple[int, ...] | None = None,
    layout: bool | Layout = True,
) -> Compiled:
    """Render the kernel module for one pattern of a `.pat` file (a Path, a str ending in .pat or naming a
    file, or else the file's text). Same input, byte-identical text. `layout=False` keeps every pattern in
    the plain token order (no `patterndsl.layout`), for comparisons; a `layout.Layout` forces that one
    (tests run every tile shape; a layout changes speed, never meaning)."""
    from . import loads

    if isinstance(source, Path) or ("\n" not in source and (source.endswith(".pat") or Path(source).is_file())):
        p = Path(source)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PatternError(f"{p}: {e.strerror or 'cannot read'}") from None
        path = path or str(p)
    else:
        text = source
    path = path or "<string>"
    clean_defines = {safe_name(str(k)): str(v) for k, v in sorted((defines or {}).items())}
    program = loads(text, path, clean_defines)
    item = _select(program, pattern)
    name = safe_name(item.name)
    pats, head_pattern, model_layers = _distinct(item)
    splits: list[Split | None] = [split(p, name) if ir.is_dynamic(p) else None for p in pats]
    # predicates 0..len(pats)-1: each head pattern's static part (the kernel's PAT); then, per dynamic
    # pattern, the pattern with its selector full (selected blocks) and the selector's context
    preds = [predicate(p if sp is None else sp.static) for p, sp in zip(pats, splits, strict=True)]
    selectors: list[str] = []
    for sp in splits:
        if sp is None:
            selectors.append("None")
            continue
        sel = sp.selector
        if sel.block % 16:
            raise PatternError(
                f"'{name}': a selector's block must be a multiple of 16 to compile (the kernel's smallest tile), "
                f"got {sel.block}",
                sel.span,
            )
        selectors.append(
            "("
            + ", ".join(
                (
                    repr("threshold" if isinstance(sel, ir.Threshold) else "topk"),
                    repr(float(sel.mass)) if isinstance(sel, ir.Threshold) else safe_int(sel.count),
                    safe_int(sel.block),
                    "True" if isinstance(sel, ir.TopK) and sel.given else "False",
                    safe_int(len(preds)),
                    safe_int(len(preds) + 1),
                )
            )
            + ")"
        )
        preds += [predicate(sp.selected), predicate(sp.context)]
    max_n, idx64 = _index_width(preds)
    grid_pattern = layout is not False and any(isinstance(x, ir.Neighborhood) for p in pats for x in ir.walk(p))
    configs = GRID_CONFIGS if grid_pattern else DEFAULT_CONFIGS
    explicit = any(x is not None for x in (block_m, block_n, num_warps, num_stages))
    if explicit:
        configs = tuple(
            (d, (int(block_m or c[0]), int(block_n or c[1]), int(num_warps or c[2]), int(num_stages or c[3])))
            for d, c in DEFAULT_CONFIGS
        )
    for _, cfg in configs:
        for v in cfg:
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"block sizes, warps and stages must be positive integers, got {cfg}")
        if cfg[0] < 16 or cfg[1] < 16 or cfg[0] & (cfg[0] - 1) or cfg[1] & (cfg[1] - 1):
            raise ValueError(f"BLOCK_M and BLOCK_N must be powers of two >= 16, got {cfg[0]} and {cfg[1]}")

    statics = tuple(p if sp is None else sp.static for p, sp in zip(pats, splits, strict=True))
    if isinstance(layout, Layout):
        layouts: list[Layout | None] = [layout] * len(pats)
    else:
        layouts = _layouts(statics, configs) if layout else [None] * len(pats)
    # dynamic patterns run in token order (their per-(batch, head) tables are of logical blocks); the
    # auxiliary predicates (selected part, context) never have a layout
    layouts = [None if sp is not None else lay for lay, sp in zip(layouts, splits, strict=True)]

    tri, dispatch, pyp, ivs = [], [], [], []
    try:
        for k, pred in enumerate(preds):
            lines, res = render_triton(pred, (1 << 63) - 1 if idx64 else INT32_MAX)
            tri.append(f"@triton.jit\ndef _allowed_{k}(i, j, N):\n{indent(lines + [f'return {res}'], 4)}\n")
            kw = "if" if k == 0 else "elif"
            dispatch.append(f"    {kw} PAT == {k}:\n        r = _allowed_{k}(i, j, N)")
            lines, res = render_python(pred)
            pyp.append(f"def _allowed_py_{k}(i, j, N):\n{indent(lines + [f'return {res}'], 4)}\n")
            lines, res = render_intervals(pred)
            ivs.append(f"def _truth_{k}(I, J, N):\n{indent(lines + [f'return {res}'], 4)}\n")
        layout_functions, layout_tables = _render_layouts(preds, layouts + [None] * (len(preds) - len(pats)), idx64)
    except CodegenError as e:
        raise PatternError(f"'{name}' cannot be compiled: {e}", item.span) from None
    dispatch.append("    else:\n        r = i < 0\n    return r")
    check: list[str] = []
    for pat in pats:
        check.extend(_check_lines(pat, "N"))
    check_body = (
        "    pass"
        if not check
        else "    try:\n"
        + indent(check, 8)
        + (
            "\n    except ZeroDivisionError:\n"
            "        raise ValueError(f'the pattern divides by zero at N = {N}') from None"
        )
    )

    bwd_configs, bwd_tma_configs = DEFAULT_BWD_CONFIGS, DEFAULT_BWD_TMA_CONFIGS
    if bwd_config is not None:
        bwd: tuple[int, ...] = tuple(bwd_config)
        if len(bwd) not in (6, 8) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in bwd):
            raise ValueError(
                "bwd_config must be six positive integers (BM1, BN1, BM2, BN2, warps, stages) or eight (BM1, BN1, "
                f"BM2, BN2, warps1, stages1, warps2, stages2: dK/dV's then dQ's), got {bwd}"
            )
        if any(x < 16 or x & (x - 1) for x in bwd[:4]):
            raise ValueError(f"backward block sizes must be powers of two >= 16, got {bwd[:4]}")
        if any(x & (x - 1) for x in bwd[4::2]):
            raise ValueError(f"backward warp counts must be powers of two, got {bwd[4::2]}")
        w2, s2 = (bwd[4], bwd[5]) if len(bwd) == 6 else (bwd[6], bwd[7])  # six: one warps/stages for both kernels
        full = (bwd[0], bwd[1], bwd[2], bwd[3], bwd[4], bwd[5], w2, s2)
        bwd_configs = bwd_tma_configs = tuple((d, full) for d, _ in DEFAULT_BWD_CONFIGS)

    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    defines_doc = ", ".join(f"{k}={v}" for k, v in clean_defines.items()) or "none"
    pattern_doc = ""
    for k in range(len(pats)):
        sp = splits[k]
        if sp is None:
            pattern_doc += (
                f"\nPredicate {k} ({_users(head_pattern, model_layers, k)}): allowed(i, j) = {E.to_source(preds[k])}\n"
            )
            continue
        sk = _selector_source(sp.selector)
        pattern_doc += (
            f"\nPattern {k} ({_users(head_pattern, model_layers, k)}) is dynamic: allowed(i, j) = P0(i, j) or "
            f"(S[i // {sp.block}, j // {sp.block}] and P1(i, j)), S the key blocks {sk} picks per query block\n"
            f"among those where C allows a pair.\n"
            f"  P0 = {E.to_source(preds[k])}\n  P1 = {E.to_source(preds[len(pats) + 2 * _dyn_rank(splits, k)])}\n"
            f"  C = {E.to_source(preds[len(pats) + 2 * _dyn_rank(splits, k) + 1])}\n"
        )
    fields = {
        "name": name,
        "version": __version__,
        "path": doc_text(path),
        "sha256": sha,
        "source_doc": indent(doc_text(text).rstrip("\n").split("\n"), 4),
        "compiled_doc": f"{_kind(model_layers)} '{name}', params overridden: {doc_text(defines_doc)}",
        "kind": _kind(model_layers),
        "pattern_doc": doc_text(pattern_doc),
        "name_repr": repr(name),
        "sha256_repr": repr(sha),
        "source_repr": repr(text),
        "head_pattern": "None" if head_pattern is None else "(" + ", ".join(map(safe_int, head_pattern)) + ",)",
        "pattern_count": safe_int(len(pats)),
        "max_n": safe_int(max_n),
        "idx64": "True" if idx64 else "False",
        "n_free": "(" + "".join("False, " if "N" in E.free_vars(p) else "True, " for p in preds) + ")",
        "configs": repr(tuple((int(d), tuple(int(x) for x in c)) for d, c in configs)),
        "triton_predicates": "\n\n".join(tri),
        "triton_dispatch": "\n".join(dispatch),
        "python_predicates": "\n\n".join(pyp)
        + f"\n\n_PYPRED = ({', '.join(f'_allowed_py_{k}' for k in range(len(preds)))},)",
        "interval_functions": "\n\n".join(ivs)
        + f"\n\n_TRUTH = ({', '.join(f'_truth_{k}' for k in range(len(preds)))},)",
        "check_lines": check_body,
        "model_layers": "None" if model_layers is None else _layers_literal(model_layers),
        "call_doc": _call_doc(model_layers),
        "random_rows": safe_int(RANDOM_ROWS_ENUMERATED),
        "bwd_configs": repr(tuple((int(d), tuple(int(x) for x in c)) for d, c in bwd_configs)),
        "bwd_tma_configs": repr(tuple((int(d), tuple(int(x) for x in c)) for d, c in bwd_tma_configs)),
        "op_namespace_repr": f"'patterndsl_{name}_{_NS_MARK}'",  # name: safe_name; the mark: 16 hex digits
        "layouts": repr(tuple(None if lay is None else describe(lay) for lay in layouts)),
        "layout_functions": layout_functions,
        "layout_tables": layout_tables,
        "selectors": "(" + "".join(x + ", " for x in selectors) + ")",
    }
    fields["autotune"] = "False" if explicit else "True"
    fields["bwd_autotune"] = "False" if bwd_config is not None else "True"
    grid_extra = dict(BWD_GRID_TUNE_CONFIGS) if grid_pattern else {}
    fields["bwd_tune_configs"] = repr(
        tuple(
            (int(d), tuple(tuple(int(x) for x in c) for c in (*cs, *grid_extra.get(d, ()))))
            for d, cs in BWD_TUNE_CONFIGS
        )
    )
    fields["tune_configs"] = repr(tuple((int(d), tuple(tuple(int(x) for x in c) for c in cs)) for d, cs in TUNE_CONFIGS))
    fields["kernel_id"] = "''"
    template = Template(codegen_template("attention.py.tmpl") + codegen_template("backward.py.tmpl"))
    # the autotuning cache is keyed by the module's own text (kernels and pattern), not by its file name
    fields["kernel_id"] = repr(hashlib.sha256(template.substitute(fields).encode("utf-8")).hexdigest()[:16])
    module = template.substitute(fields)
    # the custom ops' namespace: the pattern's name and a hash of the whole module text (two modules that
    # differ in anything get different ops; the same text twice shares them)
    module = module.replace(_NS_MARK, hashlib.sha256(module.encode("utf-8")).hexdigest()[:16])
    return Compiled(name, module, sha)


def _dyn_rank(splits: list[Split | None], k: int) -> int:
    return sum(1 for sp in splits[:k] if sp is not None)


def _selector_source(sel: ir.TopK | ir.Threshold) -> str:
    if isinstance(sel, ir.Threshold):
        return f"threshold({sel.mass}, block={sel.block})"
    return f"topk({sel.count}, block={sel.block}{', score=given' if sel.given else ''})"


def _layouts(pats: tuple[ir.Pattern, ...], configs: tuple[tuple[int, tuple[int, ...]], ...]) -> list[Layout | None]:
    """Each pattern's token layout, chosen for the largest tiles any config uses (its tiles hold whole
    blocks of every config: all are powers of two)."""
    bq = max(c[0] for _, c in configs)
    bk = max(c[1] for _, c in configs)
    return [choose(p, bq, bk) for p in pats]


def _render_layouts(preds: list[E.Expr], layouts: list[Layout | None], idx64: bool) -> tuple[str, str]:
    """Triton index maps (physical row -> token, row holds a token) per pattern, their dispatch, and the
    Python side: physical rows from N and the interval truth of the predicate in layout space."""
    width = (1 << 63) - 1 if idx64 else INT32_MAX
    tri: list[str] = []
    index_dispatch: list[str] = []
    valid_dispatch: list[str] = []
    rows_fns: list[str] = []
    truth_fns: list[str] = []
    for k, (pred, lay) in enumerate(zip(preds, layouts, strict=True)):
        if lay is None:
            continue
        kw = "if" if not index_dispatch else "elif"
        for fn, expr, dispatch in (
            ("_index", logical_index(lay), index_dispatch),
            ("_valid", layout_valid(lay), valid_dispatch),
        ):
            lines, res = render_triton(expr, width)
            tri.append(f"@triton.jit\ndef {fn}_{k}(i, N):\n{indent(lines + [f'return {res}'], 4)}\n")
            dispatch.append(f"    {kw} PAT == {k}:\n        r = {fn}_{k}(i, N)")
        lines, res = render_python(layout_rows(lay))
        rows_fns.append(f"def _rows_{k}(N):\n{indent(lines + [f'return {res}'], 4)}\n")
        lines, res = render_intervals(layout_predicate(pred, lay))
        truth_fns.append(f"def _ltruth_{k}(I, J, N):\n{indent(lines + [f'return {res}'], 4)}\n")
    index_dispatch.append("    else:\n        r = i\n    return r" if index_dispatch else "    return i")
    valid_dispatch.append("    else:\n        r = i < N\n    return r" if valid_dispatch else "    return i < N")
    tri.append("@triton.jit\ndef _layout_index(i, N, PAT: tl.constexpr):\n" + "\n".join(index_dispatch) + "\n")
    tri.append("@triton.jit\ndef _layout_valid(i, N, PAT: tl.constexpr):\n" + "\n".join(valid_dispatch) + "\n")
    names = [None if lay is None else k for k, lay in enumerate(layouts)]
    tables = "\n\n".join(rows_fns + truth_fns)
    tables += "\n\n_LAYOUT_ROWS = (" + "".join("None, " if k is None else f"_rows_{k}, " for k in names) + ")"
    tables += "\n_LTRUTH = (" + "".join("None, " if k is None else f"_ltruth_{k}, " for k in names) + ")"
    return "\n\n".join(tri), tables


def _users(head_pattern: tuple[int, ...] | None, layers: tuple[int | tuple[int, ...], ...] | None, k: int) -> str:
    """Which heads (or layers and heads) run predicate k, for the module's docstring."""
    if layers is not None:
        parts = []
        for n, x in enumerate(layers):
            if x == k:
                parts.append(f"{n}")
            elif isinstance(x, tuple) and k in x:
                parts.append(f"{n} (heads {', '.join(str(h) for h, p in enumerate(x) if p == k)})")
        return "layers " + ", ".join(parts)
    if head_pattern is None:
        return "heads all"
    return "heads " + ", ".join(str(h) for h, p in enumerate(head_pattern) if p == k)


def _kind(layers: object) -> str:
    return "pattern" if layers is None else "model"


def _layers_literal(layers: tuple[int | tuple[int, ...], ...]) -> str:
    def one(x: int | tuple[int, ...]) -> str:
        return safe_int(x) if isinstance(x, int) else "(" + ", ".join(map(safe_int, x)) + ",)"

    return "(" + ", ".join(one(x) for x in layers) + ",)"


def _call_doc(layers: tuple[int | tuple[int, ...], ...] | None) -> str:
    if layers is None:
        return (
            "    attention(q, k, v, *, scale=None) -> out             # [B, H, N, D], as scaled_dot_product_attention\n"
            "    attention_lse(q, k, v, *, scale=None) -> (out, lse)  # lse: [B, H, N] float32, natural log"
        )
    return (
        f"    attention(q, k, v, *, layer, scale=None) -> out      # layer in 0..{len(layers) - 1}; [B, H, N, D]\n"
        "    attention_lse(q, k, v, *, layer, scale=None) -> (out, lse)  # lse: [B, H, N] float32, natural log\n"
        "    Each layer applies its own pattern of the model's schedule (see MODEL_LAYERS)."
    )


def _nodes(e: E.Expr) -> Iterator[E.Expr]:
    yield e
    match e:
        case E.Arith(_, a, b) | E.Cmp(_, a, b):
            yield from _nodes(a)
            yield from _nodes(b)
        case E.Abs(a) | E.Not(a) | E.IsPow(a, _):
            yield from _nodes(a)
        case E.And(args) | E.Or(args):
            for a in args:
                yield from _nodes(a)
        case E.IfElse(c, t, o):
            for a in (c, t, o):
                yield from _nodes(a)


def compile(  # noqa: A001 (the verb users look for)
    source: str | Path,
    pattern: str | None = None,
    defines: Mapping[str, str | int | float] | None = None,
    **options: Any,
) -> types.ModuleType:
    """Compile a pattern and load the generated module (its `attention(q, k, v, *, scale=None)`)."""
    compiled = compile_source(source, pattern, defines, **options)
    modname = f"patterndsl_kernel_{compiled.name}_{compiled.sha256[:12]}_{hashlib.sha256(compiled.text.encode()).hexdigest()[:8]}"
    hit = sys.modules.get(modname)
    if hit is not None:
        return hit
    import importlib.util
    import tempfile

    # Triton's @jit reads the function source from a file: write the module where inspect can find it.
    folder = Path(tempfile.gettempdir()) / "patterndsl_kernels"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{modname}.py"
    if not file.exists() or file.read_text(encoding="utf-8") != compiled.text:
        # a name no other process can pick (parallel test workers compile the same pattern at once)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{modname}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(compiled.text)
        os.replace(tmp, file)
    spec = importlib.util.spec_from_file_location(modname, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module
