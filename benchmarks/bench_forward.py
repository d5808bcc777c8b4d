# ruff: noqa: B023  (the timing lambdas run inside their loop iteration)
"""Forward attention on the GPU, one run: patterndsl kernels vs torch.compile'd FlexAttention (same
pattern's block mask) vs dense SDPA; then block-table build time and memory vs create_block_mask.

B=1, H=16, N=16384, D=128, bf16. Prints a table and writes JSON (argv[1], default docs/benchmarks/).
FLOPs = 4 * allowed pairs * D * H * B (allowed pairs counted exactly from the pattern's predicate).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import torch
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import patterndsl as P
from patterndsl.blocks import block_tables, clear_cache

B, H, N, D = 1, 16, 16384, 128
DT = torch.bfloat16


def mm_causal(b, h, q, k):
    return k <= q


def mm_swa(b, h, q, k):
    return (k <= q) & (q - k <= 1023)


def mm_longformer(b, h, q, k):
    return ((q - k).abs() <= 256) | (q < 16) | (k < 16)


def mm_power(b, h, q, k):
    d = (q // 64 - k // 64).abs()
    return (k <= q) & ((d <= 1) | ((d & (d - 1)) == 0))


def mm_dilated(b, h, q, k):
    return (k <= q) & (q - k <= 1023 * 4) & ((q - k) % 4 == 0)


PATTERNS = [
    ("causal", "causal", mm_causal, True),
    ("sliding_window_1024", "causal & window(1023)", mm_swa, True),
    ("longformer_512_g16", "window(256) | global(0:16)", mm_longformer, False),
    ("power_b64", "causal & blockwise(64, hops(2) | window(1))", mm_power, True),
    ("dilated_4x1024", "causal & window(1023, dilation=4)", mm_dilated, True),
]
CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3)]


def med(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def allowed_pairs(mod) -> int:
    total = 0
    j = torch.arange(N, device="cuda")[None, :]
    for r0 in range(0, N, 2048):
        i = torch.arange(r0, min(N, r0 + 2048), device="cuda")[:, None]
        total += int(torch.broadcast_to(mod._PYPRED[0](i, j, N), (i.shape[0], N)).sum())
    return total


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=DT) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    only = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
    for name, src, mm, causal in PATTERNS:
        if only and name not in only:
            continue
        row = {"pattern": name, "source": src}
        best = None
        for cfg in CONFIGS:
            mod = P.compile(f"pattern p = {src}\n", block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
            out = mod.attention(q, k, v)
            t = med(lambda: mod.attention(q, k, v))
            row[f"ours_ms_{cfg[0]}x{cfg[1]}w{cfg[2]}s{cfg[3]}"] = t
            if best is None or t < best[0]:
                best = (t, cfg, out)
        pairs = allowed_pairs(mod)
        bm = create_block_mask(mm, None, None, N, N, device="cuda")
        fo = flex(q, k, v, block_mask=bm)
        tf = med(lambda: flex(q, k, v, block_mask=bm))
        ts = med(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
        err = ((best[2].float() - fo.float()).norm() / fo.float().norm()).item()
        flops = 4 * pairs * D * H * B
        row.update(
            ours_ms=best[0],
            best_config=best[1],
            flex_ms=tf,
            sdpa_dense_ms=ts,
            allowed_pairs=pairs,
            density=pairs / N / N,
            ours_tflops=flops / best[0] / 1e9,
            flex_tflops=flops / tf / 1e9,
            speedup_vs_flex=tf / best[0],
            rel_err_vs_flex=err,
        )
        rows.append(row)
        print(
            f"{name:22s} ours {best[0]:7.3f} ms {row['ours_tflops']:6.1f} TF/s {best[1]} | flex {tf:7.3f} ms "
            f"{row['flex_tflops']:6.1f} TF/s | sdpa {ts:7.3f} | x{tf / best[0]:.2f} vs flex | err {err:.1e}",
            flush=True,
        )
    # block tables: build time and peak memory at large N
    tables = []
    if os.environ.get("BENCH_NO_TABLES"):
        print("block tables: skipped (BENCH_NO_TABLES)")
        return
    swa = P.pattern("causal & window(1023)")
    mod = P.compile("pattern p = causal & window(1023)\n")
    for n in (65536, 262144, 1048576):
        rec = {"n": n}
        for label, fn in (
            ("blocks_py", lambda: block_tables(swa, n, 128, 64, device="cuda")),
            ("module", lambda: mod.block_tables(n, 128, 64, torch.device("cuda"))),
        ):
            fn()  # warm
            clear_cache()
            mod._TABLES.clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            rec[f"{label}_ms"] = (time.perf_counter() - t0) * 1e3
            rec[f"{label}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        for label, kw in (("flex", {}), ("flex_compile", {"_compile": True})):
            if n > 262144 and label == "flex":
                rec[f"{label}_ms"] = None
                continue
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                create_block_mask(mm_swa, None, None, n, n, device="cuda", **kw)
                torch.cuda.synchronize()
                rec[f"{label}_ms"] = (time.perf_counter() - t0) * 1e3
                rec[f"{label}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            except torch.OutOfMemoryError:
                rec[f"{label}_ms"] = "OOM"
            torch.cuda.empty_cache()
        tables.append(rec)
        print("tables", rec, flush=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(),
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16"},
        "forward": rows,
        "tables_sliding_window_1024": tables,
    }
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "forward_h100.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
