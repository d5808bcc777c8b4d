"""Dynamic selectors on a CUDA GPU (the lent H100): selection block for block against the float64 literal
reading of LANGUAGE.md (`reference.selection`), and the attention output against a float64 masked softmax
over the same blocks. Integer-valued inputs keep block means and scores exact in every dtype (also under
tf32 products), so selections must agree exactly, ties included.

Run with `pytest -m gpu tests/gpu/test_gpu_selectors.py` on a machine with CUDA; skipped elsewhere. The attention
is written into NaN-filled `out=` and `lse=`: an element a kernel leaves unwritten shows as NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import reference as R

import patterndsl as P
from patterndsl import ir
from patterndsl.mask import dense_mask
from patterndsl.selectors import split

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

CASES = [
    "causal & (window(255) | topk(8, block=64) | sink(64))",
    "causal & threshold(0.9, block=128)",
    "causal & (window(63) | topk(4, block=64, score=given))",
]


def _run(src: str, n: int, dtype: Any, d: int = 128, b: int = 1, h: int = 4, hkv: int = 2) -> float:
    pat = P.pattern(src)
    sp = split(pat)
    attn = P.compile(f"pattern p = {src}\n")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(-2, 3, (b, h, n, d), device="cuda", generator=g).to(dtype)
    k = torch.randint(-2, 3, (b, hkv, n, d), device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, device="cuda", generator=g).to(dtype)
    nb, nk = -(-n // sp.block), -(-n // sp.key_block)
    given = None
    if isinstance(sp.selector, ir.TopK) and sp.selector.given:
        given = torch.randint(0, 4, (b, h, nb, nk), device="cuda", generator=g).float()
    ctx = dense_mask(sp.context, n)
    want_sel = R.selection(
        sp.selector,
        ctx,
        q.float().cpu().numpy(),
        k.float().cpu().numpy(),
        None if given is None else given.cpu().numpy(),
    )
    got_sel = attn.selected_blocks(q, k, scores=given).cpu().numpy()
    assert np.array_equal(got_sel, want_sel), f"{int((got_sel != want_sel).sum())} blocks differ"
    nan_out = torch.full_like(q, float("nan"))
    nan_lse = torch.full((b, h, n), float("nan"), dtype=torch.float32, device="cuda")
    with torch.no_grad():
        out, lse = attn.attention_lse(q, k, v, scores=given, out=nan_out, lse=nan_lse)
    assert out is nan_out and lse is nan_lse, "out= and lse= are written into"
    rows, cols = np.arange(n) // sp.block, np.arange(n) // sp.key_block
    mask = dense_mask(sp.static, n)[None, None] | (want_sel[:, :, rows][:, :, :, cols] & dense_mask(sp.selected, n))
    m = torch.from_numpy(mask).cuda()
    group = h // hkv
    s = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * d**-0.5
    s = s.masked_fill(~m, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None]))
    ref = p @ v.double().repeat_interleave(group, 1)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    return ((out.double() - ref).norm() / ref.norm()).item()


BUDGETS = [
    "causal & (window(255) | topk(0.1, block=64))", "causal & topk(N // 512, block=64)",
    # scoring rules (PyTorch operations on the device) and a selection shared by a KV head's query heads
    "causal & (sink(64) | topk(8, block=64, score=quest, share=kv))", "causal & topk(8, block=64, score=max)",
]
SHAPES = ["causal & (window(63) | topk(16, block=(64, 16)))", "causal & topk(4, block=(64, 128))"]


@pytest.mark.parametrize(
    "src, dtype",
    [(c, "bfloat16") for c in CASES + BUDGETS + SHAPES] + [(CASES[0], "float16"), (CASES[0], "float32")],
)
def test_gpu_selection_and_attention_match_float64(src: str, dtype: str) -> None:
    err = _run(src, 4096 - 32, getattr(torch, dtype))
    assert err < {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-4}[dtype], err


def test_gpu_batch_and_mqa() -> None:
    assert _run(CASES[0], 2048, torch.bfloat16, d=64, b=2, h=4, hkv=1) < 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_gradients_match_float64_over_the_same_blocks(dtype: str) -> None:
    src = CASES[0]
    sp = split(P.pattern(src))
    attn = P.compile(f"pattern p = {src}\n")
    n, d, h, hkv = 1024 - 32, 64, 4, 2
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k = (torch.randint(-2, 3, (1, x, n, d), device="cuda", generator=g).to(getattr(torch, dtype)) for x in (h, hkv))
    v = torch.randn(1, hkv, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
    sel = attn.selected_blocks(q, k).cpu().numpy()
    blk = np.arange(n) // sp.block
    mask = dense_mask(sp.static, n)[None, None] | (sel[:, :, blk][:, :, :, blk] & dense_mask(sp.selected, n))
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    w = torch.randn(q.shape, device="cuda", dtype=torch.float64, generator=g)
    (attn.attention(qs, ks, vs).double() * w).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = qd @ kd.repeat_interleave(h // hkv, 1).transpose(-1, -2) * d**-0.5
    s = s.masked_fill(~torch.from_numpy(mask).cuda(), float("-inf"))
    ref = torch.softmax(s, -1) @ vd.repeat_interleave(h // hkv, 1)
    (ref * w).sum().backward()
    for got, want in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < {"bfloat16": 2e-2, "float32": 1e-4}[dtype], err


def test_gpu_fused_topk_equals_the_sorting_path_at_scale() -> None:
    """`_topk_kernel` (a running top-n per query block over many key tiles) against the int64 keys through
    torch.topk, at 512 blocks, on integer inputs: block means k/64, scores exact in tf32 and float32, many ties."""
    from patterndsl.runtime.common import _heads
    from patterndsl.runtime.selection import _block_scores, _pick, _pooled, _sel_dense, _selection

    src = CASES[0].replace("topk(8,", "topk(16,")
    spec = P.compile(f"pattern p = {src}\n").spec
    n, h, hkv, d, blk = 32768, 4, 2, 128, 64
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randint(-1, 2, (1, h, n, d), device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randint(-1, 2, (1, hkv, n, d), device="cuda", generator=g).to(torch.bfloat16)
    k[..., : n // 2 : 5, :] = 0  # equal scores in whole stretches
    heads = _heads(0, 0, h, q.device)
    fused = _selection(spec, 0, q, k, None, heads, h // hkv)
    nb = n // blk
    keys = _block_scores(spec, spec.selectors[0], q, k, _pooled(q, k, blk), heads, h // hkv, 0, nb)  # type: ignore[arg-type]
    sorting = _pick(spec.selectors[0], keys.reshape(-1, nb), 1.0).view(h, nb, -1)  # type: ignore[arg-type]
    assert torch.equal(_sel_dense(fused, nb), _sel_dense(sorting, nb))
    assert int((fused >= 0).sum()) == int((sorting >= 0).sum())


SEVERAL = [
    # NOSA's shape: one predicate for every selection case
    "causal & (window(255) | sink(64) | topk(6, block=64) | topk(2, block=64, score=given))",
    # distinct cases: the kernels dispatch on the case's rank
    "(causal & topk(4, block=64)) | (window(300) & threshold(0.8, block=64)) | (causal - topk(2, block=64, score=given))",
]


@pytest.mark.parametrize("src", SEVERAL)
def test_gpu_several_selectors_forward_and_backward_match_float64(src: str) -> None:
    """Several selectors: the reference evaluates the pattern as sets node by node (`reference.dynamic_mask`
    on a small N, float64), the kernels run at bf16 with the same selection."""
    attn = P.compile(f"pattern p = {src}\n")
    n, d, h, hkv = 1024 - 32, 64, 4, 2
    g = torch.Generator(device="cuda").manual_seed(4)
    q, k = (torch.randint(-2, 3, (1, x, n, d), device="cuda", generator=g).to(torch.bfloat16) for x in (h, hkv))
    v = torch.randn(1, hkv, n, d, device="cuda", generator=g).to(torch.bfloat16)
    nb = -(-n // 64)
    given = torch.randint(0, 4, (1, h, nb, nb), device="cuda", generator=g).float() if "given" in src else None
    mask, picked = R.dynamic_mask(
        P.pattern(src), q.float().cpu().numpy(), k.float().cpu().numpy(), None if given is None else given.cpu().numpy()
    )
    assert np.array_equal(attn.selected_blocks(q, k, scores=given).cpu().numpy(), picked)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    w = torch.randn(q.shape, device="cuda", dtype=torch.float64, generator=g)
    out = attn.attention(qs, ks, vs, scores=given)
    (out.double() * w).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = qd @ kd.repeat_interleave(h // hkv, 1).transpose(-1, -2) * d**-0.5
    s = s.masked_fill(~torch.from_numpy(mask).cuda(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    ref = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None])) @ vd.repeat_interleave(h // hkv, 1)
    (ref * w).sum().backward()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    for got, want in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and want is not None
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2
