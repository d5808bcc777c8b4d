"""Context parallelism, weak scaling: a fixed number of tokens per GPU, ours (`attn.context_parallel`, the
placement `Placement.choose` picks) against torch's context_parallel (ring attention over SDPA; dense
causal SDPA for every pattern, since the ring takes no mask: the bytes a ring sends do not depend on it),
forward and forward+backward, and the bytes each rank sends measured against `patc analyze --ranks`.

    torchrun --nproc-per-node=G benchmarks/bench_context_parallel.py OUT.json

Run it once per GPU count (1, 2, 4, 8: the efficiency is t(1) / t(G)); every run writes its own JSON. With
one GPU the rows also time the single call on the whole sequence (`single`: the fast kernel), which the
one-rank context-parallel call (the kernels at spans, no transfer) should stay close to.
BENCH_TOKENS (per GPU, default 262144), BENCH_HEADS (16), BENCH_DIM (128), BENCH_ONLY (pattern names),
BENCH_REPEAT (timed repetitions, 5), BENCH_RING=0 skips torch's ring. NCCL with NVLink multicast off
(NCCL_NVLS_ENABLE=0, set here). A dry run on CPUs: BENCH_DEVICE=cpu BENCH_TOKENS=256 BENCH_HEADS=2
BENCH_DIM=16 torchrun --nproc-per-node=2 ... (gloo, float32).

Ours attends through the Triton kernels at spans (`patterndsl.runtime.positions.Spans`: each rank's rows
against its own keys, then against the received ones, merged by log-sum-exp) on CUDA; the CPU dry run takes
the PyTorch path at positions unless TRITON_INTERPRET=1. The JSON says which path ran (`ours_path`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from statistics import median
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402  (after NCCL's environment)
import torch.distributed as dist  # noqa: E402

import patterndsl as P  # noqa: E402
from patterndsl.distributed import Placement, Terms, plan  # noqa: E402

PATTERNS = [("window", "causal & window(4095)"), ("longformer", "window(256) | global(0:16)"), ("causal", "causal")]
DEV = os.environ.get("BENCH_DEVICE", "cuda")
TOKENS = int(os.environ.get("BENCH_TOKENS", str(256 * 1024)))
H = int(os.environ.get("BENCH_HEADS", "16"))
D = int(os.environ.get("BENCH_DIM", "128"))
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))
ONLY = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def timed(fn: Any) -> float:
    """Median milliseconds of REPEAT calls after one warm-up, every rank in step (the slowest rank's time)."""
    fn()
    _sync()
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor([median(times)], dtype=torch.float64, device=DEV)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sent_bytes(fn: Any) -> list[int]:
    """Bytes each rank hands to isend during one call of fn (every rank's count, gathered)."""
    count = [0]
    real = dist.batch_isend_irecv

    def counting(ops: list[Any]) -> Any:
        count[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real(ops)

    dist.batch_isend_irecv = counting  # type: ignore[assignment]
    try:
        fn()
    finally:
        dist.batch_isend_irecv = real  # type: ignore[assignment]
    every = [torch.zeros(1, dtype=torch.int64, device=DEV) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor([count[0]], dtype=torch.int64, device=DEV))
    return [int(x.item()) for x in every]


def ours(src: str, rank: int, world: int) -> dict[str, Any]:
    attn = P.compile(f"pattern p = {src}\n")
    n = TOKENS * world
    pl = Placement.choose(attn, n, world)
    g = torch.Generator(device="cpu").manual_seed(rank)
    q, k, v, do = (torch.randn(1, H, pl.length(rank), D, generator=g).to(DEV, DT) for _ in range(4))
    row: dict[str, Any] = {"placement": pl.strategy}
    with torch.no_grad():
        row["bytes_sent"] = sent_bytes(lambda: attn.context_parallel(q, k, v, placement=pl))
        row["fwd_ms"] = timed(lambda: attn.context_parallel(q, k, v, placement=pl))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    row["fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(attn.context_parallel(*leaves, placement=pl), leaves, do))
    tokens = plan(Terms.of_spec(attn.spec), pl, 128).tokens_sent()
    row["bytes_sent_analysis"] = (tokens * 2 * H * D * q.element_size()).tolist()
    if world == 1:  # the same sequence through the single call
        with torch.no_grad():
            row["single_fwd_ms"] = timed(lambda: attn(q, k, v))
        row["single_fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(attn(*leaves), leaves, do))
    return row


def ring(rank: int, world: int) -> dict[str, Any]:
    """torch's context_parallel: the whole sequence's q, k, v sharded in place (head-tail), SDPA's ring."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    n = TOKENS * world
    mesh = init_device_mesh(DEV, (world,))
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, n, D, generator=g).to(DEV, DT) for _ in range(4))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row: dict[str, Any] = {}
    with context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2]):  # sharded in place
        with torch.no_grad():
            row["fwd_ms"] = timed(lambda: sdpa(q, k, v, is_causal=True))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the shards, as leaves
        row["fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(sdpa(*leaves, is_causal=True), leaves, do))
    row["bytes_sent_model"] = (world - 1) * (n // world) * 2 * H * D * q.element_size()
    return row


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "bench_context_parallel.json"
    dist.init_process_group("nccl" if DEV == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEV == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    from runinfo import run_info

    result: dict[str, Any] = {"run": run_info(), "gpus": world, "tokens_per_gpu": TOKENS, "heads": H, "head_dim": D,
                              "dtype": str(DT), "rows": [],
                              "ours_path": "Triton kernels at spans" if DEV == "cuda" or os.environ.get(
                                  "TRITON_INTERPRET") == "1" else "PyTorch path at positions"}
    for name, src in PATTERNS:
        if ONLY and name not in ONLY:
            continue
        row: dict[str, Any] = {"pattern": name, "source": src, "N": TOKENS * world}
        try:
            row["ours"] = ours(src, rank, world)
        except Exception as e:  # one side failing (memory) leaves the other's numbers
            row["ours"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        result["rows"].append(row)
        if rank == 0:
            _write(out, result)
    if os.environ.get("BENCH_RING", "1") != "0":
        try:
            result["ring_causal_sdpa"] = ring(rank, world)
        except Exception as e:
            result["ring_causal_sdpa"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if rank == 0:
        _write(out, result)
    dist.destroy_process_group()


def _write(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
