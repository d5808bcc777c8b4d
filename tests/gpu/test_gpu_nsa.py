"""NSA's branches on a CUDA GPU (the lent H100): the compressed branch on the attention kernels and the
compressed scoring kernel of `topk(..., score=compressed)`, against the float64 PyTorch path, which the CPU
tests hold to the literal definitions (tests/runtime/test_compressed.py, reference.selection).

Run with `pytest -m gpu tests/gpu/test_gpu_nsa.py` on a machine with CUDA; skipped elsewhere.
"""

from __future__ import annotations

from typing import Any

import pytest

import patterndsl as P

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

from patterndsl.runtime import compressed_attention  # noqa: E402 (it imports torch)


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-3), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("causal", [True, False])
def test_compressed_branch_and_gradients_match_the_float64_path(dtype: str, tol: float, causal: bool) -> None:
    """1000 tokens (a ragged last block), blocks of 64, 8 query heads over 2 KV heads, head_dim 128: output,
    lse (the first 63 queries: zeros and -inf under causal) and the gradients of q, k, v and of lse."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = getattr(torch, dtype)
    q = torch.randn(1, 8, 1000, 128, device="cuda", generator=g).to(dt).requires_grad_()
    k, v = (torch.randn(1, 2, 1000, 128, device="cuda", generator=g).to(dt).requires_grad_() for _ in range(2))
    do = torch.randn(1, 8, 1000, 128, device="cuda", generator=g)
    dl = torch.randn(1, 8, 1000, device="cuda", generator=g)
    out, lse = compressed_attention(q, k, v, 64, causal=causal)
    wide = tuple(x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    o64, l64 = compressed_attention(*wide, 64, causal=causal)
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(l64))
    assert (out.detach().cpu().double() - o64).abs().max() < tol
    fin = torch.isfinite(l64)
    assert (lse.detach().cpu().double()[fin] - l64[fin]).abs().max() < tol
    if causal:
        assert not out[:, :, :63].any() and torch.isinf(lse[:, :, :63]).all()

    def loss(o: Any, s: Any) -> Any:
        return (o * do.to(o.device, o.dtype)).sum() + (torch.where(torch.isinf(s), 0, s) * dl.to(s.device, s.dtype)).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref = torch.autograd.grad(loss(o64, l64), wide)
    for a, r in zip(got, ref, strict=True):
        assert (a.cpu().double() - r).abs().max() < tol * max(1.0, float(r.abs().max()))


def test_compressed_branch_at_64k_keeps_memory_linear() -> None:
    """NSA's size on one KV head's group (16 query heads, N = 65536, bf16): forward and backward allocate
    O(N) beyond the inputs (out, its gradient, dq: 768 MiB), where PyTorch autograd kept every query chunk's
    [16, 4096, 1024] float32 weights, 4 GiB in all."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 16, 65536, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 1, 65536, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, _ = compressed_attention(q, k, v, 64)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.cuda.max_memory_allocated() - base < 3 << 29


@pytest.mark.parametrize("share", [True, False])
def test_compressed_scores_pick_as_the_float64_path(share: bool) -> None:
    """topk(16, block=64, score=compressed) at N = 4096, 8 query heads over 2 KV heads, float32 (IEEE
    products): the scoring kernel's picks equal the float64 PyTorch path's block for block."""
    src = f"causal & (sink(64) | window(63) | topk(16, block=64, score=compressed{', share=kv' if share else ''}))"
    attn = P.compile(f"pattern p = {src}\n")
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 8, 4096, 128, device="cuda", generator=g)
    k = torch.randn(1, 2, 4096, 128, device="cuda", generator=g)
    got = attn.selected_blocks(q, k).cpu()
    want = attn.selected_blocks(q.cpu().double(), k.cpu().double())
    assert torch.equal(got, want), f"{int((got != want).sum())} blocks differ"
    if share:
        assert torch.equal(got[:, 0::4], got[:, 3::4])


# the scoring kernels' tiles other than the defaults: (query rows, key blocks, warps, stages)
OTHER_TILES = [dict(compressed_lse_tiles=(256, 64, 8, 2), compressed_sum_tiles=(64, 256, 8, 2)),
               dict(compressed_lse_tiles=(128, 64, 8, 2), compressed_sum_tiles=(128, 256, 16, 2)),
               dict(compressed_lse_tiles=(256, 128, 16, 2), compressed_sum_tiles=(64, 64, 4, 3)),
               dict(compressed_lse_tiles=(128, 64, 8, 2), compressed_sum_tiles=(64, 128, 4, 2))]  # fmt: skip


@pytest.mark.parametrize("share", [True, False])
def test_compressed_scores_in_bf16_match_the_float64_path(share: bool) -> None:
    """NSA's scoring in bfloat16 (16-bit queries and mean keys on tensor cores, float32 sums) at N = 16384,
    16 query heads over 2 KV heads, head_dim 128, blocks of 64 (several tiles of packed heads and several
    runs of key blocks per query block): every candidate's score within 0.5% + 1e-3 of the float64 PyTorch
    path's on the same bf16 inputs, widened (the mean keys' rounding to bf16 moves them by up to about
    0.2%, while they lie 5 to 10% from a uniform softmax's), and the picks as the float64 scores rank them
    but for blocks within twice that of the 16th (near ties that bf16 may order either way). Other tiles of
    the two kernels (`OTHER_TILES`) hold the scores to the same tolerance."""
    from patterndsl.runtime import selection

    src = f"causal & (sink(64) | window(63) | topk(16, block=64, score=compressed{', share=kv' if share else ''}))"
    attn = P.compile(f"pattern p = {src}\n")
    rule = attn.spec.selectors[0].all[0]
    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, hkv, nb = 16384, 16, 2, 256
    q = torch.randn(1, h, n, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, 128, device="cuda", generator=g)  # a part shared by a block: means far apart
    k = (k + torch.randn(1, hkv, nb, 128, device="cuda", generator=g).repeat_interleave(64, 2)).bfloat16()
    heads = torch.arange(h, dtype=torch.int32, device="cuda")
    got = selection._rule_scores(attn.spec, rule, q, k, None, heads, h // hkv, 0, nb).cpu().double()
    wide = (q.cpu().double(), k.cpu().double())
    want = torch.cat([selection._rule_scores(attn.spec, rule, *wide, None, heads.cpu(), h // hkv, r0, 32)
                      for r0 in range(0, nb, 32)], 1)  # fmt: skip
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    tol = 5e-3 * want.abs() + 1e-3
    assert ((got - want).abs() <= tol)[ok].all(), float((got - want).abs()[ok].max())
    for tiles in OTHER_TILES:  # the shapes benchmarks/bench_nsa.py tries, the same sums to rounding
        with attn.options(**tiles):
            other = selection._rule_scores(attn.spec, rule, q, k, None, heads, h // hkv, 0, nb).cpu().double()
        assert ((other - want).abs() <= tol)[ok].all() and torch.equal(torch.isnan(other), torch.isnan(want)), tiles
    picked = attn.selected_blocks(q, k).cpu()  # [1, h, nb, nb]
    rows = torch.arange(h) // (h // hkv) if share else torch.arange(h)
    s = torch.where(ok, want, float("-inf"))[rows]  # each head's selection row, float64
    order = torch.sort(s, dim=-1, descending=True, stable=True)
    kth = order.values[..., 15:16]
    ref = torch.zeros_like(picked[0]).scatter_(-1, order.indices[..., :16], True) & torch.isfinite(s)
    near = (s - kth).abs() <= 2 * tol[rows]
    assert torch.equal(picked[0] & ~near, ref & ~near), f"{int((picked[0] != ref).sum())} blocks differ"
    assert torch.equal(picked[0].sum(-1), ref.sum(-1))  # as many picks per row (min(16, candidates))
    if share:
        assert torch.equal(picked[:, 0::8], picked[:, 7::8])
