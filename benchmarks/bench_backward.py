# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Forward + backward attention on the GPU, one run: patterndsl (Triton fwd + bwd over block tables) vs
torch.compile'd FlexAttention (same pattern's block mask, backward through it) vs dense SDPA.

B=1, H=16, N=16384, D=128, bf16, the five patterns of bench_forward.py. One step = forward, then
torch.autograd.grad of (q, k, v) for a fixed dO (no .grad accumulation). Also our forward alone (no_grad),
so backward = step - forward. FLOPs of a step = 3.5 * 4 * allowed pairs * D * H * B (the backward does
five matrix products per tile against the forward's two: 2.5 x the forward's FLOPs).

Phase 1 compiles everything (ours and Flex); if BENCH_WAIT_PID is set it then waits for that process
(e.g. the GPU tests, run alongside to overlap compilation) before any timing. Writes JSON to argv[1]
(default docs/benchmarks/) after every pattern, so a cut-off run still leaves its rows.
BENCH_ONLY=causal,... picks patterns; BENCH_BWD_CONFIG=BM1,BN1,BM2,BN2,warps,stages (or ...,warps1,stages1,warps2,stages2) overrides the backward tiles.
"""

from __future__ import annotations

import json
import os
import sys
import time
from statistics import median

import torch
from bench_forward import DT, PATTERNS, B, D, H, N, allowed_pairs, med, side_by_side
from runinfo import backward_launches, run_info
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import patterndsl as P


def _wait(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=DT) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    flex = torch.compile(flex_attention, dynamic=False)
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    todo = [p for p in PATTERNS if not only or p[0] in only]

    # phase 1: compile (and check gradients against Flex)
    t0 = time.perf_counter()
    prepared = []
    for name, src, mm, causal in todo:
        cfg = os.environ.get("BENCH_BWD_CONFIG")  # e.g. "32,64,64,32,8,3" (BM1, BN1, BM2, BN2, warps, stages)
        attn = P.compile(f"pattern p = {src}\n", bwd_config=tuple(int(x) for x in cfg.split(",")) if cfg else None)
        with backward_launches() as launched:  # the backward tiles as launched (tuned): a token layout takes pointer loads
            ours = torch.autograd.grad(attn(q, k, v), (q, k, v), do)
        bm = create_block_mask(mm, None, None, N, N, device="cuda")
        theirs = torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do)
        errs = {f"rel_err_{g}_vs_flex": _rel(a, b) for g, a, b in zip(("dq", "dk", "dv"), ours, theirs, strict=True)}
        prepared.append((name, src, causal, attn, bm, errs, launched))
        print(f"compiled {name} ({time.perf_counter() - t0:.0f} s) {errs}", flush=True)
    wait = os.environ.get("BENCH_WAIT_PID")
    if wait:
        _wait(int(wait))
        print(f"waited for pid {wait} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # phase 2: time
    rows = []
    for name, src, causal, attn, bm, errs, launched in prepared:
        with torch.no_grad():
            t_fwd = med(lambda: attn(q, k, v))
        rounds = side_by_side({
            "ours": lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), do),
            "flex": lambda: torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do),
            "sdpa": lambda: torch.autograd.grad(
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), do),
        })  # fmt: skip
        t_ours, t_flex, t_sdpa = (median(rounds[x]) for x in ("ours", "flex", "sdpa"))
        pairs = allowed_pairs(attn)
        flops = 3.5 * 4 * pairs * D * H * B
        row = {
            "pattern": name,
            "source": src,
            "density": pairs / N / N,
            "ours_fwd_ms": t_fwd,
            "ours_fwd_bwd_ms": t_ours,
            "ours_bwd_ms": t_ours - t_fwd,
            "flex_fwd_bwd_ms": t_flex,
            "sdpa_dense_fwd_bwd_ms": t_sdpa,
            "ours_tflops": flops / t_ours / 1e9,
            "flex_tflops": flops / t_flex / 1e9,
            "speedup_vs_flex": t_flex / t_ours,
            "bwd_config": list(launched["tiles"]),  # as launched (tuned): a token layout takes pointer loads
            "bwd_tma": bool(launched["tma"]),
            "rounds_ms": rounds,
            "date": run_info()["date"],
            **errs,
        }
        rows.append(row)
        print(
            f"{name:22s} ours {t_ours:7.3f} ms (fwd {t_fwd:.3f}) {row['ours_tflops']:6.1f} TF/s | flex {t_flex:7.3f} ms"
            f" {row['flex_tflops']:6.1f} TF/s | sdpa {t_sdpa:7.3f} | x{t_flex / t_ours:.2f} vs flex",
            flush=True,
        )
        result = {
            **run_info(),
            "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16"},
            "fwd_bwd": rows,
        }
        with open(os.path.join(outdir, "fwd_bwd_h100.json"), "w") as f:
            json.dump(result, f, indent=1)
        write_markdown(result, os.path.join(outdir, "fwd_bwd_h100.md"))


def write_markdown(res: dict, path: str) -> None:
    """The committed table (docs/benchmarks/fwd_bwd_h100.md) from the JSON; rows may come from different runs
    (each row's `date`, when present, says which)."""
    sh = res["shape"]
    lines = [
        f"# Forward + backward benchmark ({res['machine']}, {res['date']}, torch {res['torch']}, triton {res['triton']})",
        "",
        f"B={sh['B']}, H={sh['H']}, N={sh['N']}, D={sh['D']}, {sh['dtype']}. One step = forward + `torch.autograd.grad` "
        "of q, k, v. Ours, Flex and SDPA of a row timed side by side in one run, in five interleaved rounds (alternating "
        "order) of `triton.testing.do_bench` medians; the median round. "
        "TFLOP/s = 3.5 * 4 * allowed pairs * D * H * B / time. Backward tiles: (BM1, BN1, BM2, BN2, warps, stages), "
        "or with separate dK/dV and dQ warps/stages (..., warps1, stages1, warps2, stages2); TMA: Q/dO and K/V tiles "
        "through tensor descriptors. Gradient rel. error vs Flex: max over dq, dk, dv.",
    ]
    if res.get("note"):
        lines += ["", res["note"] + "."]
    lines += [
        "",
        "| pattern | density | ours fwd+bwd ms | ours fwd ms | ours bwd ms | ours TFLOP/s | Flex fwd+bwd ms | Flex TFLOP/s "
        "| dense SDPA fwd+bwd ms | ours / Flex speed | grad rel. err vs Flex | backward tiles | TMA | measured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["fwd_bwd"]:
        err = max(r[f"rel_err_{g}_vs_flex"] for g in ("dq", "dk", "dv"))
        lines.append(
            f"| {r['pattern']} | {r['density']:.4f} | {r['ours_fwd_bwd_ms']:.3f} | {r['ours_fwd_ms']:.3f} "
            f"| {r['ours_bwd_ms']:.3f} | {r['ours_tflops']:.1f} | {r['flex_fwd_bwd_ms']:.3f} | {r['flex_tflops']:.1f} "
            f"| {r['sdpa_dense_fwd_bwd_ms']:.3f} | {r['speedup_vs_flex']:.2f}x | {err:.1e} "
            f"| {tuple(r['bwd_config'])} | {'yes' if r.get('bwd_tma') else 'no'} | {r.get('date', res['date'])} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
