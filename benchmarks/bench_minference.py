# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""MInference's vertical-slash prefill on the GPU, one run: patterns/minference.pat's `vertical_slash`
(1000 columns, 6096 diagonals scored from the last 64 queries, the first 30 columns and the last 100
diagonals always kept, as MInference does) by patterndsl, against FlexAttention with the same selection as
a block mask (built from the kept columns and diagonals as tensors, `BlockMask.from_kv_blocks`, its build
timed) and dense causal SDPA.

B=1, H=32 query heads over 8 KV heads (GQA), D=128, bf16, N = 131072 (BENCH_N). Inputs (`inputs`): local
attention with far lines and spread heavy columns, as a language model's vertical-slash heads have them
(uniform random q, k spread the kept diagonals over every tile and make any sparse kernel dense); the
JSON records how sparse the selection came out. The kernel's variants run beside it as `ours_<variant>_ms`
(their options in `variant_options`, their error against Flex in `variant_rel_err_vs_flex`). Rounds
interleave the methods; each figure is the median over rounds of `triton.testing.do_bench` medians. Ours
is timed whole (scoring, selection, tables, kernel); Flex as the same selection (timed separately, it is
ours) + its mask build + its kernel. Writes JSON to argv[1] (default benchmarks/results/minference.json)
after every round; BENCH_DEADLINE (seconds, default 420) skips what would start after it.
Run: python benchmarks/bench_minference.py OUT.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import triton
from runinfo import run_info

import patterndsl as P

DEV = os.environ.get("BENCH_DEVICE", "cuda")  # a dry run: BENCH_DEVICE=cpu TRITON_INTERPRET=1 BENCH_N=256 ...
B, H, HKV, D = 1, int(os.environ.get("BENCH_H", "32")), int(os.environ.get("BENCH_HKV", "8")), 128
N = int(os.environ.get("BENCH_N", "131072"))
DT = torch.bfloat16 if DEV == "cuda" else torch.float32  # (Triton's CPU interpreter has no bf16 dot)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DEFINES = {"v": int(os.environ.get("BENCH_V", "1000")), "s": int(os.environ.get("BENCH_S", "6096")), "last": 64,
           "sinks": 30, "w": 100}
LOCAL = float(os.environ.get("BENCH_LOCAL", "40"))  # inputs: logits of local attention at i = j
MARK = float(os.environ.get("BENCH_MARK", "30"))  # inputs: logits a heavy key column adds
ROOT = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "420"))
FLEX_BLOCK = 128
# the kernel's variants (Options.token_* and fold; the defaults: 64 query rows per program, 4 warps, 2 stages,
# early K/V loads, membership bits, the scale folded), timed here and checked by tests/gpu/test_gpu_tokens.py
VARIANTS: dict[str, dict[str, Any]] = {
    "8warps": {"token_warps": 8, "token_stages": 2},
    "4warps_3stages": {"token_warps": 4, "token_stages": 3},
    "1stage": {"token_stages": 1},
    "rows128": {"token_rows": 128},
    "rows128_3stages": {"token_rows": 128, "token_stages": 3},
    "bytes": {"token_bits": False},
    "late_kv": {"token_early_kv": False},
    "nofold": {"fold": False},
    "first_kernel": {"token_early_kv": False, "token_bits": False},
}


def med(fn: Any) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=3, rep=20, return_mode="median"))


def inputs() -> tuple[torch.Tensor, ...]:
    """q, k, v [B, heads, N, D] whose last queries pick a language model's kind of lines: two dimensions
    carry a slow rotation (period 4096 * 2 pi tokens), so q_i . k_j falls with |i - j| (local attention,
    revived every period: far lines), a third marks as many spread key columns per KV head as vertical keeps
    (+MARK logits: the heavy tokens a vertical line is), the rest is noise."""
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, H, N, D, device=DEV, generator=g)
    k = torch.randn(B, HKV, N, D, device=DEV, generator=g)
    t = torch.arange(N, device=DEV, dtype=torch.float32) / 4096
    amp = (LOCAL * D**0.5) ** 0.5  # LOCAL logits at i = j
    for x in (q, k):
        x[..., 0], x[..., 1] = amp * torch.cos(t), amp * torch.sin(t)
    heavy = torch.rand(HKV, N, device=DEV, generator=g).argsort(-1)[:, : DEFINES["v"]]
    mark = (MARK * D**0.5) ** 0.5
    q[..., 2] = mark
    k[..., 2] = 0.0
    k[0, torch.arange(HKV, device=DEV)[:, None], heavy, 2] = mark
    v = torch.randn(B, HKV, N, D, device=DEV, generator=g)
    return q.to(DT), k.to(DT), v.to(DT)


def flex_block_mask(cols: torch.Tensor, offs: torch.Tensor) -> Any:
    """Flex's BlockMask of the selection (causal & (column | diagonal | sink | window)), from tensors:
    every key block holding a kept column, every block a kept diagonal crosses, the sink and window
    blocks; the mask_mod decides pair by pair."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-N // FLEX_BLOCK)
    sinks, w = DEFINES["sinks"], DEFINES["w"]
    in_v = torch.zeros((H, N), dtype=torch.bool, device=DEV).scatter_(1, cols[0], True)
    in_s = torch.zeros((H, N), dtype=torch.bool, device=DEV).scatter_(1, offs[0], True)
    in_v[:, :sinks] = True
    in_s[:, : w] = True
    col_blocks = torch.zeros((H, nb), dtype=torch.bool, device=DEV).scatter_(1, cols[0] // FLEX_BLOCK, True)
    col_blocks[:, : -(-sinks // FLEX_BLOCK)] = True
    diag = torch.cat([offs[0], torch.arange(w, device=DEV).expand(H, -1)], 1)
    dblocks = torch.zeros((H, nb + 1), dtype=torch.bool, device=DEV)
    dblocks.scatter_(1, diag // FLEX_BLOCK, True)
    dblocks.scatter_(1, torch.where(diag % FLEX_BLOCK != 0, diag // FLEX_BLOCK + 1, nb), True)
    qb = torch.arange(nb, device=DEV)[:, None]
    kb = torch.arange(nb, device=DEV)[None, :]
    dense = (kb <= qb) & (col_blocks[:, None, :] | dblocks[:, (qb - kb).clamp(0, nb)])
    num = dense.sum(-1, dtype=torch.int32)[None]
    idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        d = q - k
        return (d >= 0) & (in_v[h, k] | in_s[h, d.clamp(min=0)])

    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(N, N))


def selection_figures(cols: torch.Tensor, offs: torch.Tensor) -> dict[str, float]:
    """How sparse the kept lines came out: tile diagonals (of 64) the diagonals touch and key blocks (of
    128) the columns fall in, as fractions, averaged over heads."""
    nt, nb = -(-N // 64), -(-N // FLEX_BLOCK)
    diag = torch.zeros((H, nt + 1), dtype=torch.bool, device=DEV)
    diag.scatter_(1, offs[0] // 64, True)
    diag.scatter_(1, (offs[0] + 63) // 64, True)
    blocks = torch.zeros((H, nb), dtype=torch.bool, device=DEV).scatter_(1, cols[0] // FLEX_BLOCK, True)
    return {"tile_diagonals": float(diag[:, :nt].float().mean()), "column_blocks": float(blocks.float().mean())}


def main() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    path = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "benchmarks" / "results" / "minference.json")
    attn = P.compile(ROOT / "patterns" / "minference.pat", "vertical_slash", DEFINES)
    q, k, v = inputs()
    flex = torch.compile(flex_attention, dynamic=False) if DEV == "cuda" else flex_attention
    with torch.no_grad():
        ours = attn.attention(q, k, v)
        cols, offs = attn.selected_tokens(q, k)[0]
        bm = flex_block_mask(cols, offs)
        fo = flex(q, k, v, block_mask=bm, enable_gqa=True)
    err = ((ours.float() - fo.float()).norm() / fo.float().norm()).item()
    sparsity = selection_figures(cols, offs)
    density = float(bm.kv_num_blocks.sum()) / (H * (N // FLEX_BLOCK) * (N // FLEX_BLOCK + 1) / 2)
    timings: dict[str, list[float]] = {}
    def ours(**opts: Any) -> Any:
        def run() -> Any:
            with attn.options(**opts):
                return attn.attention(q, k, v)

        return run

    variants = {f"ours_{name}_ms": o for name, o in VARIANTS.items()}
    with torch.no_grad():
        variant_err = {name: ((ours(**o)().float() - fo.float()).norm() / fo.float().norm()).item()
                       for name, o in variants.items()}
    methods = {
        "ours_ms": lambda: attn.attention(q, k, v),
        **{name: ours(**o) for name, o in variants.items()},
        "selection_ms": lambda: attn.selected_tokens(q, k),
        "flex_mask_build_ms": lambda: flex_block_mask(cols, offs),
        "flex_kernel_ms": lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
        "sdpa_causal_ms": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   enable_gqa=True),
    }
    result: dict[str, Any] = {}
    for r in range(ROUNDS):
        for name, fn in methods.items():
            if time.perf_counter() - T0 > DEADLINE:
                result["skipped"] = f"round {r} stopped at {name}: BENCH_DEADLINE {DEADLINE:.0f}s"
                break
            with torch.no_grad():
                timings.setdefault(name, []).append(med(fn))
        medians = {name: statistics.median(ts) for name, ts in timings.items()}
        if "flex_kernel_ms" in medians and "flex_mask_build_ms" in medians:
            medians["flex_total_ms"] = medians["selection_ms"] + medians["flex_mask_build_ms"] + medians["flex_kernel_ms"]
            medians["speedup_vs_flex"] = medians["flex_total_ms"] / medians["ours_ms"]
            medians["speedup_vs_flex_kernel_only"] = medians["flex_kernel_ms"] / (medians["ours_ms"] - medians["selection_ms"])
        if "sdpa_causal_ms" in medians:
            medians["speedup_vs_sdpa"] = medians["sdpa_causal_ms"] / medians["ours_ms"]
        result = {
            **run_info(),
            "pattern": "patterns/minference.pat:vertical_slash",
            "defines": DEFINES,
            "shape": {"B": B, "H": H, "HKV": HKV, "N": N, "D": D, "dtype": str(DT).removeprefix("torch.")},
            "inputs": {"local_logits": LOCAL, "heavy_column_logits": MARK},
            "selection": sparsity,
            "flex_block": FLEX_BLOCK,
            "flex_block_density_of_causal": density,
            "rel_err_vs_flex": err,
            "variant_rel_err_vs_flex": variant_err,
            "variant_options": variants,
            "rounds": {name: ts for name, ts in timings.items()},
            **medians,
            **({"skipped": result["skipped"]} if "skipped" in result else {}),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k.endswith("ms") or k.startswith("speedup")}), flush=True)
        if "skipped" in result:
            break


if __name__ == "__main__":
    main()
