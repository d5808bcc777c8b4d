"""The whole analysis of one pattern or model at one N: every figure `patc analyze` shows, as plain data.

`analyze` returns a JSON-ready dict (what `--json` prints); `report.py` only formats it. Figures per
distinct pattern (a `heads` body and a `model` hold several), totals over heads and layers, the
receptive field through depth, and warnings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import expr as E
from .. import ir
from ..selectors import Split, TokenSplit, split, static_part, token_split
from ..source import PatternError
from ..tiling import block_form
from . import cost as C
from .bound import Bound, Value, jsonable, make, ratio, upper
from .count import bound_predicate
from .decode_cost import decode_figures
from .figures import block_rows, exact_pairs, row_figures, tile_figures
from .limits import ARRAY_LIMIT, ARRAY_WORK, Budget, OverBudget
from .reach import receptive_field
from .symbolic import Closed, nnz
from .tiles import per_block

LOW_EFFICIENCY = 0.5


@dataclass(frozen=True, slots=True)
class Options:
    n: int
    heads: int | None = None
    head_dim: int = 128
    batch: int = 1
    block_q: int = 128
    block_k: int = 128
    layers: int | None = None
    selected: int | None = None  # blocks a dynamic selector keeps per query block (default: topk's n)
    decode: tuple[int, ...] = ()  # context lengths for the decode-step and cache figures (--decode)
    kv_bytes: int = 2  # bytes per cached key or value element (--kv-dtype)


@dataclass
class _Use:
    pattern: ir.Pattern
    heads: int = 0  # head-layers that run it
    layers: list[int] | None = None
    head_ranges: list[str] | None = None


def _uses(item: ir.PatternDef | ir.Model, heads: int) -> list[_Use]:
    schedule = item.schedule if isinstance(item, ir.Model) else (item.body,)
    out: dict[ir.Pattern, _Use] = {}
    for layer, body in enumerate(schedule):
        if isinstance(body, ir.Heads):
            parts = [(r.pattern, r.stop - r.start, f"{r.start}:{r.stop}") for r in body.ranges]
        else:
            parts = [(body, heads, "")]
        for p, count, label in parts:
            use = out.setdefault(p, _Use(p, 0, [], []))
            use.heads += count
            assert use.layers is not None and use.head_ranges is not None
            if not use.layers or use.layers[-1] != layer:  # layers come in order: no search of the list
                use.layers.append(layer)
            if label and label not in use.head_ranges:
                use.head_ranges.append(label)
    return list(out.values())


def _head_count(item: ir.PatternDef | ir.Model, asked: int | None) -> int:
    schedule = item.schedule if isinstance(item, ir.Model) else (item.body,)
    counts = {b.count for b in schedule if isinstance(b, ir.Heads)}
    if len(counts) > 1:
        raise PatternError(f"'{item.name}' has heads blocks of different sizes: {sorted(counts)}")
    if counts:
        (count,) = counts
        if asked is not None and asked != count:
            raise PatternError(
                f"'{item.name}' defines {count} heads, but --heads {asked} was given", None, f"use --heads {count}"
            )
        return count
    return asked or 1


WIDEN_CHECKS = 4096  # exact counts below the derived range that may widen a closed form's range


def _symbolic(p: ir.Pattern, n: int) -> tuple[dict[str, Any], int | None]:
    """The closed form nnz(N) with the range where it holds, and its value at n when n is in it."""
    s = nnz(p)
    if not isinstance(s, Closed):
        return {"closed_form": None, "reason": s.reason, "text": s.text()}, None
    # The derivation proves the formula from valid_from on; below it, check exactly and widen the range.
    holds_from = s.valid_from
    step = 1
    if s.condition.startswith("N a multiple of"):
        step = int(s.condition.split()[-1])
    elif s.condition.startswith("N fixed"):
        step = 0
    checks = 0
    while step and holds_from - step >= 1 and checks < WIDEN_CHECKS and _matches(s, holds_from - step, p):
        holds_from -= step
        checks += 1
    cond = f"N >= {holds_from}" + (f", {s.condition}" if s.condition else "")
    if s.condition.startswith("N fixed"):
        cond = s.condition
    import sympy  # type: ignore[import-untyped]

    at_n = None
    if s.condition.startswith("N fixed") or (n >= holds_from and (step <= 1 or n % step == 0)):
        at_n = s.at(n)
    return {
        "closed_form": sympy.sstr(s.expr),
        "holds": cond,
        "holds_from": holds_from,
        "derived_from": s.valid_from,
        "derivation": s.derivation,
        "text": f"{sympy.sstr(s.expr)}  ({cond})",
    }, at_n


def _matches(s: Closed, m: int, p: ir.Pattern) -> bool:
    if not _fits(p, m):
        return False
    try:
        return bool(s.at(m) == exact_pairs(p, m))
    except (TypeError, ValueError, ZeroDivisionError):  # the formula is undefined there (log of 0)
        return False


def _pattern_text(p: ir.Pattern) -> str:
    """A readable one-line rendering of a checked pattern (params already folded in)."""
    return _text(p, 0)


_PREC = {"|": 1, "&": 2, "-": 3, "~": 4}


def _text(p: ir.Pattern, outer: int) -> str:
    def arg(e: E.Expr) -> str:
        return E.to_source(e)

    def tokens(t: ir.TokenSet) -> str:
        if isinstance(t, ir.TokenList):
            return "[" + ", ".join(arg(x) for x in t.items) + "]"
        a = "" if t.start is None else arg(t.start)
        b = "" if t.stop is None else arg(t.stop)
        step = "" if t.step == E.Const(1) else f":{arg(t.step)}"
        return f"{a}:{b}{step}"

    def op(sym: str, a: ir.Pattern, b: ir.Pattern) -> str:
        text = f"{_text(a, _PREC[sym])} {sym} {_text(b, _PREC[sym] + 1)}"
        return f"({text})" if _PREC[sym] < outer else text

    match p:
        case ir.Full():
            return "full"
        case ir.Empty():
            return "none"
        case ir.Causal():
            return "causal"
        case ir.Window(before, after, dilation):
            inner = arg(before) if before == after else f"{arg(before)}, {arg(after)}"
            return f"window({inner}" + ("" if dilation == E.Const(1) else f", dilation={arg(dilation)}") + ")"
        case ir.Stride(step):
            return f"stride({arg(step)})"
        case ir.Sink(count):
            return f"sink({arg(count)})"
        case ir.Global(t):
            return f"global({tokens(t)})"
        case ir.Rows(t):
            return f"rows({tokens(t)})"
        case ir.Cols(t):
            return f"cols({tokens(t)})"
        case ir.Hops(base):
            return f"hops({base})"
        case ir.Random(count, seed):
            return f"random({arg(count)}, seed={seed})"
        case ir.Neighborhood(layout, kernel, dilation, stride, causal):
            extra = "" if set(dilation) == {1} else f", dilation={dilation}"
            extra += "" if set(stride) == {1} else f", stride={stride}"
            extra += "" if not any(causal) else f", causal={causal}"
            return f"neighborhood({layout.name}, kernel={kernel}{extra})"
        case ir.Where(cond):
            return f"where({arg(cond)})"
        case ir.Blockwise(block, inner):
            return f"blockwise({arg(block)}, {_text(inner, 0)})"
        case ir.TopK(count, block, given, _, fraction, score, share, sel_kb):
            n = fraction if fraction is not None else arg(count) if not isinstance(count, int) else count
            rule = ", score=given" if given else f", score={score}" if score != "mean" else ""
            size = block if sel_kb is None else f"({block}, {sel_kb})"
            return f"topk({n}, block={size}{rule}{', share=kv' if share else ''})"
        case ir.Vertical(count, last) | ir.Slash(count, last):
            return f"{type(p).__name__.lower()}({count}{'' if last == 64 else f', last={last}'})"
        case ir.Threshold(mass, block, _, sel_kb):
            return f"threshold({mass}, block={block if sel_kb is None else (block, sel_kb)})"
        case ir.Union(a, b):
            return op("|", a, b)
        case ir.Inter(a, b):
            return op("&", a, b)
        case ir.Complement(a):
            return f"~{_text(a, _PREC['~'])}"
    return type(p).__name__


def _reach_closed_form(p: ir.Pattern, n: int) -> str | None:
    causal = False
    core = p
    match p:
        case ir.Inter(ir.Causal(), x) | ir.Inter(x, ir.Causal()):
            causal, core = True, x
    match core:
        case ir.Window(before, after, dilation):
            try:
                a, b, d = (int(x.value) for x in (before, after, dilation))  # type: ignore[union-attr]
            except AttributeError:
                return None
            if causal:
                b = 0
            if d > 1:
                return f"window dilated by {d}: only offsets that are multiples of {d}, so never full (L*{a * d} back)"
            need = max(
                math.ceil((n - 1) / a) if a else math.inf, 0 if causal else (math.ceil((n - 1) / b) if b else math.inf)
            )
            shown = "never" if need == math.inf else str(int(need))
            return (
                f"window: L layers reach L*{a} back"
                + ("" if causal else f", L*{b} forward")
                + f"; full at depth ceil((N-1)/r) = {shown}"
            )
        case ir.Hops(base):
            return f"hops base {base}: about log_{base} N = {math.log(n, base):.1f} layers"
    return None


def analyze(item: ir.PatternDef | ir.Model, opts: Options) -> dict[str, Any]:
    """Every figure of `patc analyze` for a pattern or model at N = opts.n."""
    n = opts.n
    heads = _head_count(item, opts.heads)
    uses = _uses(item, heads)
    is_model = isinstance(item, ir.Model)
    entries: list[dict[str, Any]] = []
    warnings: list[str] = []
    totals: dict[str, Value] = {}
    causal_flags: list[bool] = []
    for use in uses:
        p = use.pattern
        tokens = token_split(p) if ir.token_selectors(p) else None
        sp = split(p, item.name) if ir.is_dynamic(p) and tokens is None else None
        p = static_part(p)  # a dynamic pattern's figures: its static part, plus "selector"
        nnz_figures, closed_pairs = _symbolic(p, n)
        fig = row_figures(p, n, closed_pairs)
        pred = bound_predicate(p, n)
        tiles = tile_figures(pred, n, opts.block_q, opts.block_k)
        c = C.cost_of(
            fig.pairs, tiles.visited, tiles.full, tiles.partial, n, use.heads, opts.head_dim, opts.batch,
            opts.block_q, opts.block_k,
        )  # fmt: skip
        rows = fig.rows
        causal_flags.append(rows["sees_future"] is False)
        label = _pattern_text(use.pattern)
        where = []
        if is_model and use.layers is not None:
            where.append(f"layers {_ranges(use.layers)}")
        if use.head_ranges:
            where.append(f"heads {', '.join(use.head_ranges)}")
        entry: dict[str, Any] = {
            "pattern": label,
            "used_by": "; ".join(where) or item.name,
            "head_layers": use.heads,
            "pairs": fig.pairs,
            "density": ratio(fig.pairs, n * n),
            "count_method": fig.method,
            "nnz": nnz_figures,
            "rows": rows,
            "blocks": {
                "full": tiles.full,
                "partial": tiles.partial,
                "classified_by": tiles.source,
            },
            "cost": c.as_dict(),
            "layout": _layout_figures(p, pred, n, fig.pairs, c, opts),
            "decode": decode_figures(use.pattern, opts.decode, opts.head_dim, opts.kv_bytes, opts.block_k),
        }
        if not (fig.exact and tiles.exact):
            entry["bounded"] = _bounded_note(fig.exact, tiles.exact, n)
            warnings.append(f"{entry['used_by']}: {entry['bounded']}")
        if tokens is not None:
            entry["selector"] = _token_selector_cost(tokens, n, use.heads, opts, c.fwd_flops)
        if sp is not None:
            entry["selector"] = _selector_cost(sp, n, use.heads, opts, c.fwd_flops)
            for key in ("extra_fwd_flops_max", "scoring_flops"):
                totals[key] = totals.get(key, 0) + entry["selector"][key]
        entries.append(entry)
        for k, v in c.as_dict().items():
            if k in ("pairs", "visited_blocks", "full_blocks", "partial_blocks"):
                v = use.heads * v  # per head and batch element; FLOPs and bytes already count every head
            if k not in ("tile_efficiency", "arithmetic_intensity"):
                totals[k] = totals.get(k, 0) + v
        empty = rows["empty_rows"]
        if sp is not None:
            warnings.append(
                f"{entry['used_by']}: {' and '.join(map(_pattern_text, sp.selectors))} pick"
                f"{'s' if len(sp.selectors) == 1 else ''} blocks from the data: the figures and the "
                f"receptive field are the static part's; the selector's rows give its cost at K blocks per query block"
            )
        elif isinstance(empty, int) and empty:
            warnings.append(
                f"{entry['used_by']}: {empty} quer{'y has' if empty == 1 else 'ies have'} no key "
                f"(first: row {rows['first_empty_row']}); they output zeros with log-sum-exp -inf"
            )
        elif isinstance(empty, Bound) and empty.lo:
            warnings.append(
                f"{entry['used_by']}: at least {empty.lo} queries have no key; they output zeros with log-sum-exp -inf"
            )
        if upper(c.tile_efficiency) < LOW_EFFICIENCY:
            warnings.append(_efficiency_warning(entry, p, pred, n, fig.pairs, c, opts))
        if rows["sees_future"] and "causal" in item.name.lower():
            warnings.append(
                f"{entry['used_by']}: lets query {_text_of(rows['first_future_row'])} see a later key, but "
                f"'{item.name}' is named causal"
            )
        if rows["sees_future"] is None:
            warnings.append(
                f"{entry['used_by']}: whether a query sees a later key is not decided at this N; "
                "the receptive field is measured against full attention"
            )
    if is_model and any(causal_flags) and not all(causal_flags):
        for e, flag in zip(entries, causal_flags, strict=True):
            if not flag:
                warnings.append(
                    f"{e['used_by']}: lets queries see the future while other layers of '{item.name}' are causal"
                )
    totals["tile_efficiency"] = ratio(
        totals.get("pairs", 0), opts.block_q * opts.block_k * totals.get("visited_blocks", 0), cap=1.0
    )
    totals["arithmetic_intensity"] = ratio(totals.get("executed_fwd_flops", 0), totals.get("fwd_bytes", 0), empty=0.0)
    all_causal = all(causal_flags)
    if is_model:
        assert isinstance(item, ir.Model)
        schedule = list(item.schedule)
        if opts.layers is not None and opts.layers != len(schedule):
            warnings.append(f"--layers {opts.layers} ignored: the model '{item.name}' has {len(schedule)} layers")
        static = {b: _static_body(b) for b in dict.fromkeys(schedule)}  # a few bodies repeated over the layers
        reach = receptive_field([static[b] for b in schedule], n, all_causal, repeat=False)
        closed = None
    else:
        assert isinstance(item, ir.PatternDef)
        body = _static_body(item.body)
        reach = receptive_field([body], n, all_causal, max_depth=None)
        closed = _reach_closed_form(body, n) if not isinstance(body, ir.Heads) else None
    rf = reach.as_dict()
    rf["closed_form"] = closed
    rf["depth_text"] = _depth_text(reach.depth, reach.depth_upper, reach.unit > 1, reach.stopped)
    if opts.layers is not None and not is_model:
        rf["coverage_at_layers"] = _at(reach.coverage, opts.layers)
        if reach.coverage_lower is not None:
            rf["coverage_lower_at_layers"] = _at(reach.coverage_lower, opts.layers)
    conventions = {
        "fwd_flops": "4 * pairs * D * H * B (2D for q.k, 2D for p.v per pair)",
        "bwd_flops": "10 * pairs * D * H * B (FlashAttention-2 with recomputation: 2.5 x forward)",
        "executed_flops": "visited tiles * BQ * BK * 4 * D * H * B (padded tiles included)",
        "fwd_bytes": "bf16: Q and O once per query row, K and V tiles once per visited tile",
        "tile_classification": "exact for patterns of conditions on q - k, q and k (lattice points of tile "
        "offsets); else interval reasoning, then PARTIAL tiles checked pair by pair within a budget",
        "totals": "pairs and tiles summed over heads and layers, per batch element; FLOPs and bytes for all",
    }
    if any("bounded" in e for e in entries):
        conventions["bounds"] = "a figure written lo..hi (JSON: lower, upper) is bounded, not exact: see the warnings"
    result: dict[str, Any] = jsonable({
        "file": None,
        "name": item.name,
        "kind": "model" if is_model else "pattern",
        "N": n,
        "heads": heads,
        "head_dim": opts.head_dim,
        "batch": opts.batch,
        "block": [opts.block_q, opts.block_k],
        "layers": len(item.schedule) if isinstance(item, ir.Model) else opts.layers,
        "conventions": conventions,
        "patterns": entries,
        "totals": totals,
        "causal": all_causal,
        "receptive_field": rf,
        "warnings": warnings,
    })  # fmt: skip
    return result


def _bounded_note(rows_exact: bool, tiles_exact: bool, n: int) -> str:
    what = " and ".join(x for x, ok in (("row figures", rows_exact), ("tile counts", tiles_exact)) if not ok)
    return (
        f"{what} are bounds at N = {n:,}: the exact figures would need O(N) work or more for this pattern "
        f"(exact up to N = {ARRAY_LIMIT:,}, or at any N for patterns of conditions on q - k, on q and on k)"
    )


def _text_of(x: Any) -> str:
    if isinstance(x, Bound):
        return f"between {x.lo} and {x.hi}"
    if isinstance(x, dict):
        return f"at or after {x['lower']}"
    return str(x)


GRID_AXIS_LIMIT = 4096  # choosing a layout builds one axis x axis mask per grid axis


def _layout_figures(p: ir.Pattern, pred: Any, n: int, pairs: Value, c: C.Cost, opts: Options) -> dict[str, Any]:
    """Tile efficiency with the token layout the compiler would choose (patterndsl.layout) and plain.

    Choosing a layout for a grid pattern measures candidate tilings with per-axis masks and tile counts
    that grow with N; past ARRAY_LIMIT (or for a grid axis past GRID_AXIS_LIMIT) the choice is not made
    and the figure says so.
    """
    from .. import layout as L

    grid = [x for x in ir.walk(p) if isinstance(x, ir.Neighborhood) or (isinstance(x, ir.Where) and x.layout)]
    axes = [d for x in grid for d in (x.layout.dims if x.layout is not None else ())]
    if grid and (n > ARRAY_LIMIT or max(axes, default=0) > GRID_AXIS_LIMIT):
        return _no_layout(c, "not evaluated: a grid pattern this large")
    lay = L.choose(p, opts.block_q, opts.block_k)
    if lay is None:
        visited: Value = c.visited
    elif n > ARRAY_LIMIT:
        return _no_layout(c, f"{L.describe(lay)} (its tile count is not evaluated past N = {ARRAY_LIMIT:,})")
    else:
        visited = L.visited_tiles(pred, lay, n, opts.block_q, opts.block_k)
    return {
        "chosen": L.describe(lay),
        "visited_blocks": visited,
        "tile_efficiency": ratio(pairs, opts.block_q * opts.block_k * visited, cap=1.0),
        "plain_tile_efficiency": c.tile_efficiency,
    }


def _no_layout(c: C.Cost, why: str) -> dict[str, Any]:
    return {"chosen": why, "visited_blocks": None, "tile_efficiency": None, "plain_tile_efficiency": c.tile_efficiency}


def _static_body(body: ir.Body) -> ir.Body:
    """The body with every dynamic pattern replaced by its static part (what holds whatever is picked)."""
    if isinstance(body, ir.Heads):
        return ir.Heads(tuple(ir.HeadRange(r.start, r.stop, _static_body(r.pattern)) for r in body.ranges))  # type: ignore[arg-type]
    return static_part(body)


def _token_selector_cost(ts: TokenSplit, n: int, heads: int, opts: Options, static_fwd: Value) -> dict[str, Any]:
    """Bounds for vertical and slash: each row gains at most n_v keys (the selected columns) and n_s (one
    per selected diagonal) beyond the static part; scoring costs a dot product per (scoring row, key) and
    selector, `last` rows each."""
    picked = [s for s in (ts.vertical, ts.slash) if s is not None]
    per_row = sum(min(s.count, n) for s in picked)
    extra = 4 * opts.head_dim * heads * opts.batch * n * per_row
    scoring = sum(2 * min(s.last, n) * n * opts.head_dim * heads * opts.batch for s in picked)
    return {
        "selector": " and ".join(_pattern_text(s) for s in picked),
        "extra_keys_per_row_max": per_row,
        "extra_pairs_max": n * per_row,
        "extra_fwd_flops_max": extra,
        "scoring_flops": scoring,
        "fwd_flops_max": static_fwd + extra + scoring,
    }


def _selector_cost(sp: Split, n: int, heads: int, opts: Options, static_fwd: Value) -> dict[str, Any]:
    """Expected cost of a pattern's selectors at a selection size: each query block keeps min(K,
    candidates) key blocks of b x b pairs per selector (at most; some may repeat the static part's or
    another selector's), and scoring costs one dot product of block means per (query block, key block)
    pair and selector. Candidates per query block are the context's non-empty b x b tiles, counted in
    affine pieces of query blocks (any N), per block (N <= ARRAY_LIMIT), or bounded. Several selectors:
    the first's rows, the sums, and each one's rows under "each"."""
    each: list[dict[str, Any]] = []
    for sel, ctx in zip(sp.selectors, sp.contexts, strict=True):
        b, bk = sel.block, sel.key_block or sel.block
        nb, nk = -(-n // b), -(-n // bk)
        k = opts.selected
        if k is None and isinstance(sel, ir.TopK) and sel.fraction is None:
            k = sel.count if isinstance(sel.count, int) else max(0, E.evaluate_int(sel.count, n))
        cand, blocks = _candidates(bound_predicate(ctx, n), n, b, k, bk)
        extra = 4 * b * bk * opts.head_dim * heads * opts.batch * blocks
        scoring = 2 * nb * nk * opts.head_dim * heads * opts.batch
        each.append({
            "selector": _pattern_text(sel),
            "block": b,
            "selected_per_query_block": k,
            "assumed": "--selected" if opts.selected is not None else "topk's n" if k is not None else (
                f"every candidate (at most; topk keeps a fraction {sel.fraction})" if isinstance(sel, ir.TopK)
                else "every candidate"),
            "candidates_per_query_block": cand,
            "selected_blocks": blocks,
            "extra_pairs_max": b * bk * blocks,
            "extra_fwd_flops_max": extra,
            "scoring_flops": scoring,
            "fwd_flops_max": static_fwd + extra + scoring,
        })  # fmt: skip
    if len(each) == 1:
        return each[0]
    out = dict(each[0], selector=" and ".join(e["selector"] for e in each), each=each)
    ks = [e["selected_per_query_block"] for e in each]
    out["selected_per_query_block"] = None if None in ks else sum(ks)
    for key in ("selected_blocks", "extra_pairs_max", "extra_fwd_flops_max", "scoring_flops"):
        out[key] = sum(e[key] for e in each)
    out["fwd_flops_max"] = static_fwd + out["extra_fwd_flops_max"] + out["scoring_flops"]
    return out


def _candidates(ctx: E.Expr, n: int, b: int, k: int | None, bk: int | None = None) -> tuple[dict[str, Value], Value]:
    """min / mean / max candidate key blocks (of `bk` tokens, default `b`) per query block of `b`, and the
    sum of min(candidates, K)."""
    nb, bk = -(-n // b), bk or b
    t = block_rows(ctx, n, b) if bk == b else None
    if t is not None:
        starts, values, slopes = per_block(t.visited, t.q_blocks)
        stops = [*starts[1:].tolist(), t.q_blocks]
        lo = hi = None
        total = kept = 0
        for s, e, v, r in zip(starts.tolist(), stops, values.tolist(), slopes.tolist(), strict=True):
            m = e - s
            ends = (v, v + r * (m - 1))
            lo = min(ends) if lo is None else min(lo, *ends)
            hi = max(ends) if hi is None else max(hi, *ends)
            total += (ends[0] + ends[1]) * m // 2
            kept += _sum_min(v, r, m, k)
        return {"min": lo or 0, "mean": total / nb, "max": hi or 0}, kept
    if n <= ARRAY_LIMIT:
        try:
            bc = C.block_counts(ctx, n, b, bk, Budget(ARRAY_WORK))
            cand = (bc.full + bc.partial).astype(np.int64)
            kept_arr = np.minimum(cand, k) if k is not None else cand
            return {"min": int(cand.min()), "mean": float(cand.mean()), "max": int(cand.max())}, int(kept_arr.sum())
        except OverBudget:
            pass
    v = tile_figures(ctx, n, b, bk).visited
    cap = nb * k if k is not None else upper(v)
    nk = -(-n // bk)
    return {"min": Bound(0, nk), "mean": ratio(v, nb), "max": Bound(0, nk)}, make(0, min(upper(v), cap))


def _sum_min(v: int, r: int, m: int, k: int | None) -> int:
    """sum over x = 0..m-1 of min(v + r * x, k) (k None: no cap)."""
    if k is None or m <= 0:
        return (2 * v + r * (m - 1)) * m // 2 if m > 0 else 0
    if r == 0:
        return min(v, k) * m
    if r > 0:
        below = max(0, min(m, -(-(k - v) // r)))  # x with v + r x < k
        return (2 * v + r * (below - 1)) * below // 2 + k * (m - below) if below else k * m
    above = max(0, min(m, (v - k) // (-r) + 1)) if v >= k else 0  # x with v + r x >= k
    rest = m - above
    first = v + r * above
    return k * above + ((2 * first + r * (rest - 1)) * rest // 2 if rest else 0)


def _fits(p: ir.Pattern, m: int) -> bool:
    try:
        bound_predicate(p, m)
    except PatternError:
        return False
    return True


def _at(cov: list[float], layers: int) -> float | None:
    if not cov:
        return None
    return cov[layers - 1] if layers <= len(cov) else cov[-1]


def _depth_text(depth: int | None, upper: int | None, bounds: bool, stopped: str) -> str:
    if depth is None and stopped.startswith("work budget"):
        return f"not within the layers measured ({stopped})"
    if not bounds:
        return str(depth) if depth is not None else f"never ({stopped})"
    lo = "?" if depth is None else str(depth)
    hi = "unknown at this granularity" if upper is None else str(upper)
    if depth is None:
        return f"never ({stopped}; upper bound on reach)"
    return f"between {lo} and {hi}" if hi != lo else lo


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    start = prev = xs[0]
    for x in [*xs[1:], -1]:
        if x != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = x
        prev = x
    return ",".join(out)


def _efficiency_warning(
    entry: dict[str, Any], p: ir.Pattern, pred: Any, n: int, pairs: Value, c: C.Cost, opts: Options
) -> str:
    tries = []
    candidates = {(opts.block_q, max(16, opts.block_k // 2)), (max(16, opts.block_q // 2), max(16, opts.block_k // 2))}
    blocked = block_form(pred)
    for bq, bk in sorted(candidates, reverse=True):
        if (bq, bk) == (opts.block_q, opts.block_k) or bq * bk >= opts.block_q * opts.block_k:
            continue
        if blocked is not None and (bq % blocked[0] or bk % blocked[0]):
            continue  # tiles that cut the pattern's own blocks cannot beat tiles that follow them
        t = tile_figures(pred, n, bq, bk)
        if t.exact and isinstance(pairs, int) and isinstance(t.visited, int):
            tries.append((pairs / max(1, t.visited * bq * bk), bq, bk))
    best = max(tries) if tries else None
    hint = (
        f"; {best[1]}x{best[2]} tiles would reach {best[0]:.0%}" if best and best[0] > upper(c.tile_efficiency) else ""
    )
    layout = ""
    if any(isinstance(x, ir.Neighborhood | ir.Where) for x in ir.walk(p)):
        layout = "; for a grid pattern, a tiled token order (tokens of one tile contiguous) helps"
    eff = c.tile_efficiency
    shown = f"{eff:.0%}" if not isinstance(eff, Bound) else f"at most {eff.hi:.0%}"
    return (
        f"{entry['used_by']}: tile efficiency {shown} at {opts.block_q}x{opts.block_k} "
        f"(under {LOW_EFFICIENCY:.0%}){hint}{layout}"
    )


def density_curves(patterns: tuple[ir.Pattern, ...], n: int) -> dict[str, list[tuple[int, float, float | None]]]:
    """Exact density (and the closed form's, where one holds) at N = 64, 128, ... up to n, per pattern;
    sizes where no exact count is available in bounded work are left out."""
    out: dict[str, list[tuple[int, float, float | None]]] = {}
    sizes = sorted({*(2**k for k in range(6, 64) if 2**k < n), n})
    for p in patterns:
        s = nnz(p)
        pts = []
        for m in sizes:
            if not _fits(p, m):
                continue
            pairs = exact_pairs(p, m)
            if pairs is None:
                continue
            exact = pairs / (m * m)
            sym = None
            if isinstance(s, Closed) and m >= s.valid_from and not s.condition.startswith("N fixed"):
                if not s.condition.startswith("N a multiple of") or m % int(s.condition.split()[-1]) == 0:
                    sym = s.at(m) / (m * m)
            pts.append((m, exact, sym))
        out[_pattern_text(p)] = pts
    return out
