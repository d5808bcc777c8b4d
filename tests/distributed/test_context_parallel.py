"""Context parallelism over gloo: 2 and 4 processes spawned here, each comparing its shard of the output,
the log-sum-exp and the gradients with the single-process call on the whole sequence (float64: the CPU
path; float32 under the interpreter: the ranks' attention on the kernels at spans), and counting the bytes
its forward sends against the plan's analysis."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compiled

from patterndsl.distributed import Placement, Terms, plan
from patterndsl.runtime import positions

# (pattern source, N, heads, kv heads, cu_seqlens or None, placement: None (tensor_split) or "choose")
FAST = [("causal & window(5) | global(0:2)", 37, 2, 1, None, None)]
SLOW_4 = [
    ("causal", 53, 2, 2, None, "choose"),
    ("causal", 50, 2, 1, None, None),
    ("window(3) | global(0:2)", 61, 2, 2, None, "choose"),
    ("causal & window(7, dilation=2)", 45, 1, 1, None, None),
    ("window(2) | global(-1:) | cols(10:12)", 47, 2, 1, None, "choose"),
    ("heads {\n 0:1 => causal & window(4)\n 1:2 => window(3) | global(0:1)\n}", 49, 2, 1, None, "choose"),
    ("causal & window(6)", 58, 2, 2, (0, 11, 30, 31, 58), "choose"),
    ("causal | global(0:1)", 41, 2, 1, (0, 20, 41), None),
]
SLOW_2 = [
    ("causal & window(4)", 33, 2, 2, (0, 9, 33), None),
    ("causal & window(9) | global(0:3)", 45, 2, 1, None, "choose", "float32"),  # the single call: Triton's kernel
    ("causal & topk(1, block=16) | causal & window(8)", 40, 2, 2, None, None),
    ("blockwise(4, window(1)) | global(0:1)", 29, 2, 1, None, "choose"),
    ("causal & window(6) | global(0:1)", 58, 2, 1, (0, 11, 30, 31, 58), None, "float32"),  # kernels at spans
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """Equal within the float32 log-sum-exp's precision, -inf where the reference has it. (Not
    torch.testing.assert_close: under an initialised process group it imports torch's DTensor, seconds.)"""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), what
    err = (got - want).abs().nan_to_num(0.0).max().item() if got.numel() else 0.0
    assert err <= tol * (1 + want.abs().nan_to_num(0.0, 0.0, 0.0).max().item()), (what, err)


def _case(rank: int, world: int, attn: Any, n: int, h: int, hkv: int, docs: Any, how: Any,
          dtype: str = "float64") -> None:
    """float64 inputs: the single call takes the CPU path; float32 under TRITON_INTERPRET=1 (conftest.py, no
    GPU) it runs the Triton kernel in the interpreter."""
    src = attn.source
    gen = torch.Generator().manual_seed(n)
    dt = getattr(torch, dtype)
    q, k, v, do = (torch.randn(1, hh, n, 8, generator=gen).to(dt) for hh in (h, hkv, hkv, h))
    dlse = torch.randn(1, h, n, generator=gen).to(dt)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    if cu is None:
        o, lse = attn(*full, return_lse=True)
    else:
        o, lse = attn(*full, return_lse=True, cu_seqlens=cu)
    ((o * do).sum() + (lse * dlse).sum()).backward()
    pl = Placement.contiguous(n, world) if how is None else Placement.choose(attn, n, world, cu_seqlens=cu, block=8)
    mine = [pl.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
    kernels: list[str] = []  # float32 under the interpreter: the ranks' attention takes the kernels
    real_fwd, real_bwd = positions._spans_forward, positions._spans_backward
    positions._spans_forward = lambda *a: kernels.append("fwd") or real_fwd(*a)
    positions._spans_backward = lambda *a: kernels.append("bwd") or real_bwd(*a)
    try:
        got, got_lse = attn.context_parallel(*mine, placement=None if how is None else pl, return_lse=True,
                                             cu_seqlens=cu, block=8)
        ((got * pl.shard(do, rank)).sum() + (got_lse * pl.shard(dlse, rank, dim=2)).sum()).backward()
    finally:
        positions._spans_forward, positions._spans_backward = real_fwd, real_bwd
    if "topk" not in src:
        assert set(kernels) == ({"fwd", "bwd"} if dt == torch.float32 else set()), kernels
    where = f"{src!r} N={n} rank {rank}/{world} placement {pl.strategy}"
    tol = 1e-5 if dt == torch.float64 else 2e-4
    _close(got, pl.shard(o.detach(), rank), f"{where}: out", tol)
    _close(got_lse, pl.shard(lse.detach(), rank), f"{where}: lse", tol)
    for name, mine_t, ref in zip("qkv", mine, full, strict=True):
        _close(mine_t.grad, pl.shard(ref.grad, rank), f"{where}: d{name}", tol)
    if "topk" not in src:  # the bytes of a forward: what the plan says this rank sends
        sent = [0]
        real = dist.batch_isend_irecv

        def counting(ops: list[Any]) -> Any:
            sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return real(ops)

        dist.batch_isend_irecv = counting
        try:
            with torch.no_grad():
                attn.context_parallel(*mine, placement=pl, cu_seqlens=cu, block=8)
        finally:
            dist.batch_isend_irecv = real
        tokens = plan(Terms.of_spec(attn.spec), pl, 8, None if docs is None else tuple(docs)).tokens_sent()[rank]
        assert sent[0] == tokens * 2 * hkv * 8 * q.element_size(), (where, sent[0], tokens)


def _worker(rank: int, world: int, port: int, cases: list[Any]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)  # ranks share the cores
    try:
        for case in cases:
            _case(rank, world, *case)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list[Any]) -> None:
    """Fork the ranks (a spawned process would spend seconds importing torch and compiling again) with
    the patterns compiled here."""
    ready = [(compiled(src), *rest) for src, *rest in cases]
    mp.start_processes(_worker, args=(world, _free_port(), ready), nprocs=world, join=True, start_method="fork")


def test_two_ranks_match_single_call() -> None:
    _spawn(2, FAST)


@pytest.mark.slow
def test_four_ranks_match_single_call() -> None:
    _spawn(4, SLOW_4)


@pytest.mark.slow
def test_two_ranks_documents_and_selectors() -> None:
    _spawn(2, SLOW_2)
