"""The compiler driver: a `.pat` pattern becomes a small Python module holding only what depends on it.

`compile_source(...)` returns the module's text (byte-identical for identical input): the pattern's
predicates as @triton.jit functions (`codegen.render_triton`) and as index expressions, its token layouts,
selectors, requirements and tile tables, then one call into `patterndsl.runtime`, which holds the kernels,
block tables, autotuning and autograd. `compile(...)` also loads it and returns its `runtime.Attention`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from . import __version__, ir
from . import expr as E
from .analysis.retention import pattern_reads_n
from .check import SCORE_RULES, _constraints, kernel_limits
from .codegen import INT32_MAX, CodegenError, doc_text, indent, render_triton, safe_int, safe_name
from .layout import Layout, choose, describe, layout_predicate, logical_index
from .layout import rows as layout_rows
from .layout import valid as layout_valid
from .mask import magnitude_bound
from .resources import codegen_template
from .selectors import Split, TokenSplit, split, token_split
from .semantics import predicate
from .source import PatternError

__all__ = ["Compiled", "compile", "compile_source", "DEFAULT_CONFIGS", "TUNE_CONFIGS"]

# Forward tiles per head_dim: (largest padded head_dim, (BLOCK_M, BLOCK_N, num_warps, num_stages)), the tiles a
# module launches untuned (docs/decisions.md says how each was chosen).
DEFAULT_CONFIGS: tuple[tuple[int, tuple[int, int, int, int]], ...] = (
    (64, (128, 64, 4, 3)),
    (128, (128, 64, 8, 3)),
    (256, (64, 64, 8, 2)),
)
# Grid neighborhoods run in a tiled token layout where every tile is PARTIAL: smaller tiles visit fewer
# wasted pairs (docs/decisions.md, grid-neighborhood tiles).
GRID_CONFIGS: tuple[tuple[int, tuple[int, int, int, int]], ...] = (
    (64, (64, 32, 4, 3)),
    (128, (64, 32, 4, 3)),
    (256, (64, 32, 8, 2)),
)
# The candidates autotuning times on a first call per head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA
# 0/1[, one loop 0/1[, maxnreg]]). Token-layout patterns time their default tiles too (read in place, with the
# layout_gather option off, their own kernel over those and these candidates' tiles, warps and stages);
# selectors keep the default tiles. The register cap lets two 8-warp
# blocks share an SM; the tuner keeps any candidate only where it is faster (docs/decisions.md).
TUNE_CONFIGS: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = (
    (64, ((128, 128, 4, 3, 1), (128, 64, 4, 3, 1), (128, 128, 8, 3, 1), (128, 64, 4, 3, 0), (64, 64, 4, 2, 1),
          (128, 128, 4, 3, 1, 1), (64, 64, 4, 2, 1, 1), (128, 64, 8, 2, 1, 0, 128), (128, 128, 8, 2, 1, 0, 128))),
    (128, ((128, 128, 8, 3, 1), (128, 128, 8, 3, 0), (128, 128, 8, 2, 1), (128, 64, 8, 3, 1), (64, 64, 4, 2, 1),
           (128, 128, 8, 3, 1, 1), (64, 64, 4, 2, 1, 1), (128, 64, 8, 2, 1, 0, 128), (128, 64, 8, 2, 0, 0, 128))),
    (256, ((64, 64, 8, 2, 1), (128, 64, 8, 2, 1), (64, 64, 4, 2, 0))),
)


# Backward tiles: (largest padded head_dim, (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps1, stages1, warps2,
# stages2)); dK/dV run BLOCK_N1 keys against BLOCK_M1 queries, dQ BLOCK_M2 queries against BLOCK_N2 keys.
# Float32 takes the row of a head_dim twice as wide. Pointer loads (token layouts, packed documents,
# selectors) and TMA loads (every other pattern) each have their own row (docs/decisions.md, backward tiles).
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
# What a first backward per shape times (unless bwd_config is given): the dK/dV halves of these rows against
# each other, and their dQ halves, besides the default row.
BWD_TUNE_CONFIGS: tuple[tuple[int, tuple[tuple[int, int, int, int, int, int, int, int], ...]], ...] = (
    (64, ((32, 64, 64, 64, 4, 2, 4, 2), (64, 64, 64, 64, 4, 2, 4, 2), (32, 64, 64, 32, 4, 3, 4, 3))),
    (128, ((64, 64, 64, 64, 4, 2, 4, 2), (32, 64, 128, 64, 4, 3, 8, 2), (32, 64, 128, 128, 4, 2, 8, 2))),
    (256, ((32, 32, 32, 32, 8, 2, 8, 2),)),
)
# Added for grid neighborhoods, whose forward runs fastest with 32-key tiles.
BWD_GRID_TUNE_CONFIGS: tuple[tuple[int, tuple[tuple[int, int, int, int, int, int, int, int], ...]], ...] = (
    (64, ((64, 32, 64, 32, 4, 3, 4, 3), (32, 32, 32, 32, 4, 3, 4, 3))),
    (128, ((64, 32, 64, 32, 4, 3, 4, 3), (32, 32, 32, 32, 4, 3, 4, 3))),
    (256, ((32, 32, 32, 32, 4, 2, 4, 2),)),
)


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


def _requirements(p: ir.Pattern, n: E.Expr = E.N) -> Iterator[tuple[E.Expr, int, str, bool]]:
    """(value, minimum, what, exact) the pattern needs at run time, each an expression of the call's N
    (`n`: N itself, or inside `blockwise` the number of blocks). Literal arguments the checker already
    proved are left out."""
    for value, minimum, what, _span in _constraints(p):
        if E.free_vars(value):
            yield E.substitute(value, {"N": n}), minimum, what, False
    match p:
        case ir.Neighborhood(layout) | ir.Where(_, layout) if layout is not None:
            yield n, layout.size, f"layout '{layout.name}' = {layout.describe()} holds {layout.size} tokens", True
        case ir.Blockwise(block, inner):
            b = E.substitute(block, {"N": n})
            yield from _requirements(inner, E.floordiv(E.add(n, E.sub(b, E.const(1))), b))
            return
    for child in ir.children(p):
        yield from _requirements(child, n)


def source_path(source: str | Path) -> Path | None:
    """The `.pat` file `compile` reads for `source`, or None when `source` is the file's text."""
    if isinstance(source, Path) or ("\n" not in source and (source.endswith(".pat") or Path(source).is_file())):
        return Path(source)
    return None


def compile_source(
    source: str | Path | ir.Program | ir.PatternDef | ir.Model | ir.Pattern,
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
    standalone: bool = False,
) -> Compiled:
    """Render the module for one pattern of a `.pat` file (a Path, a str ending in .pat or naming a file,
    or else the file's text). Same input, byte-identical text; the source's path appears in one comment
    only. `layout=False` keeps every pattern in the plain token order, for comparisons; a `layout.Layout`
    forces that one (tests run every tile shape; a layout changes speed, never meaning). `standalone`: the
    module imports the runtime from a package beside it (`patc compile --standalone`)."""
    from . import loads

    checked: ir.PatternDef | ir.Model | None = None
    if isinstance(source, ir.Program):
        checked = _select(source, pattern)
        text, path = f"# {checked.name}: a checked program from {source.path}\n", path or source.path
    elif isinstance(source, ir.PatternDef | ir.Model):
        checked, text = source, f"# {source.name}: a checked pattern\n"
    elif not isinstance(source, str | Path):
        if not ir.is_pattern(source):
            raise TypeError(f"compile takes a .pat path or text, a Program or a pattern, got {type(source).__name__}")
        checked = ir.PatternDef(pattern or "pattern", source)
        text = f"# {checked.name}: built in Python, allowed(i, j) = {E.to_source(predicate(source)) if not ir.is_dynamic(source) else 'dynamic'}\n"
    elif (p := source_path(source)) is not None:
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PatternError(f"{p}: {e.strerror or 'cannot read'}") from None
        path = path or str(p)
    else:
        text = str(source)
    path = path or "<string>"
    clean_defines = {safe_name(str(k)): str(v) for k, v in sorted((defines or {}).items())}
    item = checked if checked is not None else _select(loads(text, path, clean_defines), pattern)
    kernel_limits(item)  # what a kernel cannot do, pointed at in the source (the checker's one copy)
    name = safe_name(item.name)
    pats, head_pattern, model_layers = _distinct(item)
    tsplits = [token_split(p) if ir.token_selectors(p) else None for p in pats]
    splits: list[Split | None] = [
        split(p, name) if ir.is_dynamic(p) and ts is None else None for p, ts in zip(pats, tsplits, strict=True)
    ]
    # predicates 0..len(pats)-1: each head pattern's static part; then, per dynamic pattern, its distinct
    # selection cases P_v (the pattern where the selectors in v are full) and each selector's context
    preds = [
        predicate(ts.static if ts is not None else p if sp is None else sp.static)
        for p, sp, ts in zip(pats, splits, tsplits, strict=True)
    ]
    selectors: list[str] = []
    cases: list[tuple[list[int], list[int], list[int]]] = []  # per dynamic pattern: variants, distinct, contexts
    for sp in splits:
        if sp is None:
            selectors.append("None")
            continue
        first: dict[E.Expr, int] = {}  # a case that allows nothing (E.FALSE) has no tiles: index -1
        variants = [-1 if e == E.FALSE else first.setdefault(e, len(preds) + len(first)) for e in map(predicate, sp.variants)]
        preds += list(first)
        contexts = list(range(len(preds), len(preds) + len(sp.contexts)))
        preds += [predicate(c) for c in sp.contexts]
        distinct = list(first.values())
        cases.append((variants, distinct, contexts))
        # the kernel's predicate for selected tiles: the one case, or a dispatch on the case's rank
        selected = distinct[0] if distinct else len(selectors)
        dispatch = f"selected_{len(cases) - 1}" if len(distinct) > 1 else "None"
        entries = [
            _selector_entry(s, selected if m == 0 else -1, c)
            for m, (s, c) in enumerate(zip(sp.selectors, contexts, strict=True))
        ]
        if len(entries) == 1 and variants[0] >= 0:
            selectors.append(entries[0] + ")")
        else:
            more = "".join(e + "), " for e in entries[1:])
            cases_text = "".join(f"{safe_int(v)}, " for v in variants)
            selectors.append(f"{entries[0]}, more=({more}), variants=({cases_text}), dispatch={dispatch})")
    tokens, token_docs, token_cases = _token_entries(tsplits, preds)
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

    statics = tuple(
        ts.static if ts is not None else p if sp is None else sp.static
        for p, sp, ts in zip(pats, splits, tsplits, strict=True)
    )
    if isinstance(layout, Layout):
        layouts: list[Layout | None] = [layout] * len(pats)
    else:
        layouts = _layouts(statics, configs) if layout else [None] * len(pats)
    # dynamic patterns run in token order (their per-(batch, head) tables are of logical blocks)
    layouts = [None if sp is not None or ts is not None else lay for lay, sp, ts in zip(layouts, splits, tsplits, strict=True)]

    width = (1 << 63) - 1 if idx64 else INT32_MAX
    functions: list[str] = []
    try:
        for k, pred in enumerate(preds):
            lines, res = render_triton(pred, width)
            functions.append(f"@triton.jit\ndef allowed_{k}(i, j, N):\n{indent(lines + [f'return {res}'], 4)}\n")
        layout_entries = []
        for k, lay in enumerate(layouts):
            if lay is None:
                layout_entries.append("None")
                continue
            lines_i, res_i = render_triton(logical_index(lay), width)
            lines_v, res_v = render_triton(layout_valid(lay), width)
            # validity in a second SSA namespace, emitted before the index: the template kernels' order, which
            # ptxas allocates fewer registers for in the layout forward (docs/decisions.md, layout order)
            both = [_rename_ssa(line) for line in lines_v] + lines_i
            functions.append(
                f"@triton.jit\ndef layout_{k}(i, N):\n{indent(both + [f'return {res_i}, {_rename_ssa(res_v)}'], 4)}\n"
            )
            layout_entries.append(
                f"TokenLayout({describe(lay)!r}, {expr_source(layout_rows(lay))}, "
                f"{expr_source(layout_predicate(preds[k], lay))}, layout_{k})"
            )
    except CodegenError as e:
        raise PatternError(f"'{name}' cannot be compiled: {e}", item.span) from None
    requirements = [
        f"Requirement({expr_source(v)}, {safe_int(m)}, {what!r}{', True' if exact else ''})"
        for pat in pats
        for v, m, what, exact in dict.fromkeys(_requirements(pat))
    ]

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
        if tsplits[k] is not None:
            pattern_doc += f"\nPattern {k} ({_users(head_pattern, model_layers, k)}) is dynamic: " + token_docs[k]
            continue
        if sp is None:
            pattern_doc += (
                f"\nPredicate {k} ({_users(head_pattern, model_layers, k)}): allowed(i, j) = {E.to_source(preds[k])}\n"
            )
            continue
        variants, distinct, contexts = cases[_dyn_rank(splits, k)]
        if len(sp.selectors) == 1:
            pattern_doc += (
                f"\nPattern {k} ({_users(head_pattern, model_layers, k)}) is dynamic: allowed(i, j) = P0(i, j) or "
                f"(S[i // {sp.block}, j // {sp.key_block}] and P1(i, j)), S the key blocks {_selector_source(sp.selector)} "
                f"picks per query block\namong those where C allows a pair.\n"
                f"  P0 = {E.to_source(preds[k])}\n  P1 = {E.to_source(preds[variants[0]]) if variants[0] >= 0 else 'false'}\n"
                f"  C = {E.to_source(preds[contexts[0]])}\n"
            )
            continue
        pattern_doc += (
            f"\nPattern {k} ({_users(head_pattern, model_layers, k)}) is dynamic: allowed(i, j) = P_v(i, j), v the set "
            f"of selectors S1 .. S{len(sp.selectors)} that picked block (i // {sp.block}, j // {sp.key_block}), each among "
            f"the key blocks where its context Cm allows a pair.\n  P_0 = {E.to_source(preds[k])}\n"
        )
        for m, (sel, c) in enumerate(zip(sp.selectors, contexts, strict=True)):
            pattern_doc += f"  S{m + 1} = {_selector_source(sel)}, C{m + 1} = {E.to_source(preds[c])}\n"
        for v, d in enumerate(variants, 1):
            case = E.to_source(preds[d]) if d >= 0 else "false"
            pattern_doc += f"  P_{{{', '.join(f'S{m + 1}' for m in range(len(sp.selectors)) if v >> m & 1)}}} = {case}\n"
    if isinstance(item, ir.PatternDef) and item.permute:
        pattern_doc += (
            f"\nEach call passes `permutation=`, a permutation of every segment of {item.permute.segment} tokens; "
            "i and j above are\npositions in the permuted order, and outputs come back in the caller's order.\n"
        )
    for c, (_, distinct, _) in enumerate(cases):
        if len(distinct) > 1:  # the kernels' predicate for a selected tile, by the rank of its case
            calls = f"allowed_{distinct[-1]}(i, j, N)"
            for d in range(len(distinct) - 2, -1, -1):
                calls = f"tl.where(var == {d}, allowed_{distinct[d]}(i, j, N), {calls})"
            functions.append(f"@triton.jit\ndef selected_{c}(i, j, N, var):\n    return {calls}\n")
    for k, idx in enumerate(token_cases):
        if idx:  # the kernels' predicate per pair: P_v, v = [j in V] + 2 [i - j in S]
            calls = _case_call(idx[3])
            for v in (2, 1, 0):
                calls = f"tl.where(var == {v}, {_case_call(idx[v])}, {calls})"
            functions.append(f"@triton.jit\ndef tokens_{k}(i, j, N, var):\n    return {calls}\n")
    body = "\n\n".join(functions)
    helpers = sorted({h for h in ("fdiv", "fmod", "rdraw", "rkey") if re.search(rf"\b{h}\(", body)})
    root = "._patterndsl" if standalone else "patterndsl"
    tl_note = "" if "tl." in body else "  # noqa: F401 (Triton's interpreter looks for it beside a jit function)"
    imports = ["import triton", f"import triton.language as tl{tl_note}"]
    imports += ["", f"from {root} import expr as E"]  # the runtime: first-party (or relative) imports
    spec_names = ["Attention", "PatternSpec", "Predicate"]
    if any(lay is not None for lay in layouts):
        spec_names.append("TokenLayout")
    if requirements:
        spec_names.append("Requirement")
    if any(x != "None" for x in selectors):
        spec_names.append("Selector")
    if any(x != "None" for x in tokens):
        spec_names.append("TokenSelection")
    imports.append(f"from {root}.runtime import {', '.join(sorted(spec_names))}")
    if helpers:
        imports.append(f"from {root}.runtime.index import {', '.join(helpers)}")
    grid_extra = dict(BWD_GRID_TUNE_CONFIGS) if grid_pattern else {}
    fields = {
        "name": name,
        "version": __version__,
        "runtime": "copied beside this module" if standalone else "the installed patterndsl package",
        "path": _comment_text(path),
        "sha256": sha,
        "source_doc": indent(doc_text(text).rstrip("\n").split("\n"), 4),
        "compiled_doc": f"{_kind(model_layers)} '{name}', params overridden: {doc_text(defines_doc)}",
        "kind": _kind(model_layers),
        "kind_repr": repr(_kind(model_layers)),
        "pattern_doc": doc_text(pattern_doc),
        "call_doc": _call_doc(model_layers),
        "name_repr": repr(name),
        "source_repr": repr(text),
        "imports": "\n".join(imports),
        "predicates": body.rstrip("\n"),
        "predicate_list": "\n".join(f"        Predicate({expr_source(p)}, allowed_{k})," for k, p in enumerate(preds)),
        "pattern_count": safe_int(len(pats)),
        "head_pattern": "None" if head_pattern is None else "(" + ", ".join(map(safe_int, head_pattern)) + ",)",
        "model_layers": "None" if model_layers is None else _layers_literal(model_layers),
        "layouts": "(" + "".join(x + ", " for x in layout_entries) + ")",
        "selectors": "(" + "".join(x + ", " for x in selectors) + ")",
        "requirements": "(" + "".join(x + ", " for x in requirements) + ")",
        "decode": repr(tuple(pattern_reads_n(p) for p in pats)),
        "max_n": safe_int(max_n),
        "idx64": "True" if idx64 else "False",
        "configs": _table(configs),
        "tune_configs": repr(tuple((int(d), tuple(tuple(int(x) for x in c) for c in cs)) for d, cs in TUNE_CONFIGS)),
        "bwd_configs": _table(bwd_configs),
        "bwd_tma_configs": _table(bwd_tma_configs),
        "bwd_tune_configs": repr(
            tuple(
                (int(d), tuple(tuple(int(x) for x in c) for c in (*cs, *grid_extra.get(d, ()))))
                for d, cs in BWD_TUNE_CONFIGS
            )
        ),
        "autotune": "False" if explicit else "True",
        "bwd_autotune": "False" if bwd_config is not None else "True",
        "key_repr": repr(_KEY_MARK),
        "permute": safe_int(item.permute.segment) if isinstance(item, ir.PatternDef) and item.permute else "None",
        "tokens": "(" + "".join(x + ", " for x in tokens) + ")" if any(x != "None" for x in tokens) else "()",
    }
    module = Template(codegen_template("module.py.tmpl")).substitute(fields)
    # the key names the pattern in caches and the autotuning file: a hash of the module's text without its
    # path comment, so it does not depend on where the source was compiled from
    keyed = re.sub(r"(?m)^# compiled from: .*$", "", module)
    key = f"{name}-{hashlib.sha256(keyed.encode('utf-8')).hexdigest()[:16]}"
    module = module.replace(repr(_KEY_MARK), repr(key), 1)
    return Compiled(name, module, sha)


_KEY_MARK = "\x00key\x00"  # cannot occur in rendered text otherwise: repr escapes NUL


def _rename_ssa(line: str) -> str:
    """A layout's valid-row function reuses the SSA names `tK`: rename them `uK` (index lines keep `tK`)."""
    return re.sub(r"\bt(\d+)\b", r"u\1", line)


def _comment_text(path: str) -> str:
    """The source path on one comment line: control characters escaped."""
    return path.encode("unicode_escape").decode("ascii")


def _table(configs: tuple[tuple[int, tuple[int, ...]], ...]) -> str:
    return repr(tuple((int(d), tuple(int(x) for x in c)) for d, c in configs))


def expr_source(e: E.Expr) -> str:
    """An index expression as Python source that rebuilds it (`E.Cmp('<=', E.Var('j'), E.Var('i'))`): only
    integers, booleans, and the fixed operator and variable names enter."""
    match e:
        case E.Const(v) if isinstance(v, bool):
            return f"E.Const({v})"
        case E.Const(v):
            return f"E.Const({safe_int(v)})"
        case E.Var(name):
            return f"E.Var({_choice(name, ('i', 'j', 'N'))!r})"
        case E.Arith(op, a, b):
            ops = ("+", "-", "*", "//", "%", "**", "min", "max")
            return f"E.Arith({_choice(op, ops)!r}, {expr_source(a)}, {expr_source(b)})"
        case E.Abs(a):
            return f"E.Abs({expr_source(a)})"
        case E.Log2(a):
            return f"E.Log2({expr_source(a)})"
        case E.Cmp(op, a, b):
            return f"E.Cmp({_choice(op, ('==', '!=', '<', '<=', '>', '>='))!r}, {expr_source(a)}, {expr_source(b)})"
        case E.And(args):
            return f"E.And(({''.join(expr_source(a) + ', ' for a in args)}))"
        case E.Or(args):
            return f"E.Or(({''.join(expr_source(a) + ', ' for a in args)}))"
        case E.Not(a):
            return f"E.Not({expr_source(a)})"
        case E.IfElse(c, t, o):
            return f"E.IfElse({expr_source(c)}, {expr_source(t)}, {expr_source(o)})"
        case E.IsPow(a, base):
            return f"E.IsPow({expr_source(a)}, {safe_int(base)})"
        case E.RandomMember(row, col, n, r, seed):
            parts = ", ".join(expr_source(x) for x in (row, col, n, r))
            return f"E.RandomMember({parts}, {safe_int(seed)})"
    raise CodegenError(f"cannot render {e!r}")


def _choice(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise CodegenError(f"unexpected name {value!r}")
    return value


def _dyn_rank(splits: list[Split | None], k: int) -> int:
    return sum(1 for sp in splits[:k] if sp is not None)


def _token_entries(tsplits: list[TokenSplit | None],
                   preds: list[E.Expr]) -> tuple[list[str], list[str], list[list[int]]]:
    """Each pattern's `TokenSelection(...)` text ("None" without vertical/slash), docstring lines and case
    predicates; the cases P_1 .. P_3 and the two contexts are appended to `preds` (P_0 is the pattern's own
    predicate)."""
    entries: list[str] = []
    docs: list[str] = []
    cases: list[list[int]] = []
    for k, ts in enumerate(tsplits):
        if ts is None:
            entries.append("None")
            docs.append("")
            cases.append([])
            continue
        idx = [k]
        for case in ts.cases[1:]:
            e = predicate(case)
            idx.append(-1 if e == E.FALSE else len(preds))
            if e != E.FALSE:
                preds.append(e)
        ctx = [len(preds), len(preds) + 1]
        preds += [predicate(c) for c in ts.contexts]
        v, sl = ts.vertical, ts.slash
        entries.append(
            f"TokenSelection({safe_int(v.count if v else 0)}, {safe_int(sl.count if sl else 0)}, "
            f"{safe_int(v.last if v else 1)}, {safe_int(sl.last if sl else 1)}, "
            f"({', '.join(map(safe_int, idx))}), ({safe_int(ctx[0])}, {safe_int(ctx[1])}), tokens_{safe_int(k)})"
        )
        names = [f"V = vertical({v.count}, last={v.last}) among C_V" if v else "V empty",
                 f"S = slash({sl.count}, last={sl.last}) among C_S" if sl else "S empty"]
        text = f"allowed(i, j) = P_v(i, j), v = [j in V] + 2 [i - j in S]; {'; '.join(names)}.\n"
        for m in range(4):
            text += f"  P_{m} = {E.to_source(preds[idx[m]]) if idx[m] >= 0 else 'false'}\n"
        text += f"  C_V = {E.to_source(preds[ctx[0]])}\n  C_S = {E.to_source(preds[ctx[1]])}\n"
        docs.append(text)
        cases.append(idx)
    return entries, docs, cases


def _case_call(index: int) -> str:
    return "(i < 0) & (i >= 0)" if index < 0 else f"allowed_{index}(i, j, N)"


def _selector_entry(sel: ir.TopK | ir.Threshold, selected: int, context: int) -> str:
    """`Selector(kind, param, block, given, selected, context` of the generated module (left open)."""
    match sel:
        case ir.Threshold(mass):
            kind, param = "threshold", repr(float(mass))
        case ir.TopK(_, _, _, _, fraction) if fraction is not None:
            kind, param = "fraction", repr(float(fraction))
        case ir.TopK(count):
            kind, param = "topk", safe_int(count) if isinstance(count, int) else expr_source(count)
    given = isinstance(sel, ir.TopK) and sel.given
    extra = ""
    if isinstance(sel, ir.TopK) and sel.score != "mean":
        extra += f", score={_choice(sel.score, SCORE_RULES)!r}"
    if isinstance(sel, ir.TopK) and sel.share:
        extra += ", share=True"
    if sel.key_block is not None:
        extra += f", key_block={safe_int(sel.key_block)}"
    return f"Selector({kind!r}, {param}, {safe_int(sel.block)}, {given}, {safe_int(selected)}, {safe_int(context)}{extra}"


def _selector_source(sel: ir.TopK | ir.Threshold) -> str:
    if isinstance(sel, ir.Threshold):
        return f"threshold({sel.mass}, block={_block_text(sel)})"
    count = sel.fraction if sel.fraction is not None else sel.count if isinstance(sel.count, int) else E.to_source(sel.count)
    rule = ", score=given" if sel.given else f", score={sel.score}" if sel.score != "mean" else ""
    return f"topk({count}, block={_block_text(sel)}{rule}{', share=kv' if sel.share else ''})"


def _block_text(sel: ir.TopK | ir.Threshold) -> str:
    return f"{sel.block}" if sel.key_block is None else f"({sel.block}, {sel.key_block})"


def _layouts(pats: tuple[ir.Pattern, ...], configs: tuple[tuple[int, tuple[int, ...]], ...]) -> list[Layout | None]:
    """Each pattern's token layout, chosen for the largest tiles any config uses (its tiles hold whole
    blocks of every config: all are powers of two)."""
    bq = max(c[0] for _, c in configs)
    bk = max(c[1] for _, c in configs)
    return [choose(p, bq, bk) for p in pats]


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


def compile(  # noqa: A001 (the verb users look for)
    source: str | Path | ir.Program | ir.Pattern,
    pattern: str | None = None,
    defines: Mapping[str, str | int | float] | None = None,
    **options: Any,
) -> Any:
    """Compile a pattern and load it: a `patterndsl.runtime.Attention`, callable as `attn(q, k, v)`.

    `source`: a `.pat` file (path), its text, a checked `ir.Program` (`patterndsl.load`) or one pattern
    expression (`patterndsl.pattern("causal & window(3)")`)."""
    return load_module(compile_source(source, pattern, defines, **options)).ATTENTION


# What a standalone module carries of patterndsl: the runtime and the two modules it reads expressions with.
STANDALONE_FILES = ("expr.py", "intervals.py", "tiling.py", "runtime/*.py")
_STANDALONE_INIT = '''"""The parts of patterndsl a standalone module needs (copied by `patc compile --standalone`)."""
'''


def standalone_files() -> dict[str, bytes]:
    """Relative path -> content of the package `_patterndsl/` that a standalone module imports: the runtime's
    own files, copied unchanged (their relative imports hold there too), and a minimal `__init__.py`."""
    root = Path(__file__).resolve().parent
    out = {"__init__.py": _STANDALONE_INIT.encode("utf-8")}
    for pattern in STANDALONE_FILES:
        for file in sorted(root.glob(pattern)):
            out[file.relative_to(root).as_posix()] = file.read_bytes()
    return out


def write_standalone(compiled: Compiled, folder: Path) -> None:
    """Write a standalone package: `folder/__init__.py` (the module, compiled with standalone=True) and
    `folder/_patterndsl/` (`standalone_files`). Built beside `folder` and moved into place, so an interrupted
    write leaves the old folder whole."""
    if "from ._patterndsl." not in compiled.text:
        raise ValueError("write_standalone needs a module compiled with standalone=True")
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "__init__.py").write_text(compiled.text, encoding="utf-8")
        for rel, data in standalone_files().items():
            target = tmp / "_patterndsl" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_module(compiled: Compiled) -> Any:
    """Import a generated module's text. Triton's @jit reads a function's source from its file, so the text
    is written (atomically, once per content) to a cache folder and imported from there."""
    digest = hashlib.sha256(compiled.text.encode("utf-8")).hexdigest()[:16]
    modname = f"patterndsl_kernel_{compiled.name}_{digest}"
    hit = sys.modules.get(modname)
    if hit is not None:
        return hit
    import importlib.util

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
