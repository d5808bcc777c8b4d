# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""The 1-D patterns across sequence lengths and head dims, on the GPU: ours (the module as users get it,
autotuned) vs torch.compile'd FlexAttention (the same pattern's block mask, built outside the timing) vs
dense SDPA, forward and forward+backward, each (pattern, N, D, pass) measured side by side in one run.

    python benchmarks/bench_scaling.py OUT.json [--resume PRIOR.json]

BENCH_NS (default 4096,16384,65536,131072), BENCH_DS (64,128), BENCH_PASSES (fwd,fwd+bwd), BENCH_ONLY
(pattern names), BENCH_DEADLINE (seconds: what would start after it is left out and said so). The JSON is
rewritten after every measurement, so a run cut short keeps its rows; `--resume` skips the (pattern, N, D,
pass) rows a previous run's JSON already holds and carries them over, so the grid can be filled over several
device calls. A dry run on the CPU: BENCH_DEVICE=cpu TRITON_INTERPRET=1 BENCH_NS=128 BENCH_DS=16.
B=1, H=16 (2 on the CPU), bf16 (float32 on the CPU). Useful FLOPs = 4 * allowed pairs * D * H * B forward,
3.5x that forward+backward; allowed pairs counted exactly (patterndsl.analysis).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
from bench_forward import PATTERNS
from runinfo import run_info
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import patterndsl as P
from patterndsl.analysis.count import row_stats

DEV = os.environ.get("BENCH_DEVICE", "cuda")
B, H, DT = (1, 16, torch.bfloat16) if DEV == "cuda" else (1, 2, torch.float32)
NS = [int(x) for x in os.environ.get("BENCH_NS", "4096,16384,65536,131072").split(",")]
DS = [int(x) for x in os.environ.get("BENCH_DS", "64,128").split(",")]
PASSES = [x for x in os.environ.get("BENCH_PASSES", "fwd,fwd+bwd").split(",") if x]
ONLY = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
DEADLINE = time.perf_counter() + float(os.environ.get("BENCH_DEADLINE", "1e9"))


def timed(fn) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def key(r: dict) -> tuple:
    return (r["pattern"], r["N"], r["D"], r["pass"])


def measure(name: str, src: str, mm, causal: bool, n: int, d: int, which: str, flex) -> dict:
    mod = P.compile(f"pattern p = {src}\n")
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, n, d, device=DEV, dtype=DT, generator=g) for _ in range(4))
    bm = create_block_mask(mm, None, None, n, n, device=DEV, _compile=DEV == "cuda")
    pairs = row_stats(P.loads(f"pattern p = {src}\n").patterns[0].body, n).pairs
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if which == "fwd":
        calls = (lambda: mod.attention(q, k, v), lambda: flex(q, k, v, block_mask=bm),
                 lambda: sdpa(q, k, v, is_causal=causal))  # fmt: skip
    else:
        qkv = [x.requires_grad_() for x in (q, k, v)]
        calls = (lambda: torch.autograd.grad(mod.attention(*qkv), qkv, do),
                 lambda: torch.autograd.grad(flex(*qkv, block_mask=bm), qkv, do),
                 lambda: torch.autograd.grad(sdpa(*qkv, is_causal=causal), qkv, do))  # fmt: skip
        if DEV != "cuda":  # Flex has no CPU backward: the dry run checks the rest of the script with SDPA
            calls = (calls[0], calls[2], calls[2])
    row = {"pattern": name, "N": n, "D": d, "pass": which, "allowed_pairs": pairs, "density": pairs / n / n}
    flops = (1 if which == "fwd" else 3.5) * 4 * pairs * d * H * B
    with torch.set_grad_enabled(which != "fwd"):
        outs = []
        for who, f in zip(("ours", "flex", "sdpa_dense"), calls, strict=True):
            try:  # one peer out of memory (dense SDPA's backward at the largest N) leaves the others' numbers
                out = f()
                outs.append((out,) if which == "fwd" else out)
                row[f"{who}_ms"] = timed(f)
            except torch.OutOfMemoryError as e:
                outs.append(None)
                row[f"{who}_ms"] = None
                row[f"{who}_error"] = f"out of memory: {str(e)[:100]}"
                torch.cuda.empty_cache()
    a, b = outs[0], outs[1]
    if a is not None and b is not None:
        row["rel_err_vs_flex"] = max(((x.float() - y.float()).norm() / y.float().norm()).item()
                                     for x, y in zip(a, b, strict=True))  # fmt: skip
    for who in ("ours", "flex"):
        if row[f"{who}_ms"] is not None:
            row[f"{who}_tflops"] = flops / row[f"{who}_ms"] / 1e9
    if row["ours_ms"] is not None and row["flex_ms"] is not None:
        row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
    row["date"] = run_info()["date"]
    return row


def main(argv: list[str]) -> int:
    out = argv[0] if argv else "docs/benchmarks/scaling_h100.json"
    prior: list[dict] = []
    if "--resume" in argv:
        prior = json.loads(open(argv[argv.index("--resume") + 1], encoding="utf-8").read())["rows"]
    rows = list(prior)
    done = {key(r) for r in prior}
    skipped: list[str] = []
    # one compiled Flex per (pattern, N, D, pass): past dynamo's recompile limit (8) it would fall back to eager
    # flex_attention silently (N x N scores: 10-60x slower, out of memory at 65536), which the 19:03 run hit
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    flex = torch.compile(flex_attention, dynamic=False) if DEV == "cuda" else flex_attention
    todo = [(p, n, d, w) for p in PATTERNS if not ONLY or p[0] in ONLY for d in DS for n in NS for w in PASSES]
    for (name, src, mm, causal), n, d, which in todo:
        if (name, n, d, which) in done:
            continue
        if time.perf_counter() > DEADLINE:
            skipped.append(f"{name} N={n} D={d} {which}")
            continue
        try:
            row = measure(name, src, mm, causal, n, d, which, flex)
        except torch.OutOfMemoryError as e:  # SDPA's or Flex's backward at the largest N
            row = {"pattern": name, "N": n, "D": d, "pass": which, "error": f"out of memory: {str(e)[:120]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(out, rows, skipped)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    save(out, rows, skipped)
    if skipped:
        print(f"not measured (deadline): {len(skipped)} rows", flush=True)
    return 0


def save(path: str, rows: list[dict], skipped: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**run_info(), "shape": {"B": B, "H": H, "dtype": str(DT)}, "rows": rows, "not_measured": skipped},
                  f, indent=1)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
