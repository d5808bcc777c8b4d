"""docs/benchmarks.md and docs/img/benchmarks.png from the committed H100 results (docs/benchmarks/*_h100.json).

One command regenerates the page after any benchmark run: `python benchmarks/report.py`. Every figure on the
page is read from a JSON file written by the run that measured it (ours, FlexAttention and SDPA side by side);
nothing is typed in by hand. Needs no GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}_h100.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _stamp(d: dict[str, Any]) -> str:
    meta = d.get("meta", d)
    return f"{meta.get('machine') or meta.get('gpu')}, {meta.get('date', '?')}, torch {meta.get('torch')}, triton {meta.get('triton')}"


def _section(title: str, context: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"## {title}", "", context, "", *_table(header, rows), ""]


def _shaped(d: dict[str, Any]) -> str:
    s = d["shape"]
    return f"{_stamp(d)}; B={s['B']} H={s['H']} N={s['N']} D={s['D']} {s['dtype']}."


def _vs_flex(results: list[dict[str, Any]], group: str, ours: str, flex: str, bars: list[tuple[str, str, float]],
             cells: Any) -> list[list[str]]:
    """Table rows `cells(row, Flex time / ours)`, each ratio also a bar of the plot."""
    rows = []
    for r in results:
        ratio = r[flex] / r[ours]
        bars.append((group, r["pattern"], ratio))
        rows.append(cells(r, ratio))
    return rows


def _by_round(r: dict[str, Any]) -> str:
    """The spread of Flex / ours over the interleaved rounds a row was timed in ("-" for older rows)."""
    rounds = r.get("rounds_ms")
    if not rounds:
        return "-"
    ratios = [f / o for f, o in zip(rounds["flex"], rounds["ours"], strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


ROUNDS = (" Ours, Flex and SDPA in interleaved rounds (alternating order) of `do_bench` medians: each time is the "
          "median round; `by round` is the spread of the per-round ratios (the GPU's clock drifts).")


def sections(results: Path) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Markdown lines and (group, label, ours-vs-Flex speed) bars for the plot."""
    out: list[str] = []
    bars: list[tuple[str, str, float]] = []
    if fwd := _load(results, "forward"):
        rows = _vs_flex(fwd["forward"], "forward", "ours_ms", "flex_ms", bars, lambda r, ratio: [
            r["pattern"], f"{r['density']:.4f}", f"{r['ours_ms']:.3f}", f"{r['ours_tflops']:.1f}", f"{r['flex_ms']:.3f}",
            f"{r['flex_tflops']:.1f}", f"{r['sdpa_dense_ms']:.3f}", f"{ratio:.2f}x", _by_round(r),
            r.get("date", fwd["date"])[:16].replace("T", " ")])  # fmt: skip
        header = ["pattern", "density", "ours ms", "ours TFLOP/s", "Flex ms", "Flex TFLOP/s", "SDPA ms", "ours / Flex",
                  "by round", "measured (UTC)"]  # fmt: skip
        out += _section("Forward, 1-D patterns", _shaped(fwd) + ROUNDS, header, rows)
    if fb := _load(results, "fwd_bwd"):
        rows = _vs_flex(fb["fwd_bwd"], "fwd+bwd", "ours_fwd_bwd_ms", "flex_fwd_bwd_ms", bars, lambda r, ratio: [
            r["pattern"], f"{r['ours_fwd_bwd_ms']:.3f}", f"{r['ours_tflops']:.1f}", f"{r['flex_fwd_bwd_ms']:.3f}",
            f"{r['flex_tflops']:.1f}", f"{r['sdpa_dense_fwd_bwd_ms']:.3f}", f"{ratio:.2f}x", _by_round(r),
            r.get("date", fb["date"])[:16].replace("T", " ")])  # fmt: skip
        header = ["pattern", "ours ms", "ours TFLOP/s", "Flex ms", "Flex TFLOP/s", "SDPA ms", "ours / Flex", "by round",
                  "measured (UTC)"]  # fmt: skip
        out += _section("Forward + backward, 1-D patterns", _shaped(fb) + ROUNDS, header, rows)
    if lay := _load(results, "layouts"):
        rows = []
        for r in lay["forward"]:
            o = r["ours"]
            bars.append(("layouts", r["pattern"], r["speedup_vs_flex"]))
            rows.append([r["pattern"], o["layout"], f"{o['ms']:.3f}", f"{o['tflops']:.1f}", f"{o['tile_efficiency']:.1%}",
                         f"{r['flex_ms']:.3f}", f"{r['flex_tflops']:.1f}", f"{r['flex_tile_efficiency']:.1%}", f"{r['speedup_vs_flex']:.2f}x"])  # fmt: skip
        header = ["pattern", "layout", "ours ms", "ours TFLOP/s", "ours tile eff.", "Flex ms", "Flex TFLOP/s",
                  "Flex tile eff.", "ours / Flex"]  # fmt: skip
        out += _section("Forward, patterns with a token layout", _shaped(lay), header, rows)
    if sel := _load(results, "selectors"):
        rows = []
        for r in sel["rows"]:
            flex = r.get("flex_over_ours")  # None where the benchmark's time budget skipped Flex
            if flex is not None:
                bars.append(("selectors", f"NSA-like N={r['N']}", flex))
            rows.append([str(r["N"]), f"{r['ours_ms']:.2f}", f"{r['selection_share']:.0%}", f"{r['sdpa_causal_ms']:.2f}",
                         f"{r['speedup_vs_sdpa']:.2f}x", "-" if flex is None else f"{r['flex_ms']:.2f}",
                         "-" if flex is None else f"{flex:.2f}x"])  # fmt: skip
        header = ["N", "ours ms", "selection + tables share", "SDPA causal ms", "ours vs SDPA",
                  "Flex (mask build incl.) ms", "ours / Flex"]  # fmt: skip
        context = f"{_stamp(sel)}; `{sel['meta']['pattern']}`, B=1 H=16 D=128 bf16."
        out += _section("Dynamic selectors, end to end", context, header, rows)
    if inc := _load(results, "selectors_incall"):  # a later run that also timed the attention alone (no Flex)
        rows = [[str(r["N"]), f"{r['ours_ms']:.3f}", f"{r['attention_only_ms']:.3f}", f"{r['in_call_share']:.1%}",
                 f"{r['selection_share']:.1%}", f"{r['speedup_vs_sdpa']:.2f}x"] for r in inc["rows"]]  # fmt: skip
        header = ["N", "ours ms", "attention alone ms", "selection + tables inside the call", "timed apart",
                  "ours vs SDPA causal"]  # fmt: skip
        context = f"{_stamp(inc)}; the same call with the selection and its tables handed in, timed in the same run."
        out += _section("Dynamic selectors: what selection adds inside a call", context, header, rows)
    if var := _load(results, "varlen"):
        s, res = var["shape"], var["results"]
        rows = []
        for who, label in (
            ("ours", "patterndsl"),
            ("varlen_attn", "torch varlen_attn"),
            ("flex", "Flex + create_block_mask"),
        ):
            if who in res:
                fwd_ms = res[who].get("fwd", {}).get("ms")
                both = res[who].get("fwd+bwd", {}).get("ms")
                rows.append([label, f"{fwd_ms:.1f}" if fwd_ms else "-", f"{both:.1f}" if both else "not measured"])
        if "flex" in res and "ours" in res:
            bars.append(("varlen", "packed docs fwd", res["flex"]["fwd"]["ms"] / res["ours"]["fwd"]["ms"]))
        context = (f"{_stamp(var)}; {s['docs']} documents, {s['total']} tokens, causal window {s['window']}, "
                   f"H={s['H']} D={s['D']} {s['dtype']}; tables / masks built inside every timed call.")  # fmt: skip
        out += _section("Packed documents", context, ["", "fwd ms", "fwd+bwd ms"], rows)
    if sc := _load(results, "scaling"):
        out += _scaling(sc, "Scaling in N and head_dim, 1-D patterns")
    if gr := _load(results, "graphs"):
        out += graphs_section(gr)
    return out, bars


def graphs_section(gr: dict[str, Any]) -> list[str]:
    """Forward+backward launched eagerly and replayed from a CUDA graph (benchmarks/bench_graphs.py writes the
    same section as its own table)."""

    def ms(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.3f}" if r.get(key) else "failed"

    def speed(r: dict[str, Any], ours: str, flex: str) -> str:
        return f"{r[flex] / r[ours]:.2f}x" if r.get(ours) and r.get(flex) else "-"

    rows = [[r["pattern"], str(r["N"]), str(r["D"]), ms(r, "ours_ms"), ms(r, "flex_ms"), speed(r, "ours_ms", "flex_ms"),
             ms(r, "ours_graph_ms"), ms(r, "flex_graph_ms"), speed(r, "ours_graph_ms", "flex_graph_ms")]
            for r in gr["rows"]]  # fmt: skip
    context = (f"{_stamp(gr)}; B=1 H=16 bf16. A forward + backward step launched eagerly and as a replayed "
               "`torch.cuda.graph` (what torch.compile's reduce-overhead mode does), ours and Flex in interleaved "
               "rounds. At N = 4096 our eager step is bound by host time; replayed, only the kernels count."
               + (f" {gr['note']}." if gr.get("note") else ""))  # fmt: skip
    header = ["pattern", "N", "D", "ours eager ms", "Flex eager ms", "eager ours / Flex", "ours graph ms",
              "Flex graph ms", "graph ours / Flex"]  # fmt: skip
    return _section("Short sequences: eager and as a CUDA graph", context, header, rows)


def _scaling_cell(r: dict[str, Any]) -> str:
    """Our time and Flex's time / ours; a peer that ran out of memory says so instead of a ratio."""
    if r.get("ours_ms") is None:
        return "ours: out of memory"
    if "speedup_vs_flex" not in r:
        return f"{r['ours_ms']:.3f} ms, Flex out of memory"
    return f"{r['ours_ms']:.3f} ms, {r['speedup_vs_flex']:.2f}x"


def _scaling(sc: dict[str, Any], title: str) -> list[str]:
    """One row per (pattern, head_dim, pass), one column per N: our time and its speed-up over Flex."""
    rows = [r for r in sc["rows"] if "error" not in r]
    ns = sorted({r["N"] for r in rows})
    cells = {(r["pattern"], r["D"], r["pass"], r["N"]): r for r in rows}
    table = []
    for pat, d, which in sorted({(r["pattern"], r["D"], r["pass"]) for r in rows}):
        line = [pat, str(d), which]
        for n in ns:
            r = cells.get((pat, d, which, n))
            line.append("-" if r is None else _scaling_cell(r))
        table.append(line)
    s = sc["shape"]
    context = (f"{_stamp(sc)}; B={s['B']} H={s['H']} {s['dtype']}. Each cell: our median time and Flex's time / ours, "
               "measured side by side.")  # fmt: skip
    missing = [f"{r['pattern']} N={r['N']} D={r['D']} {r['pass']}: {r['error']}" for r in sc["rows"] if "error" in r]
    missing += sc.get("not_measured", [])
    tail = [f"Not measured: {'; '.join(missing)}.", ""] if missing else []
    return _section(title, context, ["pattern", "D", "pass", *map(str, ns)], table) + tail


def plot(bars: list[tuple[str, str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.32 * len(bars) + 1.2))
    labels = [f"{g}: {name}" for g, name, _ in bars]
    values = [v for _, _, v in bars]
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed vs FlexAttention (time Flex / time ours), H100, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    results = Path(argv[0]) if argv else ROOT / "docs/benchmarks"
    page = Path(argv[1]) if len(argv) > 1 else ROOT / "docs/benchmarks.md"
    picture = page.parent / "img" / "benchmarks.png"
    lines, bars = sections(results)
    head = [
        "# Benchmarks (H100)",
        "",
        "Generated by `python benchmarks/report.py` from the JSON files in docs/benchmarks/ (do not edit by hand).",
        "Each section is one run of its benchmark script with ours, FlexAttention and SDPA side by side;",
        "docs/perf-notes.md tells what each run changed, what was predicted and what came out.",
        "",
        f"![speed vs FlexAttention](img/{picture.name})",
        "",
    ]
    picture.parent.mkdir(parents=True, exist_ok=True)
    plot(bars, picture)
    page.write_text("\n".join(head + lines).rstrip("\n") + "\n", encoding="utf-8")
    print(f"wrote {page} and {picture} ({len(bars)} measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
