"""Every peer that can express a pattern, side by side in one process: patterndsl (autotuned: its Triton
kernels, or FA4 where the pattern is a band and the tuner timed FA4 faster; `ours_triton` is the Triton kernels
alone; for a token layout `ours_gathered` and `ours_in_place` are its two ways, forward and backward),
FlashAttention-4 (`flash_attn.cute.flash_attn_func`, causal and windows only), FlexAttention with its
FLASH backend and with its Triton backend (the same block mask, `attn.to_flex_block_mask`), and SDPA
(is_causal, or a dense boolean mask).

    python benchmarks/bench_peers.py OUT.json [--d 64,128] [--only causal,...] [--bwd-d 64,128] [--bwd-first]

B=1, H=16, N=16384 (each grid below holds N tokens), bf16; forward at every D (D=256 forward only) and
forward+backward at the `--bwd-d` head dims. The median of interleaved rounds (each a quick `do_bench`
median), with every round kept for the spread; effective TFLOP/s = 4 * allowed pairs * D * H * B / time
(x 3.5 for forward+backward). A peer that cannot run a case is recorded with its error, not dropped.
JSON is rewritten after every case, so a run cut short keeps what it measured; `BENCH_DEADLINE` (seconds)
skips the cases that would start past it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import flex_attention

import patterndsl as P
from patterndsl.analysis.count import row_stats
from patterndsl.cli.bench import _step as step
from patterndsl.cli.bench import interleaved

sys.path.insert(0, str(Path(__file__).parent))
from runinfo import run_info  # noqa: E402

B, H, N = 1, 16, 16384
DT = torch.bfloat16
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "1e9"))
# (name, source, FA4's window_size or None when FA4 cannot express it, SDPA's is_causal)
CASES: list[tuple[str, str, tuple[int, int] | None, bool]] = [
    ("causal", "pattern p = causal\n", (-1, 0), True),
    ("sliding_window_1024", "pattern p = causal & window(1023)\n", (1023, 0), False),
    ("longformer_512_g16", "pattern p = window(256) | global(0:16)\n", None, False),
    ("power_b64", "pattern p = causal & blockwise(64, hops(2) | window(1))\n", None, False),
    ("dilated_4x1024", "pattern p = causal & window(1023, dilation=4)\n", None, False),
    ("neighborhood_2d_k13", "layout g = grid(128, 128)\npattern p = neighborhood(g, kernel=13)\n", None, False),
    ("dilated_2d_k7_d4", "layout g = grid(128, 128)\npattern p = neighborhood(g, kernel=7, dilation=4)\n", None, False),
    ("video_3d", "layout g = grid(16, 32, 32)\npattern p = neighborhood(g, kernel=(3, 7, 7), "
     "causal=(true, false, false))\n", None, False),
]


def fa4(window: tuple[int, int]) -> Callable[..., torch.Tensor] | None:
    """FA4's forward on [B, H, N, D] tensors, or None where it does not import."""
    try:
        from flash_attn.cute import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 (not installed, or its CUDA pieces missing: FA4 is skipped)
        return None
    causal = window == (-1, 0)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        args = {"causal": True} if causal else {"causal": False, "window_size": window}
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **args)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return run


def peers(src: str, attn: Any, n: int, window: tuple[int, int] | None, is_causal: bool,
          dev: str) -> dict[str, Callable[..., torch.Tensor]]:
    bm = attn.to_flex_block_mask(n, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    def ours_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with attn.options(fa4=False):
            return attn(q, k, v)  # type: ignore[no-any-return]

    out: dict[str, Callable[..., torch.Tensor]] = {
        "ours": attn,  # the default: the tuner's pick between our Triton kernels and FA4 where FA4 can run it
        "ours_triton": ours_triton,
        "flex_flash": lambda q, k, v: flex(q, k, v, block_mask=bm, kernel_options={"BACKEND": "FLASH"}),
        "flex_triton": lambda q, k, v: flex(q, k, v, block_mask=bm),
    }
    if any(lay is not None for lay in attn.spec.layouts):  # the two ways the tuner chose between, apart
        for way, gather in (("ours_gathered", True), ("ours_in_place", False)):
            def one_way(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gather: bool = gather) -> torch.Tensor:
                with attn.options(layout_gather=gather):
                    return attn(q, k, v)  # type: ignore[no-any-return]

            out[way] = one_way
    if window is not None and (run := fa4(window)) is not None:
        out["fa4"] = run
    if is_causal:
        out["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = torch.as_tensor(P.dense_mask(P.loads(src).patterns[0].body, n)).to(dev)  # the hand-written mask a user would pass
        out["sdpa_mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out


def time_one(fn: Callable[[], None]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def case(name: str, src: str, window: tuple[int, int] | None, is_causal: bool, d: int, bwd: bool, rounds: int,
         dev: str) -> dict[str, Any]:
    attn = P.compile(src)
    n = N  # every grid above holds N tokens
    # each case's Flex mask_mod is a new closure, one more recompile of the same function: past dynamo's limit
    # (8) Flex falls back to its unfused path, 150 ms a call, so every case starts from a reset
    torch._dynamo.reset()
    pairs = row_stats(P.loads(src).patterns[0].body, n).pairs  # exact (patterndsl.analysis)
    q, k, v = (torch.randn(B, H, n, d, device=dev, dtype=DT, requires_grad=bwd) for _ in range(3))
    grad = torch.randn(B, H, n, d, device=dev, dtype=DT) if bwd else None
    ref = attn(q, k, v).float()
    fns: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for peer, fn in peers(src, attn, n, window, is_causal, dev).items():
        try:
            got = fn(q, k, v).float()
            err = (got - ref).abs().max().item()
            if not err < 0.05:  # a peer that computes something else is not timed against us
                raise AssertionError(f"max |difference| to ours {err:.3g}")
            step(fn, q, k, v, grad)()  # compiles the backward where asked
            fns[peer] = step(fn, q, k, v, grad)
        except Exception as e:  # noqa: BLE001 (a peer that cannot run the case is recorded)
            errors[peer] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    times = interleaved(fns, time_one, rounds)
    flops = 4 * pairs * d * H * B * (3.5 if bwd else 1.0)
    rows = {p: {"ms": statistics.median(t), "rounds_ms": t, "tflops": flops / statistics.median(t) / 1e9}
            for p, t in times.items()}
    ours = rows.get("ours", {}).get("ms")
    for r in rows.values():
        r["ours_speedup"] = r["ms"] / ours if ours else None
    return {"pattern": name, "d": d, "pass": "fwd+bwd" if bwd else "fwd", "n": n, "allowed_pairs": pairs,
            "ours_backend": attn.backend(q, k, v), "peers": rows, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--d", default="64,128,256")
    ap.add_argument("--bwd-d", default="64,128")
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bwd-first", action="store_true", help="forward+backward cases before the forwards")
    args = ap.parse_args()
    dev = "cuda"
    t0 = time.monotonic()
    only = [x for x in args.only.split(",") if x]
    result: dict[str, Any] = {"run": run_info(), "B": B, "H": H, "dtype": "bfloat16", "rounds": args.rounds,
                              "cases": []}
    plan = [(c, d, False) for d in map(int, args.d.split(",")) for c in CASES]
    backward = [(c, d, True) for d in map(int, args.bwd_d.split(",")) for c in CASES]
    plan = backward + plan if args.bwd_first else plan + backward
    for (name, src, window, is_causal), d, bwd in plan:
        if only and name not in only:
            continue
        if time.monotonic() - t0 > DEADLINE:
            result["cases"].append({"pattern": name, "d": d, "pass": "fwd+bwd" if bwd else "fwd",
                                    "skipped": "past BENCH_DEADLINE"})
            continue
        try:
            row = case(name, src, window, is_causal, d, bwd, args.rounds, dev)
        except Exception as e:  # noqa: BLE001 (one case's failure must not lose the others)
            row = {"pattern": name, "d": d, "pass": "fwd+bwd" if bwd else "fwd", "error": f"{type(e).__name__}: {e}"[:500]}
        result["cases"].append(row)
        peers_ms = {p: round(r["ms"], 3) for p, r in row.get("peers", {}).items()}
        print(name, d, row["pass"], peers_ms, row.get("errors") or row.get("error") or "", flush=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
