# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Layouts on the GPU, one run: patterns whose allowed pairs scatter in row-major order, run by patterndsl
with its chosen token layout (and, for reference, in the plain order) vs torch.compile'd FlexAttention
(the same pattern as a mask_mod, its own 128 x 128 block mask) vs dense SDPA.

B=1, H=16, D=128, bf16, N=16384 for all four. Effective TFLOP/s = 4 * allowed pairs * D * H * B / time
(pairs counted exactly by patterndsl.analysis). Tile efficiency = allowed pairs / pairs of visited tiles.
Writes JSON and a markdown table (argv[1], default docs/benchmarks/); `--markdown FILE.json` only
re-renders the table from a JSON file. BENCH_BWD=1 also times forward + backward (ours with the best
forward config's module, Flex with its block mask); BENCH_ONLY=name,... runs some patterns.
"""

from __future__ import annotations

import json
import os
import sys

B, H, D = 1, 16, 128

PATTERNS = [
    # name, .pat source, flex mask_mod maker, SDPA is_causal
    ("neighborhood_2d_128x128_k13", "layout g = grid(128, 128)\npattern p = neighborhood(g, kernel=13)\n",
     ("na", (128, 128), (13, 13), (1, 1), (False, False)), False),
    ("dilated_2d_128x128_k7_d4", "layout g = grid(128, 128)\npattern p = neighborhood(g, kernel=7, dilation=4)\n",
     ("na", (128, 128), (7, 7), (4, 4), (False, False)), False),
    ("video_16x32x32_k3x7x7_causal_t",
     "layout g = grid(16, 32, 32)\npattern p = neighborhood(g, kernel=(3, 7, 7), causal=(true, false, false))\n",
     ("na", (16, 32, 32), (3, 7, 7), (1, 1, 1), (True, False, False)), False),
    ("dilated_window_4x1024", "pattern p = causal & window(1023, dilation=4)\n", ("dilated", 1023, 4), True),
]  # fmt: skip
N = 16384
LAYOUT_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
PLAIN_CONFIGS = [(128, 64, 8, 3)]
PLAIN_FOR = {"dilated_window_4x1024"}


def _mask_mod(spec):  # type: ignore[no-untyped-def]
    import torch

    if spec[0] == "dilated":
        _, r, d = spec

        def dilated(b, h, q, k):  # type: ignore[no-untyped-def]
            return (k <= q) & (q - k <= r * d) & ((q - k) % d == 0)

        return dilated
    _, dims, kernel, dilation, causal = spec
    strides = [1] * len(dims)
    for a in range(len(dims) - 2, -1, -1):
        strides[a] = strides[a + 1] * dims[a + 1]

    def axis(x, y, n, kk, d, c):  # type: ignore[no-untyped-def]
        g = x % d
        p = x // d
        m = (n - g + d - 1) // d
        same = (y % d) == g
        pos = y // d
        if c:
            return same & (pos <= p) & (pos >= p - kk + 1)
        start = torch.clamp(torch.minimum(p - kk // 2, m - kk), min=0)
        return same & (pos >= start) & (pos < start + kk)

    def na(b, h, q, k):  # type: ignore[no-untyped-def]
        ok = None
        for a in range(len(dims)):
            x = (q // strides[a]) % dims[a]
            y = (k // strides[a]) % dims[a]
            t = axis(x, y, dims[a], kernel[a], dilation[a], causal[a])
            ok = t if ok is None else ok & t
        return ok

    return na


def main() -> None:
    import torch
    import triton
    from runinfo import run_info
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import patterndsl as P
    from patterndsl import layout as L
    from patterndsl.analysis.count import row_stats
    from patterndsl.semantics import predicate

    def med(fn, grads=None) -> float:  # type: ignore[no-untyped-def]
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grads, return_mode="median"))

    outdir = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    for name, src, spec, causal in PATTERNS:
        if only and name not in only:
            continue
        body = P.loads(src).patterns[0].body
        pairs = row_stats(body, N).pairs
        flops = 4 * pairs * D * H * B
        pred = predicate(body)
        row: dict = {"pattern": name, "source": src.strip().splitlines()[-1], "allowed_pairs": pairs}
        best = None
        plain = PLAIN_CONFIGS if name in PLAIN_FOR else []  # the plain order once, where it ran before (v1/v2)
        for layout, configs in ((True, LAYOUT_CONFIGS), (False, plain)):
            for cfg in configs:
                mod = P.compile(src, block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3], layout=layout)
                out = mod.attention(q, k, v)
                t = med(lambda: mod.attention(q, k, v))
                lay = L.choose(body, cfg[0], cfg[1]) if layout else None
                visited = L.visited_tiles(pred, lay, N, cfg[0], cfg[1])
                rec = {
                    "config": list(cfg), "layout": L.describe(lay), "ms": t, "tflops": flops / t / 1e9,
                    "tile_efficiency": pairs / (visited * cfg[0] * cfg[1]),
                }  # fmt: skip
                row.setdefault("ours_layout" if layout else "ours_plain", []).append(rec)
                print(name, rec, flush=True)
                if layout and (best is None or t < best[0]["ms"]):
                    best = (rec, out, mod)
        assert best is not None
        bm = create_block_mask(_mask_mod(spec), None, None, N, N, device="cuda")
        fo = flex(q, k, v, block_mask=bm)
        tf = med(lambda: flex(q, k, v, block_mask=bm))
        flex_tiles = int(bm.kv_num_blocks.sum()) + (
            int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
        )
        bq, bk = bm.BLOCK_SIZE
        ts = med(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
        err = ((best[1].float() - fo.float()).norm() / fo.float().norm()).item()
        if os.environ.get("BENCH_BWD"):  # forward + backward, FLOPs = 3.5 x the forward's (2.5 x for backward)
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(q)
            mod = best[2]
            t_fb = med(lambda: mod.attention(qg, kg, vg).backward(do), [qg, kg, vg])
            tf_fb = med(lambda: flex(qg, kg, vg, block_mask=bm).backward(do), [qg, kg, vg])
            row.update(
                ours_fwd_bwd_ms=t_fb,
                flex_fwd_bwd_ms=tf_fb,
                ours_fwd_bwd_tflops=3.5 * flops / t_fb / 1e9,
                flex_fwd_bwd_tflops=3.5 * flops / tf_fb / 1e9,
                fwd_bwd_speedup_vs_flex=tf_fb / t_fb,
            )
            print(f"{name:32s} fwd+bwd ours {t_fb:.3f} ms | flex {tf_fb:.3f} ms | x{tf_fb / t_fb:.2f}", flush=True)
        plain_best = min(row["ours_plain"], key=lambda r: r["ms"]) if "ours_plain" in row else None
        row.update(
            ours=best[0],
            ours_plain_best=plain_best,
            flex_ms=tf,
            flex_tflops=flops / tf / 1e9,
            flex_tile_efficiency=pairs / (flex_tiles * bq * bk),
            flex_block=[bq, bk],
            sdpa_dense_ms=ts,
            density=pairs / N / N,
            speedup_vs_flex=tf / best[0]["ms"],
            rel_err_vs_flex=err,
        )
        rows.append(row)
        print(
            f"{name:32s} ours {best[0]['ms']:.3f} ms {best[0]['tflops']:.1f} TF/s eff {best[0]['tile_efficiency']:.1%} "
            f"| plain {plain_best['ms'] if plain_best else float('nan'):.3f} | flex {tf:.3f} ms {row['flex_tflops']:.1f} TF/s eff "
            f"{row['flex_tile_efficiency']:.1%} | sdpa {ts:.3f} | x{tf / best[0]['ms']:.2f} | err {err:.1e}",
            flush=True,
        )
    result = {
        **run_info(),
        "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16"},
        "forward": rows,
    }
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "layouts_h100.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(outdir, "layouts_h100.md"), "w") as f:
        f.write(markdown(result))


def markdown(result: dict) -> str:
    s = result["shape"]
    out = [
        f"# Layouts benchmark ({result['machine']}, {result['date']}, torch {result['torch']}, triton {result['triton']})",
        "",
        f"B={s['B']}, H={s['H']}, N={s['N']}, D={s['D']}, bf16, forward. Median of `triton.testing.do_bench`. "
        "TFLOP/s = 4 * allowed pairs * D * H * B / time. Tile efficiency = allowed pairs / pairs of visited tiles.",
        "",
        "| pattern | density | ours ms | ours TFLOP/s | ours tile eff. | layout (config) | plain order ms | "
        "Flex ms | Flex TFLOP/s | Flex tile eff. | SDPA dense ms | ours / Flex speed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["forward"]:
        o, p = r["ours"], r["ours_plain_best"]
        plain_ms = f"{p['ms']:.3f}" if p else "-"
        out.append(
            f"| {r['pattern']} | {r['density']:.4f} | {o['ms']:.3f} | {o['tflops']:.1f} | {o['tile_efficiency']:.1%} | "
            f"{o['layout']} ({', '.join(map(str, o['config']))}) | {plain_ms} | {r['flex_ms']:.3f} | "
            f"{r['flex_tflops']:.1f} | {r['flex_tile_efficiency']:.1%} | {r['sdpa_dense_ms']:.3f} | "
            f"{r['speedup_vs_flex']:.2f}x |"
        )
    fb = [r for r in result["forward"] if "ours_fwd_bwd_ms" in r]
    if fb:
        out += ["", "Forward + backward (FLOPs 3.5 x the forward's):", "",
                "| pattern | ours ms | ours TFLOP/s | Flex ms | Flex TFLOP/s | ours / Flex speed |",
                "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in fb:
            out.append(
                f"| {r['pattern']} | {r['ours_fwd_bwd_ms']:.3f} | {r['ours_fwd_bwd_tflops']:.1f} | "
                f"{r['flex_fwd_bwd_ms']:.3f} | {r['flex_fwd_bwd_tflops']:.1f} | {r['fwd_bwd_speedup_vs_flex']:.2f}x |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--markdown":
        with open(sys.argv[2]) as f:
            sys.stdout.write(markdown(json.load(f)))
    else:
        main()
