"""Context parallelism on CUDA: one GPU checks the local pieces (each rank's rows against its own and its
received keys at their global positions on the kernels at spans, merged by log-sum-exp, with gradients)
against the single-call kernel on the whole sequence, and the segment tables of the whole sequence
against its block tables; two or more GPUs run `attn.context_parallel` over NCCL (NVLink multicast off:
NCCL_NVLS_ENABLE=0) against the single-GPU call.

Run with `pytest -m gpu tests/gpu/test_gpu_distributed.py` on a machine with CUDA; skipped elsewhere.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from helpers import emulate_ranks, spy_launches

import patterndsl as P
from patterndsl.distributed import Placement
from patterndsl.runtime import forward, tables
from patterndsl.runtime.positions import Spans, attention_at

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

CASES = [
    ("causal & window(255)", None),
    ("window(128) | global(0:16)", None),
    ("causal", None),
    ("causal & window(300)", (0, 700, 2900, 3000, 4000)),
]


def _inputs(n: int, seed: int, device: str, dtype: Any = None) -> list[Any]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(1, h, n, 64, generator=g).to(device, dtype or torch.float32) for h in (4, 2, 2, 4)]


def _single(attn: Any, q: Any, k: Any, v: Any, do: Any, docs: Any) -> tuple[Any, ...]:
    """The single call's out, lse and gradients (the kernel)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kwargs = {} if docs is None else {"cu_seqlens": torch.tensor(docs, dtype=torch.int32, device=q.device)}
    out, lse = attn(*leaves, return_lse=True, **kwargs)
    (out * do).sum().backward()
    return out.detach(), lse.detach(), *(t.grad for t in leaves)


def _rel(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("src, docs", CASES)
def test_rank_pieces_match_the_single_call(src: str, docs: Any, monkeypatch: Any) -> None:
    n, world, block = 4000, 4, 128
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v, do = _inputs(n, 0, "cuda")
    want = _single(attn, q, k, v, do, docs)
    pl = Placement.choose(attn, n, world, cu_seqlens=docs, block=block)
    launches: list[bool] = []
    spy_launches(monkeypatch, forward, "_attn_fwd", launches, lambda kw: kw.get("QSEG") is not None)
    got = emulate_ranks(attn, q, k, v, do, pl, block, docs)
    assert launches and all(launches), "the ranks' attention must take the kernels at spans"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        if name == "lse":
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite) and (a[finite] - b[finite]).abs().max() < 1e-3, src
        else:
            assert _rel(a, b) < 2e-3, (src, name)


@pytest.mark.parametrize("src, docs", CASES)
def test_spans_of_the_whole_sequence_match_the_single_call(src: str, docs: Any) -> None:
    """One run of the whole sequence (bfloat16): the kernels at spans give the single call's output, and the
    segment tables list the block tables' tiles."""
    n = 4000
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v, _ = _inputs(n, 2, "cuda", torch.bfloat16)
    kwargs = {} if docs is None else {"cu_seqlens": torch.tensor(docs, dtype=torch.int32, device="cuda")}
    want, want_lse = attn(q, k, v, return_lse=True, **kwargs)
    got, got_lse = attention_at(attn.spec, q, k, v, Spans(((0, n),), ((0, n),), n, docs))
    assert _rel(got, want) < 1e-2 and (got_lse - want_lse).abs().max() < 1e-2, src
    if docs is None:
        rows, _, f_off, _, p_off, _ = tables.span_tables(attn.spec, 0, ((0, n),), ((0, n),), n, None, 64, 64, "cuda")
        w_off = tables.block_tables(attn.spec, n, 64, 64, "cuda", 0, layout=False)
        assert int(f_off[-1]) == int(w_off[0][-1]) and int(p_off[-1]) == int(w_off[2][-1]), src
        assert rows.shape[0] == -(-n // 64)


# --- several GPUs: NCCL ------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for src, docs in CASES:
            attn = P.compile(f"pattern p = {src}\n")
            n = 4000
            q, k, v, do = _inputs(n, 1, f"cuda:{rank}")
            out, lse, dq, dk, dv = _single(attn, q, k, v, do, docs)
            for pl in (None, Placement.choose(attn, n, world, cu_seqlens=docs)):
                use = pl or Placement.contiguous(n, world)
                mine = [use.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
                cu = None if docs is None else torch.tensor(docs, device=f"cuda:{rank}")
                o, l_ = attn.context_parallel(*mine, placement=pl, return_lse=True, cu_seqlens=cu)
                (o * use.shard(do, rank)).sum().backward()
                errs = [_rel(o, use.shard(out, rank))] + [_rel(t.grad, use.shard(g, rank))
                                                          for t, g in zip(mine, (dq, dk, dv), strict=True)]
                results.put((src, rank, use.strategy, errs))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_context_parallel_over_nccl_matches_one_gpu() -> None:
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (the device notes)
    world = min(4, torch.cuda.device_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_worker, args=(world, port, results), nprocs=world, join=True, start_method="spawn")
    seen = 0
    while not results.empty():
        src, rank, how, errs = results.get()
        assert max(errs) < 2e-3, (src, rank, how, errs)
        seen += 1
    assert seen == world * len(CASES) * 2
