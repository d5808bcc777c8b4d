"""Formatting of `analyze`'s figures: a rich table for people, JSON for programs, a plot for slides."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table


def _si(x: Any) -> str:
    if _bounded(x):
        return f"{_si(x['lower'])}..{_si(x['upper'])}"
    if x is None:
        return "-"
    for unit, scale in (
        ("Y", 1e24),
        ("Z", 1e21),
        ("E", 1e18),
        ("P", 1e15),
        ("T", 1e12),
        ("G", 1e9),
        ("M", 1e6),
        ("k", 1e3),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _bounded(x: Any) -> bool:
    """A figure the analysis could only bound: {"lower": .., "upper": ..} (see analysis.bound)."""
    return isinstance(x, dict) and "lower" in x


def _fmt(x: Any, spec: str = "") -> str:
    """A figure in `spec`, or its bounds as 'lo..hi' (an open upper end as 'lo..')."""
    if _bounded(x):
        hi = "" if x["upper"] is None else _fmt(x["upper"], spec)
        return f"{_fmt(x['lower'], spec)}..{hi}"
    if x is None:
        return "-"
    return format(x, spec)


def _stats(s: dict[str, Any]) -> str:
    return f"{_fmt(s['min'])} / {_fmt(s['mean'], '.1f')} / {_fmt(s['max'])}"


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=False)


def render(result: dict[str, Any], console: Console | None = None) -> None:
    """The human-readable report: one column per distinct pattern, then totals, reach and warnings."""
    console = console or Console()
    n = result["N"]
    title = (
        f"{result['kind']} {result['name']}  N={n:,}  H={result['heads']}  D={result['head_dim']}  "
        f"B={result['batch']}  tiles {result['block'][0]}x{result['block'][1]}"
    )
    t = Table(title=title, show_lines=False, title_justify="left")
    t.add_column("figure", style="bold")
    for e in result["patterns"]:
        t.add_column(f"{e['pattern']}\n[dim]{e['used_by']}[/dim]", overflow="fold")

    def row(label: str, f: Any) -> None:
        t.add_row(label, *(f(e) for e in result["patterns"]))

    bounded = any("bounded" in e for e in result["patterns"])
    row("allowed pairs" + (" (exact or lo..hi)" if bounded else " (exact)"), lambda e: _fmt(e["pairs"], ","))
    row("density", lambda e: _fmt(e["density"], ".4%"))
    row("counted by", lambda e: e["count_method"])
    row("nnz(N)", lambda e: e["nnz"]["text"])
    row("keys per query min/mean/max", lambda e: _stats(e["rows"]["keys_per_query"]))
    row("reach back (i - first key)", lambda e: _stats(e["rows"]["reach_back"]))
    row("reach forward (last key - i)", lambda e: _stats(e["rows"]["reach_forward"]))
    row("queries with no key", lambda e: _fmt(e["rows"]["empty_rows"]))
    row("head-layers running it", lambda e: str(e["head_layers"]))
    row("fwd FLOPs (useful)", lambda e: _si(e["cost"]["fwd_flops"]))
    row("bwd FLOPs (useful, 2.5x)", lambda e: _si(e["cost"]["bwd_flops"]))
    row(
        "tiles full / partial",
        lambda e: f"{_fmt(e['cost']['full_blocks'], ',')} / {_fmt(e['cost']['partial_blocks'], ',')}",
    )
    row("fwd FLOPs executed", lambda e: _si(e["cost"]["executed_fwd_flops"]))
    row("tile efficiency", lambda e: _fmt(e["cost"]["tile_efficiency"], ".1%"))
    row("token layout (compiler's choice)", lambda e: e["layout"]["chosen"])
    row(
        "tile efficiency with it",
        lambda e: f"{_fmt(e['layout']['tile_efficiency'], '.1%')} ({_fmt(e['layout']['visited_blocks'], ',')} tiles)",
    )
    row("fwd bytes (bf16)", lambda e: _si(e["cost"]["fwd_bytes"]) + "B")
    row("arithmetic intensity", lambda e: f"{_fmt(e['cost']['arithmetic_intensity'], '.1f')} FLOP/B")
    row("decoding keeps", _decode_keeps)
    if any("selector" in e for e in result["patterns"]):

        def sel(f: Any) -> Any:
            return lambda e: f(e["selector"]) if "selector" in e else "-"

        row("selector (figures above: static part)", sel(lambda s: s["selector"]))
        row("candidate blocks per query block",
            sel(lambda s: _stats(s["candidates_per_query_block"]) if "assumed" in s else "-"))
        row("kept per query block (K)",
            sel(lambda s: f"{s['selected_per_query_block'] or 'all'} ({s['assumed']})" if "assumed" in s else "-"))
        row("selected keys per row (at most)", sel(lambda s: _fmt(s.get("extra_keys_per_row_max"), ",")))
        row("selected pairs (at most)", sel(lambda s: _fmt(s["extra_pairs_max"], ",")))
        row("selected fwd FLOPs (at most)", sel(lambda s: _si(s["extra_fwd_flops_max"])))
        row("scoring FLOPs (block means)", sel(lambda s: _si(s["scoring_flops"])))
        row("expected fwd FLOPs (at most)", sel(lambda s: _si(s["fwd_flops_max"])))
    console.print(t)

    _render_decode(result, console)

    tot = result["totals"]
    tt = Table(title="totals over heads" + (" and layers" if result["kind"] == "model" else ""), title_justify="left")
    for col in ("pairs", "fwd FLOPs", "bwd FLOPs", "executed fwd", "dense fwd", "tile eff.", "fwd bytes", "FLOP/B"):
        tt.add_column(col)
    tt.add_row(
        _fmt(tot["pairs"], ","), _si(tot["fwd_flops"]), _si(tot["bwd_flops"]), _si(tot["executed_fwd_flops"]),
        _si(tot["dense_fwd_flops"]), _fmt(tot["tile_efficiency"], ".1%"), _si(tot["fwd_bytes"]) + "B",
        _fmt(tot["arithmetic_intensity"], ".1f"),
    )  # fmt: skip
    console.print(tt)

    rf = result["receptive_field"]
    rt = Table(
        title="receptive field",
        title_justify="left",
    )
    rt.add_column("depth")
    rt.add_column("coverage" + (" (upper bound)" if rf["coverage_lower"] is not None else ""))
    if rf["coverage_lower"] is not None:
        rt.add_column("coverage (lower bound)")
    cov = rf["coverage"]
    shown = sorted({1, 2, 3, 4, len(cov)} | {2**k for k in range(12) if 2**k <= len(cov)})
    for d in (x for x in shown if 1 <= x <= len(cov)):
        cells = [str(d), f"{cov[d - 1]:.4%}"]
        if rf["coverage_lower"] is not None:
            low = rf["coverage_lower"]
            cells.append(f"{low[min(d, len(low)) - 1]:.4%}")
        rt.add_row(*cells)
    console.print(rt)
    what = "block pairs" if rf["coverage_lower"] is not None else "pairs"
    console.print(f"granularity: {rf['granularity']}; coverage = reached {what} / {what} of {rf['target']} attention")
    console.print(f"depth for full coverage: [bold]{rf['depth_text']}[/bold]  (stopped: {rf['stopped']})")
    if rf.get("closed_form"):
        console.print(f"closed form: {rf['closed_form']}")
    if "coverage_at_layers" in rf:
        console.print(f"coverage after {result['layers']} layers: {rf['coverage_at_layers']:.4%}")
    console.print("[dim]" + "; ".join(f"{k}: {v}" for k, v in result["conventions"].items()) + "[/dim]")
    for w in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


def _decode_keeps(e: dict[str, Any]) -> str:
    d = e["decode"]
    return d["retained"] if d["consistent"] else f"not decode-consistent: {d['reason']}"


def _render_decode(result: dict[str, Any], console: Console) -> None:
    """`--decode`: per pattern and context length, one decode step's keys and the cache's size. Rows name
    their pattern as the table above does under its source (a column only when there are several), so a
    long source does not wrap every row; a page size shared by all goes to the title."""
    for e in result["patterns"]:
        if not e["decode"]["consistent"]:
            console.print(f"{e['used_by']}: not decode-consistent: {e['decode']['reason']}")
    entries = [e for e in result["patterns"] if e["decode"].get("steps")]
    if not entries:
        return
    d0 = entries[0]["decode"]
    pages = {e["decode"]["page_size"] for e in entries}
    several = len(entries) > 1
    t = Table(
        title=f"decode step and cache, per KV head and sequence (D={d0['head_dim']}, "
        f"{d0['bytes_per_element']} B per element, key tiles of {d0['block']}"
        + (f", pages of {d0['page_size']})" if len(pages) == 1 else ")"),
        title_justify="left",
    )
    for col in (("pattern",) if several else ()) + ("N", "keys", "keys read", "bytes read", "keys kept", "cache bytes"):
        t.add_column(col)
    for e in entries:
        d = e["decode"]
        bound = "<= " if d["upper_bounds"] else ""
        for s in d["steps"]:
            t.add_row(
                *((e["used_by"],) if several else ()), f"{s['N']:,}", f"{bound}{s['keys']:,}",
                f"{bound}{s['keys_read']:,}", f"{bound}{_si(s['bytes_read'])}B", f"{s['retained_keys']:,}",
                f"{_si(s['cache_bytes'])}B" + (f" (pages of {d['page_size']})" if len(pages) > 1 else ""),
            )  # fmt: skip
    console.print(t)


def plot(result: dict[str, Any], density_curves: dict[str, list[tuple[int, float, float | None]]], path: str) -> None:
    """Coverage vs depth (left) and density vs N (right), exact points and the closed form as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rf = result["receptive_field"]
    depths = list(range(1, len(rf["coverage"]) + 1))
    bound = rf["coverage_lower"] is not None
    a.plot(depths, rf["coverage"], label="coverage" + (" (upper bound)" if bound else ""))
    if bound:
        low = rf["coverage_lower"]
        a.plot(range(1, len(low) + 1), low, label="coverage (lower bound)")
    a.set_xlabel("depth (layers)")
    a.set_ylabel(f"fraction of {rf['target']}-attention pairs reached")
    a.set_title(f"receptive field, {rf['granularity']}")
    a.set_ylim(0, 1.02)
    a.legend()
    for label, pts in density_curves.items():
        ns = [p[0] for p in pts]
        (line,) = b.plot(ns, [p[1] for p in pts], "o", label=f"{label} (exact)")
        sym = [(p[0], p[2]) for p in pts if p[2] is not None]
        if sym:
            b.plot([s[0] for s in sym], [s[1] for s in sym], "-", color=line.get_color(), label=f"{label} (nnz(N))")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("N")
    b.set_ylabel("density")
    b.set_title("density vs N")
    b.legend(fontsize="x-small")
    fig.suptitle(f"{result['kind']} {result['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
