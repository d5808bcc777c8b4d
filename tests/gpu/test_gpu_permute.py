"""Permuted patterns (`permute(B, segment=s, by=given)`) on a CUDA GPU: outputs, log-sum-exp and gradients
in the caller's order against a float64 reference built from the definition (B's mask over permuted
positions, read at the caller's pairs through the ranks), for a static pattern with per-head orders and
GQA, and PBS-Attn's two library patterns merged by log-sum-exp (its selection over permuted keys, with
integer-valued q and k so that block scores are exact and selections agree block for block).

Run with `pytest -m gpu tests/gpu/test_gpu_permute.py` on a machine with CUDA; skipped elsewhere. Seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import LIBRARY, reference_grads, segment_permutation
from reference import permuted_mask, selection

import patterndsl as P
from patterndsl.mask import dense_mask
from patterndsl.runtime.positions import merge

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

TOL = {torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 4e-2)}  # (output, relative gradient)


def _compare(out: Any, lse: Any, grads: tuple[Any, ...], want: tuple[Any, ...], dtype: Any) -> None:
    fwd, bwd = TOL[dtype]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten outputs"
    assert (out.double().cpu() - want[0]).abs().max().item() < fwd * max(1.0, want[0].abs().max().item())
    fin = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert (lse.double().cpu()[fin] - want[1][fin]).abs().max().item() < 1e-2
    for name, x, ref in zip(("dq", "dk", "dv"), grads, want[2:], strict=True):
        err = ((x.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < bwd, f"|{name} - ref| / |ref| = {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_permuted_static_pattern_per_head_gqa(dtype: Any) -> None:
    body, n, seg, d = "causal & (window(127) | sink(64))", 1000, 256, 64
    attn = P.compile(f"pattern p = permute({body}, segment={seg}, by=given)\n")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, h, n, d, generator=g).to(dtype) for h in (4, 2, 2, 4))
    perm = segment_permutation((2, 4), n, seg, 1)
    mask = permuted_mask(dense_mask(P.pattern(body), n), perm.numpy(), perm.numpy())
    want = reference_grads(q, k, v, mask, d**-0.5, do)
    qg, kg, vg = (t.cuda().requires_grad_() for t in (q, k, v))
    out, lse = attn(qg, kg, vg, permutation=perm.cuda(), return_lse=True)
    grads = torch.autograd.grad((out * do.cuda()).sum(), (qg, kg, vg))
    _compare(out.detach(), lse.detach(), grads, want, dtype)


def test_permuted_packed_documents() -> None:
    # segments of 128 start again at each document; gradients through the packed-documents kernels
    body, seg, lengths, d, dtype = "causal & window(63)", 128, [300, 0, 1000, 77], 64, torch.float16
    n = sum(lengths)
    cu = torch.tensor(np.cumsum([0, *lengths]))
    starts = tuple(int(x) for x in cu[:-1])
    attn = P.compile(f"pattern p = permute({body}, segment={seg}, by=given)\n")
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, h, n, d, generator=g).to(dtype) for h in (4, 2, 2, 4))
    perm = segment_permutation((1, 2), n, seg, 5, starts=starts)  # per KV head
    rank = torch.argsort(perm, dim=-1).repeat_interleave(2, dim=1)[0].numpy()  # per query head
    mask = np.zeros((4, n, n), dtype=bool)
    for a, e in zip(starts, [*starts[1:], n], strict=True):
        if e > a:
            inner = dense_mask(P.pattern(body), e - a)
            for h in range(4):
                r = rank[h, a:e] - a
                mask[h, a:e, a:e] = inner[r[:, None], r[None, :]]
    want = reference_grads(q, k, v, mask, d**-0.5, do)
    qg, kg, vg = (t.cuda().requires_grad_() for t in (q, k, v))
    out, lse = attn(qg, kg, vg, cu_seqlens=cu.cuda(), permutation=perm.cuda(), return_lse=True)
    grads = torch.autograd.grad((out * do.cuda()).sum(), (qg, kg, vg))
    _compare(out.detach(), lse.detach(), grads, want, dtype)


def test_pbs_library_patterns_merged_are_pbs_attn() -> None:
    # keys permuted within segments of 256 (queries in order), selection over earlier segments in the
    # permuted order, the own segment causal in the caller's order
    dtype, n, d, seg = torch.float16, 2048, 64, 256
    program = P.load(LIBRARY / "pbs_attn.pat")
    far, near = (P.compile(program, name) for name in ("pbs", "pbs_diagonal"))
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randint(-2, 3, (1, h, n, d), generator=g).to(dtype) for h in (4, 2))
    v, do = (torch.randn(1, h, n, d, generator=g).to(dtype) for h in (2, 4))
    pk = segment_permutation((1, 2), n, seg, 3)  # an order per KV head, shared by its two query heads
    ident = torch.arange(n)[None]
    inner = program.get("pbs").body  # type: ignore[union-attr]
    sel = inner.b.b  # blockwise(...) & (sink(b) | threshold(...)): the threshold
    ctx = dense_mask(P.pattern(f"blockwise({seg}, causal - window(0))"), n)
    kp = torch.stack([k[0, x, pk[0, x]] for x in range(2)])[None]
    picked = selection(sel, ctx, q.float().numpy(), kp.float().numpy())
    blocks = np.arange(n) // sel.block
    far_p = ctx & (dense_mask(P.pattern("sink(64)"), n) | picked[:, :, blocks][:, :, :, blocks])
    mask = permuted_mask(far_p, ident.numpy()[:, None], pk.numpy().repeat(2, axis=1)) | dense_mask(
        P.pattern("causal & blockwise(256, window(0))"), n)
    want = reference_grads(q, k, v, mask, d**-0.5, do)
    qg, kg, vg = (t.cuda().requires_grad_() for t in (q, k, v))
    out, lse = merge([far(qg, kg, vg, permutation=(ident.cuda(), pk.cuda()), return_lse=True),
                      near(qg, kg, vg, return_lse=True)])
    grads = torch.autograd.grad((out * do.cuda()).sum(), (qg, kg, vg))
    _compare(out.detach(), lse.detach(), grads, want, dtype)


def test_a_permuted_call_replays_in_a_cuda_graph_with_async_checks() -> None:
    """With async_checks the permutation's check reads nothing back, so a forward is captured in a CUDA
    graph; replayed with a new order written into the same tensor, it equals an eager call with that order."""
    attn = P.compile("pattern p = permute(causal & window(7), segment=16, by=given)\n")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 64, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    perm = segment_permutation((1,), 64, 16, 0).to("cuda")
    with attn.options(async_checks=True):
        attn(q, k, v, permutation=perm)  # tables and compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attn(q, k, v, permutation=perm)
    perm.copy_(segment_permutation((1,), 64, 16, 1).to("cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, attn(q, k, v, permutation=perm))
