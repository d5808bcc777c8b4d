"""Token layout or plain order, side by side on the GPU, for every library pattern that the compiler gives a
token layout: the compiled default (its layout) run two ways, gathered into the layout's order on the fast
kernel (`layout_gather=True`) and read in place by the pointer-load kernel (`layout_gather=False`),
against the same pattern with `layout=False` (the plain order, run by the fast kernel with TMA at the default
tiles).

The layout chooser ranks by tiles visited; the two paths differ in what a visited pair costs, and this run
measures it. B=1, H=16, D=128, bf16, N = the pattern's own grid, configured tiles (PATTERNDSL_AUTOTUNE=0),
forward and forward+backward in interleaved rounds (median round of `do_bench` medians). Each row records
both paths' visited pairs (`tiles visited * tile area`), so the per-pair cost ratio is read off the file.
Writes JSON to argv[1] after every pattern; BENCH_DEADLINE (seconds, default 240) skips what would start late.

    python benchmarks/bench_layout_choice.py OUT.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ["PATTERNDSL_AUTOTUNE"] = "0"

ROOT = Path(__file__).resolve().parent.parent
# library patterns with a token layout: the 3-D and 2-D neighborhoods whose layout saves fewest pairs first
CASES = (
    ("video.pat", "video_causal"), ("video_dit.pat", "video_dit"), ("nat.pat", "nat"),
    ("image_transformer.pat", "local_2d"), ("radial.pat", "radial"), ("video.pat", "video_na"),
    ("gna.pat", "gna_blocked"), ("gna.pat", "gna_video"), ("nat.pat", "nat_causal"), ("axial.pat", "axial_causal"),
    ("gna.pat", "gna"), ("axial.pat", "criss_cross"), ("dinat.pat", "dinat_stage1"), ("axial.pat", "axial_col"),
)  # fmt: skip
B, H, D = 1, 16, 128


def _visited_pairs(attn: Any, body: Any, n: int) -> int:
    """Pairs in the tiles the forward visits at the module's configured head_dim-D tiles, in its token order."""
    from patterndsl import layout as L
    from patterndsl.runtime.forward import _config, _tiles
    from patterndsl.semantics import predicate

    bm, bn = _tiles(attn.spec, 0, *_config(attn.spec, D)[:2])
    lay = L.choose(body, bm, bn) if attn.spec.layouts[0] is not None else None
    return L.visited_tiles(predicate(body), lay, n, bm, bn) * bm * bn


def _under(attn: Any, gather: bool, fn: Any) -> Any:
    """fn() with the `layout_gather` option at `gather` (the backward runs under its forward's options)."""
    with attn.options(layout_gather=gather):
        return fn()


def main() -> None:
    import torch
    import triton

    import patterndsl as P
    from patterndsl import layout as L
    from patterndsl.cli.bench import interleaved

    sys.path.insert(0, str(Path(__file__).parent))
    from runinfo import run_info

    out_path = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks/results/layout_choice_h100.json")
    deadline = time.perf_counter() + float(os.environ.get("BENCH_DEADLINE", "240"))
    doc: dict[str, Any] = {"run": run_info(), "shape": {"B": B, "H": H, "D": D, "dtype": "bfloat16"}, "rows": []}

    def time_one(fn: Any) -> float:
        return float(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))

    for file, name in CASES:
        if time.perf_counter() > deadline:
            doc.setdefault("not_measured", []).append(f"{file}:{name} (deadline)")
            continue
        source = ROOT / "patterns" / file
        compiled = P.compile(source, name)
        # side -> (module, layout_gather)
        paths = {"layout": (compiled, True), "layout_in_place": (compiled, False),
                 "plain": (P.compile(source, name, layout=False), True)}  # fmt: skip
        body = P.load(source).get(name).body  # type: ignore[union-attr]
        grid = L._grid_of(body)
        if compiled.spec.layouts[0] is None or grid is None:
            doc.setdefault("not_measured", []).append(f"{file}:{name} (no layout)")
            continue
        n = grid[0].size
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        do = torch.randn_like(q)
        fns: dict[str, Any] = {}
        outs = {}
        for side, (attn, gather) in paths.items():
            with attn.options(layout_gather=gather):
                outs[side] = attn(q, k, v).float()
            fns[f"{side}_fwd"] = lambda a=attn, g=gather, q=q, k=k, v=v: _under(a, g, lambda: a(q, k, v))
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            fns[f"{side}_fwd_bwd"] = lambda a=attn, g=gather, qg=qg, kg=kg, vg=vg, do=do: _under(
                a, g, lambda: a(qg, kg, vg).backward(do))
            fns[f"{side}_fwd_bwd"]()
        torch.cuda.synchronize()
        rounds = interleaved(fns, time_one)
        med = {key: statistics.median(ts) for key, ts in rounds.items()}
        row = {
            "pattern": f"{file}:{name}", "N": n, "layout": compiled.spec.layouts[0].description,
            "max_abs_diff": float((outs["layout"] - outs["plain"]).abs().max()),
            "max_abs_diff_gather_in_place": float((outs["layout"] - outs["layout_in_place"]).abs().max()),
            "layout_visited_pairs": _visited_pairs(compiled, body, n),
            "plain_visited_pairs": _visited_pairs(paths["plain"][0], body, n),
            "ms": med, "rounds_ms": rounds,
            "plain_over_layout_fwd": med["plain_fwd"] / med["layout_fwd"],
            "plain_over_layout_fwd_bwd": med["plain_fwd_bwd"] / med["layout_fwd_bwd"],
            "in_place_over_gather_fwd": med["layout_in_place_fwd"] / med["layout_fwd"],
            "in_place_over_gather_fwd_bwd": med["layout_in_place_fwd_bwd"] / med["layout_fwd_bwd"],
        }  # fmt: skip
        for side in ("layout", "layout_in_place"):  # time per visited pair, against the plain order's
            row[f"per_pair_cost_ratio_fwd{side[6:]}"] = (med[f"{side}_fwd"] / row["layout_visited_pairs"]) / (
                med["plain_fwd"] / row["plain_visited_pairs"]
            )
        doc["rows"].append(row)
        print(f"{name:14s} N={n:6d} layout fwd {med['layout_fwd']:.3f} in place {med['layout_in_place_fwd']:.3f} "
              f"plain {med['plain_fwd']:.3f} | fwd+bwd {med['layout_fwd_bwd']:.3f} in place "
              f"{med['layout_in_place_fwd_bwd']:.3f} plain {med['plain_fwd_bwd']:.3f} | visited pairs layout/plain "
              f"{row['layout_visited_pairs'] / row['plain_visited_pairs']:.2f} | per-pair cost layout/plain "
              f"{row['per_pair_cost_ratio_fwd']:.2f} (in place {row['per_pair_cost_ratio_fwd_in_place']:.2f})",
              flush=True)  # fmt: skip
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        tmp.replace(out_path)


if __name__ == "__main__":
    main()
