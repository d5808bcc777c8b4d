"""docs/performance.md and docs/img/benchmarks.png from the committed H100 results (benchmarks/results/*_h100.json).

One command regenerates the page after any benchmark run: `python benchmarks/report.py`. Every figure on the
page is read from a JSON file written by the run that measured it (ours, FlexAttention and SDPA side by side);
nothing is typed in by hand: the environment comes from each file's run info and the known weak spots are the
comparisons in those files where a peer took less time than ours. Needs no GPU.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# The files the page reads, in page order, with their sections' titles.
SECTIONS = (
    ("forward", "Forward, 1-D patterns"),
    ("fwd_bwd", "Forward + backward, 1-D patterns"),
    ("layouts", "Patterns with a token layout"),
    ("selectors", "Dynamic selectors, end to end"),
    ("selectors_incall", "Dynamic selectors: what selection adds inside a call"),
    ("varlen", "Packed documents"),
    ("scaling", "Scaling in N and head_dim, 1-D patterns"),
    ("graphs", "Short sequences: eager and as a CUDA graph"),
    ("compare_runtime", "The runtime package against the template modules"),
    ("decode", "Decoding against a KV cache"),
    ("decode_quick", "Decoding: flat steps and paged caches"),
    ("pattern_cache", "The retaining KV cache"),
    ("hf", "Inside a Hugging Face model"),
    ("nsa", "NSA's three branches"),
    ("minference", "MInference vertical-slash prefill"),
    ("video_dit", "Video DiT: text tokens before a 3-D latent"),
    ("permute", "Run-time token orders"),
    ("context_parallel", "Context parallelism, one GPU"),
    ("flex_mask", "Building Flex's BlockMask"),
    ("layout_choice", "Token layout or plain order"),
    ("peers", "Every peer side by side"),
)
TITLES = dict(SECTIONS)


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}_h100.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _meta(d: dict[str, Any]) -> dict[str, Any]:
    """A file's run info, wherever its benchmark put it (`meta`, `run` or the top level)."""
    meta = d.get("meta") or d.get("run") or d
    return dict(meta, machine=meta.get("machine") or meta.get("gpu") or meta.get("device") or d.get("device"))


def _stamp(d: dict[str, Any]) -> str:
    meta = _meta(d)
    return f"{meta['machine']}, {meta.get('date', '?')}, torch {meta.get('torch')}, triton {meta.get('triton')}"


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
        out += _section(TITLES["forward"], _shaped(fwd) + ROUNDS, header, rows)
    if fb := _load(results, "fwd_bwd"):
        rows = _vs_flex(fb["fwd_bwd"], "fwd+bwd", "ours_fwd_bwd_ms", "flex_fwd_bwd_ms", bars, lambda r, ratio: [
            r["pattern"], f"{r['ours_fwd_bwd_ms']:.3f}", f"{r['ours_tflops']:.1f}", f"{r['flex_fwd_bwd_ms']:.3f}",
            f"{r['flex_tflops']:.1f}", f"{r['sdpa_dense_fwd_bwd_ms']:.3f}", f"{ratio:.2f}x", _by_round(r),
            r.get("date", fb["date"])[:16].replace("T", " ")])  # fmt: skip
        header = ["pattern", "ours ms", "ours TFLOP/s", "Flex ms", "Flex TFLOP/s", "SDPA ms", "ours / Flex", "by round",
                  "measured (UTC)"]  # fmt: skip
        out += _section(TITLES["fwd_bwd"], _shaped(fb) + ROUNDS, header, rows)
    if lay := _load(results, "layouts"):
        rows = []
        for r in lay["forward"]:
            o = r["ours"]
            bars.append(("layouts", r["pattern"], r["speedup_vs_flex"]))
            fb = r.get("ours_fwd_bwd_ms") and r.get("flex_fwd_bwd_ms")
            rows.append([r["pattern"], o["layout"], f"{o['ms']:.3f}", f"{o['tflops']:.1f}", f"{o['tile_efficiency']:.1%}",
                         f"{r['flex_ms']:.3f}", f"{r['flex_tflops']:.1f}", f"{r['flex_tile_efficiency']:.1%}", f"{r['speedup_vs_flex']:.2f}x",
                         f"{r['ours_fwd_bwd_ms']:.3f}" if fb else "-", f"{r['flex_fwd_bwd_ms']:.3f}" if fb else "-",
                         f"{r['flex_fwd_bwd_ms'] / r['ours_fwd_bwd_ms']:.2f}x" if fb else "-"])  # fmt: skip
        header = ["pattern", "layout", "ours ms", "ours TFLOP/s", "ours tile eff.", "Flex ms", "Flex TFLOP/s",
                  "Flex tile eff.", "ours / Flex", "ours fwd+bwd ms", "Flex fwd+bwd ms", "fwd+bwd ours / Flex"]  # fmt: skip
        out += _section(TITLES["layouts"], _shaped(lay), header, rows)
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
        out += _section(TITLES["selectors"], context, header, rows)
    if inc := _load(results, "selectors_incall"):  # a later run that also timed the attention alone (no Flex)
        rows = [[str(r["N"]), f"{r['ours_ms']:.3f}", f"{r['attention_only_ms']:.3f}", f"{r['in_call_share']:.1%}",
                 f"{r['selection_share']:.1%}", f"{r['speedup_vs_sdpa']:.2f}x"] for r in inc["rows"]]  # fmt: skip
        header = ["N", "ours ms", "attention alone ms", "selection + tables inside the call", "timed apart",
                  "ours vs SDPA causal"]  # fmt: skip
        context = f"{_stamp(inc)}; the same call with the selection and its tables handed in, timed in the same run."
        out += _section(TITLES["selectors_incall"], context, header, rows)
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
        out += _section(TITLES["varlen"], context, ["", "fwd ms", "fwd+bwd ms"], rows)
    if sc := _load(results, "scaling"):
        out += _scaling(sc, TITLES["scaling"])
    if gr := _load(results, "graphs"):
        out += graphs_section(gr)
    for name, section in LATER_SECTIONS:
        if d := _load(results, name):
            out += section(d)
    return out, bars


def _ms(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and x > 0 else "-"


def compare_runtime_section(d: dict[str, Any]) -> list[str]:
    rows = [[r["pattern"], str(r["N"]), _ms(r["old_fwd_ms"]), _ms(r["new_fwd_ms"]), f"{r['fwd_new_over_old']:.3f}",
             _ms(r["old_fwd_bwd_ms"]), _ms(r["new_fwd_bwd_ms"]), f"{r['fwd_bwd_new_over_old']:.3f}",
             "yes" if r["outputs_equal"] else "NO", "yes" if r["kernels_equal"] else "no"] for r in d["results"]]  # fmt: skip
    context = (f"{_stamp(d)}; benchmarks/compare_runtime.py: the template-era generated modules and "
               "`patterndsl.runtime` in one process, configured tiles, five interleaved rounds. `kernels equal`: "
               "the same registers, spills and shared memory for every kernel launched.")  # fmt: skip
    header = ["pattern", "N", "old fwd ms", "new fwd ms", "new / old", "old fwd+bwd ms", "new fwd+bwd ms", "new / old",
              "outputs equal", "kernels equal"]  # fmt: skip
    return _section(TITLES["compare_runtime"], context, header, rows)


def decode_section(d: dict[str, Any]) -> list[str]:
    s = d["shape"]
    rows = [[r["pattern"], str(r["N"]), str(r["B"]), str(r["Nq"]), _ms(r["ms"].get("ours")), _ms(r["ms"].get("ours_graph")),
             _ms(r["ms"].get("ours_paged")), _ms(r["ms"].get("flex_decode")), _ms(_fa4_decode(r["ms"])),
             _ms(r["ms"].get("sdpa_whole_cache")), f"{r['GBps']['ours_graph']:.0f}"] for r in d["rows"]]  # fmt: skip
    context = (f"{_stamp(d)}; H={s['H']} Hkv={s['Hkv']} D={s['D']} {s['dtype']}, pages of {s['page']}. One step of Nq "
               "new queries per sequence; `graph`: the step replayed from a CUDA graph; SDPA reads the whole cache; "
               "GB/s: KV bytes the step must read over the graph time; FA4: `flash_attn_varlen_func` over the paged "
               "cache, eager (for window + sinks it runs the window alone: it has no sinks)."
               + "".join(f" {n}." for n in d.get("notes", [])))  # fmt: skip
    header = ["pattern", "context", "B", "Nq", "ours ms", "ours graph ms", "ours paged ms", "Flex decode ms",
              "FA4 paged ms", "SDPA ms", "ours GB/s"]  # fmt: skip
    out = _section(TITLES["decode"], context, header, rows)
    sel = [[r["pattern"], str(r["N"]), str(r["B"]), _ms(r["ms"]["topk_window"]), _ms(r["ms"]["topk_window_given_selection"]),
            f"{r['selection_share']:.1%}", _ms(r["ms"]["dense_causal"]), f"{r['speedup_vs_dense_causal']:.2f}x",
            _ms(r["ms"]["sdpa_whole_cache"])] for r in d.get("selectors", [])]  # fmt: skip
    header = ["pattern", "context", "B", "ours ms", "selection given ms", "selection share", "dense causal ms",
              "vs dense", "SDPA ms"]  # fmt: skip
    return out + _table(header, sel) + [""] if sel else out


def _fa4_decode(ms: dict[str, float]) -> float | None:
    """FA4's paged decode time of a row: the same pattern, or the window alone where the pattern has sinks."""
    return ms.get("fa4_paged", ms.get("fa4_paged_window_no_sink"))


def pattern_cache_section(d: dict[str, Any]) -> list[str]:
    rows = [[r["pattern"], str(r["context"]), f"{r['memory_bytes'] / 2**20:.1f}", f"{r['table_bytes'] / 2**10:.1f}",
             r["retained"], _ms(r["append_1_host_ms"]), _ms(r["decode_step_ms"])] for r in d["rows"]]  # fmt: skip
    context = (f"{_stamp(d)}; B={d['B']} H={d['H']} Hkv={d['Hkv']} D={d['D']}. `PatternKVCache` keeps only the keys "
               "a later query can read: its memory for a window and sinks does not grow with the context.")  # fmt: skip
    header = ["pattern", "context", "cache MiB", "tables KiB", "retained", "append host ms", "decode step ms"]
    return _section(TITLES["pattern_cache"], context, header, rows)


def hf_section(d: dict[str, Any]) -> list[str]:
    t = d["training"]
    rows = [[who, _ms(t[who]["median_step_ms"], 1), f"{t[who]['tokens_per_s']:.0f}", _ms(t[who].get("attention_ms"), 1),
             f"{t[who]['peak_memory_gib']:.1f}"] for who in ("patterndsl", "flex_attention", "sdpa") if who in t]  # fmt: skip
    s = d["setup"]
    context = (f"{_stamp(d)}; a {s['num_hidden_layers']}-layer model ({s['parameters'] / 1e6:.0f}M parameters) with "
               f"sliding layers of window {s['window']}, N={s['N']}, bf16: a training step (forward, backward, "
               "optimizer), its attention time profiled.")  # fmt: skip
    out = _section(TITLES["hf"], context, ["attention", "step ms", "tokens/s", "attention ms", "peak GiB"], rows)
    g = d.get("generation", {})
    gen = [[str(b), who, _ms(r.get("prefill_and_first_s"), 2), f"{r['decode_tokens_per_s']:.0f}",
            f"{r['cache_bytes'] / 2**20:.0f}"] for b, per in g.get("batches", {}).items()
           for who, r in per.items() if isinstance(r, dict)]  # fmt: skip
    if gen:
        when = d.get("generation_run", {}).get("date", "")
        out += [f"Generation: a {g['prompt']}-token prompt, {g['new_tokens']} new tokens, `{g['pattern']}`"
                + (f" (measured {when[:16].replace('T', ' ')} UTC)" if when else "") + ".", "",
                *_table(["batch", "attention and cache", "prefill s", "decode tokens/s", "cache MiB"], gen), ""]  # fmt: skip
    return out


def nsa_section(d: dict[str, Any]) -> list[str]:
    m = d["meta"]
    rows = [[str(r["N"]), _ms(r["nsa_fwd_ms"], 1), _ms(r["nsa_fwd_bwd_ms"], 1), _ms(r["sdpa_fwd_ms"], 1),
             _ms(r["sdpa_fwd_bwd_ms"], 1), _ms(r.get("compressed_fwd_ms"), 1), _ms(r.get("selected_fwd_ms"), 1),
             _ms(r.get("window_fwd_ms"), 1), f"{r['speedup_fwd']:.2f}x", f"{r['speedup_fwd_bwd']:.2f}x"]
            for r in d["rows"]]  # fmt: skip
    context = (f"{_stamp(d)}; B={m['B']}, {m['HQ']} query over {m['HKV']} KV heads, D={m['D']}: compressed "
               f"attention, `{m['selected']}` and `{m['window']}` with per-head gates, against dense causal SDPA.")
    header = ["N", "NSA fwd ms", "NSA fwd+bwd ms", "SDPA fwd ms", "SDPA fwd+bwd ms", "compressed ms", "selected ms",
              "window ms", "fwd vs SDPA", "fwd+bwd vs SDPA"]  # fmt: skip
    return _section(TITLES["nsa"], context, header, rows)


def minference_section(d: dict[str, Any]) -> list[str]:
    s = d["shape"]
    rows = [["ours", _ms(d["ours_ms"], 1), _ms(d["selection_ms"], 1)],
            ["Flex, the same selection", _ms(d["flex_total_ms"], 1), _ms(d["flex_mask_build_ms"], 1)],
            ["SDPA causal", _ms(d["sdpa_causal_ms"], 1), "-"]]  # fmt: skip
    context = (f"{_stamp(d)}; `{d['pattern']}` with {d['defines']}, B={s['B']} H={s['H']} HKV={s['HKV']} N={s['N']} "
               f"D={s['D']}; Flex's mask keeps {d['flex_block_density_of_causal']:.0%} of the causal blocks. ours / Flex "
               f"{d['speedup_vs_flex']:.2f}x, ours vs SDPA {d['speedup_vs_sdpa']:.2f}x.")  # fmt: skip
    return _section(TITLES["minference"], context, ["", "total ms", "selection or mask ms"], rows)


def video_dit_section(d: dict[str, Any]) -> list[str]:
    s, o, fb = d["shape"], d["ours_best"], d.get("fwd_bwd", {})
    rows = [["forward", _ms(o["ms"]), _ms(d["flex_ms"]), _ms(d["flex_with_mask_build_ms"]), _ms(d["sdpa_dense_ms"]),
             f"{d['speedup_vs_flex']:.2f}x", f"{d['speedup_vs_flex_with_mask_build']:.2f}x"],
            ["forward + backward", _ms(fb.get("ours_ms")), _ms(fb.get("flex_ms")), "-", _ms(fb.get("sdpa_ms")),
             f"{fb['speedup_vs_flex']:.2f}x" if fb else "-", "-"]]  # fmt: skip
    context = (f"{_stamp(d)}; `{d['pattern']}`: {s['text']} text tokens before a {s['grid']} latent, kernel "
               f"{s['kernel']}, B={s['B']} H={s['H']} N={s['N']} D={s['D']}, density {d['density']:.3f}; ours with "
               f"{o['layout']} ({o['tile_efficiency']:.0%} tile efficiency).")  # fmt: skip
    header = ["pass", "ours ms", "Flex ms", "Flex + mask build ms", "SDPA ms", "ours / Flex", "ours / (Flex + build)"]
    return _section(TITLES["video_dit"], context, header, rows)


def permute_section(d: dict[str, Any]) -> list[str]:
    s = d["shape"]
    rows = [[r["case"], _ms(r["fwd_ms"]), _ms(r["fwd_bwd_ms"])] for r in d["rows"]]
    context = (f"{_stamp(d)}; B={s['B']} H={s['H']} Hkv={s['Hkv']} N={s['N']} D={s['D']}, segments of {s['segment']}; "
               f"PBS-Attn's selection keeps {d['pbs_selected_block_fraction']:.0%} of the blocks.")
    return _section(TITLES["permute"], context, ["case", "fwd ms", "fwd+bwd ms"], rows)


def context_parallel_section(d: dict[str, Any]) -> list[str]:
    rows = [[r["pattern"], str(r["N"]), r["ours"]["placement"], _ms(r["ours"]["fwd_ms"], 2), _ms(r["ours"]["single_fwd_ms"], 2),
             _ms(r["ours"]["fwd_bwd_ms"], 2), _ms(r["ours"]["single_fwd_bwd_ms"], 2)] for r in d["rows"]]  # fmt: skip
    context = (f"{_stamp(d)}; {d['gpus']} GPU, {d['tokens_per_gpu']} tokens per GPU, H={d['heads']} D={d['head_dim']}: "
               "the rank's path (kernels reading segment tables) against one call on the whole sequence.")
    header = ["pattern", "N", "placement", "rank path fwd ms", "single call fwd ms", "rank path fwd+bwd ms",
              "single call fwd+bwd ms"]  # fmt: skip
    return _section(TITLES["context_parallel"], context, header, rows)


def flex_mask_section(d: dict[str, Any]) -> list[str]:
    rows = [[r["pattern"], str(r["n"]), _ms(r["ours_ms"], 1), _ms(r["create_block_mask_ms"], 1), f"{r['speedup']:.2f}x",
             f"{r['ours_index_bytes'] / 2**20:.1f}"] for r in d["rows"]]  # fmt: skip
    context = (f"{_stamp(d)}; `attn.to_flex_block_mask(N)` against Flex's compiled `create_block_mask`, blocks of 128, "
               "from empty caches." + (f" {d['note'][0].upper()}{d['note'][1:]}." if d.get("note") else ""))
    header = ["pattern", "N", "ours ms", "create_block_mask ms", "ours faster by", "our index MiB"]
    return _section(TITLES["flex_mask"], context, header, rows)


def decode_quick_section(d: dict[str, Any]) -> list[str]:
    rows = [["window + sinks", str(r["N"]), str(r["B"]), _ms(r["ms"]["eager"]), _ms(r["ms"]["graph"]), _ms(r["host_ms"]), "-"]
            for r in d.get("flat", [])]  # fmt: skip
    rows += [[r["pattern"], str(r["N"]), str(r["B"]), _ms(r["ms"]["contiguous_eager"]), _ms(r["ms"]["contiguous_graph"]),
              "-", f"{_ms(r['ms']['paged_graph'])} ({r['paged_over_contiguous']:.2f}x)"] for r in d.get("paged", [])]  # fmt: skip
    rows += [["top-16 of 64 + window 512", str(r["N"]), str(r["B"]), _ms(r["ms"].get("topk_window_eager")),
              _ms(r["ms"]["topk_window"]), "-", "-"] for r in d.get("selectors", [])]  # fmt: skip
    context = (f"{_stamp(d)}; `causal & (window(1023) | sink(4))` from 8k to 512k tokens of context (B=1), dense "
               "causal with a contiguous and a paged cache, and a selector step (32 query over 8 KV heads, D=128, "
               "bf16)." + "".join(f" {n}." for n in d.get("notes", [])))  # fmt: skip
    header = ["pattern", "context", "B", "eager ms", "graph ms", "host ms per call", "paged graph ms"]
    out = _section(TITLES["decode_quick"], context, header, rows)
    sel = [[str(r["B"]), _ms(r["ms"]["topk_window"]), _ms(r["ms"]["topk_window_given_selection"]),
            f"{r['selection_share']:.1%}", _ms(r["ms"]["dense_causal"]), f"{r['speedup_vs_dense_causal']:.1f}x",
            _ms(r["ms"]["sdpa_whole_cache"])] for r in d.get("selectors", [])]  # fmt: skip
    if sel:
        out += ["The selector step (graph-replayed), its selection's share, against dense causal decode and SDPA over "
                "the whole cache at the same context:", "",
                *_table(["B", "step ms", "given its selection ms", "selection share", "dense ms", "step vs dense",
                         "SDPA ms"], sel), ""]  # fmt: skip
    dense = [[str(r["B"]), _ms(r["ms"]["default"]), r["best"], _ms(r["ms"][r["best"]]), _ms(r["ms"]["sdpa_whole_cache"]),
              f"{r['bytes_kv'] / r['ms']['default'] / 1e6:.0f}"] for r in d.get("tune_dense", []) if "default" in r["ms"]]  # fmt: skip
    if dense:
        out += ["Dense causal decode at 128k (graph-replayed): the tuned step, the best fixed configuration of the sweep "
                "(key block, splits, warps, stages, TMA), SDPA in the same rounds:", "",
                *_table(["B", "tuned ms", "best of sweep", "its ms", "SDPA ms", "tuned GB/s"], dense), ""]  # fmt: skip
    return out


def layout_choice_section(d: dict[str, Any]) -> list[str]:
    rows = [[r["pattern"], str(r["N"]), r["layout"], _ms(r["ms"]["layout_fwd"]), _ms(r["ms"]["plain_fwd"]),
             _ms(r["ms"]["layout_fwd_bwd"]), _ms(r["ms"]["plain_fwd_bwd"]),
             f"{r['layout_visited_pairs'] / r['plain_visited_pairs']:.2f}", f"{r['per_pair_cost_ratio_fwd']:.2f}"]
            for r in d["rows"]]  # fmt: skip
    s = d["shape"]
    context = (f"{_stamp(d)}; B={s['B']} H={s['H']} D={s['D']}, configured tiles: each library pattern with a token "
               "layout in that layout (pointer-load kernel) and in the plain order (grid kernel), interleaved rounds.")
    header = ["pattern", "N", "layout", "layout fwd ms", "plain fwd ms", "layout fwd+bwd ms", "plain fwd+bwd ms",
              "visited pairs layout / plain", "cost per pair layout / plain"]  # fmt: skip
    return _section(TITLES["layout_choice"], context, header, rows)


PEER_NAMES = (("ours_triton", "ours, Triton kernels"), ("ours_gathered", "ours, layout gathered"),
              ("ours_in_place", "ours, layout in place"), ("fa4", "FA4"), ("flex_flash", "Flex FLASH"), ("flex_triton", "Flex Triton"), ("sdpa", "SDPA causal"),
              ("sdpa_mask", "SDPA with a mask"))  # fmt: skip


def _spread(peer: dict[str, Any], ours: dict[str, Any]) -> str:
    """The lowest and highest per-round ratio of a peer's time to ours (rounds timed side by side)."""
    ratios = [p / o for p, o in zip(peer["rounds_ms"], ours["rounds_ms"], strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def peers_section(d: dict[str, Any]) -> list[str]:
    """bench_peers.py: ours and every peer that can express the pattern, each peer's time and ours vs it."""
    rows, failed = [], {}
    for c in d["cases"]:
        got = c.get("peers", {})
        ours = got.get("ours", {}).get("ms")
        if ours is None:
            failed[f"{c['pattern']} D={c['d']} {c['pass']}"] = c.get("error") or c.get("skipped") or "not timed"
            continue
        flops = 4 * c["allowed_pairs"] * c["d"] * d["H"] * d["B"] * (3.5 if c["pass"] == "fwd+bwd" else 1.0)
        cells = [f"{_ms(got[p]['ms'])} ({got[p]['ms'] / ours:.2f}x, {_spread(got[p], got['ours'])})" if p in got
                 else "-" for p, _ in PEER_NAMES]  # fmt: skip
        backend = " (on FA4)" if c.get("ours_backend") == "fa4" else ""
        when = c.get("earlier_run") or c.get("later_run")  # a case from another run than the file's
        other_run = f" (run of {when[:16].replace('T', ' ')})" if when else ""
        rows.append([c["pattern"] + backend + other_run, str(c["d"]), c["pass"], f"{_ms(ours)} ({flops / ours / 1e9:.0f})", *cells])
        for p, name in PEER_NAMES:
            if p in c.get("errors", {}):
                failed.setdefault(f"{name}: {c['errors'][p]}", "")
    context = (f"{_stamp(d)}; B={d['B']} H={d['H']} {d['dtype']}, N={d['cases'][0].get('n', '?')} tokens in every case. "
               "Each cell: the peer's median time, then ours vs it (its time over ours: above 1 ours is faster) and "
               "the spread of that ratio over the interleaved rounds; ours with its effective TFLOP/s. Every peer's "
               "output is checked against ours before it is timed. Ours is the default call: where the pattern is a band "
               "that FlashAttention-4 can run and its tuner timed FA4's forward faster, the row says 'on FA4', and "
               "the Triton kernels alone are the next column." + (f" {d['note']}" if d.get("note") else ""))  # fmt: skip
    header = ["pattern", "D", "pass", "ours ms (TFLOP/s)", *(name + " ms" for _, name in PEER_NAMES)]
    out = _section(TITLES["peers"], context, header, rows)
    if failed:
        out += ["Not timed:", "", *(f"- {k}{': ' + v if v else ''}" for k, v in failed.items()), ""]
    return out


LATER_SECTIONS = (
    ("compare_runtime", compare_runtime_section),
    ("decode", decode_section),
    ("decode_quick", decode_quick_section),
    ("pattern_cache", pattern_cache_section),
    ("hf", hf_section),
    ("nsa", nsa_section),
    ("minference", minference_section),
    ("video_dit", video_dit_section),
    ("permute", permute_section),
    ("context_parallel", context_parallel_section),
    ("flex_mask", flex_mask_section),
    ("layout_choice", layout_choice_section),
    ("peers", peers_section),
)


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
    return _section(TITLES["graphs"], context, header, rows)


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


def _rows(d: dict[str, Any]) -> list[dict[str, Any]]:
    """A file's measured rows, whatever its benchmark calls them."""
    for key in ("forward", "fwd_bwd", "rows"):
        if isinstance(d.get(key), list):
            return list(d[key])
    return []


def method(results: Path) -> list[str]:
    """How the numbers were taken; which sections used interleaved rounds is read from the files."""
    interleaved = [title for name, title in SECTIONS
                   if (d := _load(results, name)) and any("rounds_ms" in r for r in _rows(d))]  # fmt: skip
    return [
        "## Method",
        "",
        "- Every section is one run of one benchmark script (`benchmarks/bench_*.py`) on one GPU: ours, "
        "FlexAttention (`torch.compile`d `flex_attention` with the block mask of the same pattern) and SDPA "
        "(`scaled_dot_product_attention`: causal where the pattern is causal, dense otherwise) on the same "
        "inputs, in the same process, bf16 unless the section says otherwise.",
        "- Each implementation is called once before timing (compilation, autotuning and block tables are not "
        "timed, except where a section says that tables or masks are built inside every call).",
        "- Times are medians of `triton.testing.do_bench` (it empties the L2 cache before each call). In "
        + (", ".join(f"*{t}*" for t in interleaved) or "no section")
        + ", the implementations are timed in five interleaved rounds, the order alternating from round to "
        "round, and the reported time is the median round: a GPU's clock drifts within seconds, and peers timed "
        "one after the other would carry that drift into their ratio. `by round` shows the spread of the "
        "per-round ratios. The other sections time each implementation once, one after the other.",
        "- Effective TFLOP/s = 4 * allowed pairs * head_dim * heads * batch / time for a forward pass (two "
        "matrix products of 2 * head_dim FLOPs per allowed pair); forward + backward counts 3.5 times that (the "
        "backward's five products against the forward's two). Pairs are counted exactly from the pattern. "
        "SDPA's figure counts every pair it computes (all N * N, or half of them when causal).",
        "- `ours / Flex` (and `ours vs SDPA`) is the peer's time divided by ours: above 1 ours is faster.",
        "- Tile efficiency = allowed pairs / pairs in the tiles a kernel visits.",
        "",
    ]


def _measured(d: dict[str, Any]) -> str:
    """When a file's numbers were taken: its run's date, or the span of its rows' own dates."""
    meta = _meta(d)
    dates = sorted({r["date"][:16].replace("T", " ") for r in _rows(d) if isinstance(r.get("date"), str)})
    if len(dates) > 1:
        return f"{dates[0]} to {dates[-1]} UTC"
    date = dates[0] if dates else str(meta.get("date", "?"))[:16].replace("T", " ")
    return f"{date} UTC" if date != "?" else "not recorded"


def environment(results: Path) -> list[str]:
    """The card, torch and triton of every section, from each file's run info."""
    rows = []
    for name, title in SECTIONS:
        d = _load(results, name)
        if d is None:
            continue
        meta = _meta(d)
        rows.append([title, str(meta["machine"] or "not recorded"), str(meta.get("torch")),
                     str(meta.get("triton")), _measured(d)])  # fmt: skip
    context = "Where each section's numbers come from, as its benchmark recorded it."
    return _section("Environment", context, ["section", "card", "torch", "triton", "measured"], rows)


@dataclass(frozen=True)
class Comparison:
    """One timed case: ours against one peer, in the same run."""

    section: str
    case: str
    ours_ms: float
    peer: str
    peer_ms: float


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and x > 0 else None


def _pairs(section: str, case: str, ours: Any, peers: list[tuple[str, Any]]) -> list[Comparison]:
    """Comparisons for one case, leaving out what was not measured (skipped, failed, out of memory)."""
    o = _number(ours)
    return [Comparison(section, case, o, peer, t) for peer, x in peers if o is not None and (t := _number(x)) is not None]


def comparisons(results: Path) -> list[Comparison]:
    """Every ours-against-a-peer time pair in the committed files."""
    out: list[Comparison] = []
    if d := _load(results, "forward"):
        for r in d["forward"]:
            out += _pairs(TITLES["forward"], r["pattern"], r["ours_ms"],
                          [("FlexAttention", r.get("flex_ms")), ("SDPA", r.get("sdpa_dense_ms"))])  # fmt: skip
    if d := _load(results, "fwd_bwd"):
        for r in d["fwd_bwd"]:
            out += _pairs(TITLES["fwd_bwd"], r["pattern"], r["ours_fwd_bwd_ms"],
                          [("FlexAttention", r.get("flex_fwd_bwd_ms")), ("SDPA", r.get("sdpa_dense_fwd_bwd_ms"))])  # fmt: skip
    if d := _load(results, "layouts"):
        for r in d["forward"]:
            out += _pairs(TITLES["layouts"], f"{r['pattern']} fwd", r["ours"]["ms"], [("FlexAttention", r.get("flex_ms"))])
            out += _pairs(TITLES["layouts"], f"{r['pattern']} fwd+bwd", r.get("ours_fwd_bwd_ms"),
                          [("FlexAttention", r.get("flex_fwd_bwd_ms"))])  # fmt: skip
    if d := _load(results, "selectors"):
        for r in d["rows"]:
            out += _pairs(TITLES["selectors"], f"N={r['N']}", r["ours_ms"],
                          [("FlexAttention", r.get("flex_ms")), ("SDPA causal", r.get("sdpa_causal_ms"))])  # fmt: skip
    if d := _load(results, "selectors_incall"):
        for r in d["rows"]:
            out += _pairs(TITLES["selectors_incall"], f"N={r['N']}", r["ours_ms"],
                          [("SDPA causal", r.get("sdpa_causal_ms"))])  # fmt: skip
    if d := _load(results, "varlen"):
        res = d["results"]
        for which in ("fwd", "fwd+bwd"):
            ours = res.get("ours", {}).get(which, {}).get("ms")
            out += _pairs(TITLES["varlen"], which, ours, [
                ("torch varlen_attn", res.get("varlen_attn", {}).get(which, {}).get("ms")),
                ("Flex + create_block_mask", res.get("flex", {}).get(which, {}).get("ms"))])  # fmt: skip
    if d := _load(results, "scaling"):
        for r in d["rows"]:
            case = f"{r['pattern']} D={r['D']} {r['pass']} N={r['N']}"
            out += _pairs(TITLES["scaling"], case, r.get("ours_ms"),
                          [("FlexAttention", r.get("flex_ms")), ("SDPA", r.get("sdpa_dense_ms"))])  # fmt: skip
    if d := _load(results, "graphs"):
        for r in d["rows"]:
            case = f"{r['pattern']} N={r['N']} D={r['D']}"
            out += _pairs(TITLES["graphs"], f"{case} eager", r.get("ours_ms"), [("FlexAttention", r.get("flex_ms"))])
            out += _pairs(TITLES["graphs"], f"{case} graph", r.get("ours_graph_ms"),
                          [("FlexAttention", r.get("flex_graph_ms"))])  # fmt: skip
    return out + later_comparisons(results)


def later_comparisons(results: Path) -> list[Comparison]:
    """The ours-against-a-peer pairs of the decode, model and new-pattern benchmarks."""
    out: list[Comparison] = []
    if d := _load(results, "decode"):
        for r in d["rows"]:
            case, ms = f"{r['pattern']} context {r['N']} B={r['B']} Nq={r['Nq']}", r["ms"]
            out += _pairs(TITLES["decode"], case, ms.get("ours"),  # eager against eager peers
                          [("SDPA", ms.get("sdpa_whole_cache")), ("Flex decode", ms.get("flex_decode")),
                           ("FA4 paged", ms.get("fa4_paged")),
                           ("FA4 paged, the window without sinks", ms.get("fa4_paged_window_no_sink"))])  # fmt: skip
        for r in d.get("selectors", []):
            out += _pairs(TITLES["decode"], f"{r['pattern']} context {r['N']} B={r['B']}", r["ms"]["topk_window"],
                          [("dense causal (ours)", r["ms"]["dense_causal"]), ("SDPA", r["ms"]["sdpa_whole_cache"])])  # fmt: skip
    if d := _load(results, "hf"):
        t = d["training"]
        for peer in ("flex_attention", "sdpa"):
            if peer in t:
                out += _pairs(TITLES["hf"], "training step", t["patterndsl"]["median_step_ms"], [(peer, t[peer]["median_step_ms"])])
    if d := _load(results, "nsa"):
        for r in d["rows"]:
            out += _pairs(TITLES["nsa"], f"N={r['N']} fwd", r["nsa_fwd_ms"], [("SDPA causal", r["sdpa_fwd_ms"])])
            out += _pairs(TITLES["nsa"], f"N={r['N']} fwd+bwd", r["nsa_fwd_bwd_ms"], [("SDPA causal", r["sdpa_fwd_bwd_ms"])])
    if d := _load(results, "minference"):
        out += _pairs(TITLES["minference"], "prefill", d["ours_ms"],
                      [("FlexAttention", d["flex_total_ms"]), ("SDPA causal", d["sdpa_causal_ms"])])  # fmt: skip
    if d := _load(results, "video_dit"):
        out += _pairs(TITLES["video_dit"], "fwd", d["ours_best"]["ms"],
                      [("FlexAttention", d["flex_ms"]), ("SDPA", d["sdpa_dense_ms"])])  # fmt: skip
        if fb := d.get("fwd_bwd"):
            out += _pairs(TITLES["video_dit"], "fwd+bwd", fb["ours_ms"],
                          [("FlexAttention", fb["flex_ms"]), ("SDPA", fb["sdpa_ms"])])  # fmt: skip
    if d := _load(results, "context_parallel"):
        for r in d["rows"]:
            o = r["ours"]
            out += _pairs(TITLES["context_parallel"], f"{r['pattern']} fwd", o["fwd_ms"], [("single call", o["single_fwd_ms"])])
            out += _pairs(TITLES["context_parallel"], f"{r['pattern']} fwd+bwd", o["fwd_bwd_ms"],
                          [("single call", o["single_fwd_bwd_ms"])])  # fmt: skip
    if d := _load(results, "peers"):
        for c in d["cases"]:
            got = c.get("peers", {})
            if "ours" in got:
                out += _pairs(TITLES["peers"], f"{c['pattern']} D={c['d']} {c['pass']}", got["ours"]["ms"],
                              [(name, got[p]["ms"]) for p, name in PEER_NAMES if p in got])  # fmt: skip
    if d := _load(results, "flex_mask"):
        for r in d["rows"]:
            out += _pairs(TITLES["flex_mask"], f"{r['pattern']} N={r['n']}", r["ours_ms"],
                          [("create_block_mask", r["create_block_mask_ms"])])  # fmt: skip
    return out


def weak_spots_section(comps: list[Comparison]) -> list[str]:
    """Every comparison where the peer took less time than ours: by section in page order, then the largest
    gap first."""
    order = {title: k for k, (_, title) in enumerate(SECTIONS)}
    weak = sorted((c for c in comps if c.peer_ms < c.ours_ms),
                  key=lambda c: (order.get(c.section, len(order)), c.peer_ms / c.ours_ms))  # fmt: skip
    if not weak:
        return ["## Known weak spots", "", f"None: ours was the faster in all {len(comps)} comparisons.", ""]
    context = (f"Derived from the files behind the tables above: the {len(weak)} of {len(comps)} comparisons (ours "
               "against one peer, same run) in which the peer took less time than ours. A ratio within a few "
               "percent of 1 is inside the spread that the `by round` columns show.")  # fmt: skip
    rows = [[c.section, c.case, f"{c.ours_ms:.3f}", c.peer, f"{c.peer_ms:.3f}", f"{c.peer_ms / c.ours_ms:.3f}x"]
            for c in weak]  # fmt: skip
    return _section("Known weak spots", context, ["section", "case", "ours ms", "peer", "peer ms", "peer / ours"], rows)


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
    if any(a.startswith("-") for a in argv) or len(argv) > 2 or (argv and not Path(argv[0]).is_dir()):
        print("usage: python benchmarks/report.py [RESULTS_DIR [PAGE.md]]  (RESULTS_DIR: a folder of *_h100.json)",
              file=sys.stderr)
        return 2
    results = Path(argv[0]) if argv else ROOT / "benchmarks/results"
    page = Path(argv[1]) if len(argv) > 1 else ROOT / "docs/performance.md"
    picture = page.parent / "img" / "benchmarks.png"
    lines, bars = sections(results)
    head = [
        "# Performance",
        "",
        "Generated by `python benchmarks/report.py` from the JSON files in benchmarks/results/ (do not edit by hand).",
        "",
        *method(results),
        *environment(results),
        "## Results",
        "",
        f"![speed vs FlexAttention](img/{picture.name})",
        "",
    ]
    picture.parent.mkdir(parents=True, exist_ok=True)
    plot(bars, picture)
    text = "\n".join(head + lines + weak_spots_section(comparisons(results))).rstrip("\n") + "\n"
    _write(page, text)
    print(f"wrote {page} and {picture} ({len(bars)} measurements)")
    return 0


def _write(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a page."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
