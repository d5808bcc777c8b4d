"""Backward kernels on a CUDA GPU (the lent H100) against float64 autograd, realistic sizes.

Run with `pytest -m gpu tests/gpu/test_gpu_backward.py`; skipped without CUDA. The bf16 D=128 cases use the
benchmark's five patterns (same module text, so the benchmark reuses their compiled kernels). Each case
takes the gradients twice: through autograd, and through `attn.backward` into NaN-filled `dq=`, `dk=`,
`dv=` (an element a kernel leaves unwritten shows as NaN).
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import spy_launches

import patterndsl as P
from patterndsl.mask import dense_mask

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

BENCH = [
    "causal",
    "causal & window(1023)",
    "window(256) | global(0:16)",
    "causal & blockwise(64, hops(2) | window(1))",
    "causal & window(1023, dilation=4)",
]
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-4}


def _grads(src: str, n: int, dtype: Any, d: int, h: int = 4, hkv: int = 2, b: int = 2,
           options: dict[str, Any] | None = None) -> dict[str, float]:
    attn = P.compile(f"pattern p = {src}\n")
    with attn.options(**(options or {})):
        q = torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, requires_grad=True)
        do = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
        got = torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do)
        with torch.no_grad():  # the same gradients written into NaN-filled tensors
            qn, kn, vn = (t.detach() for t in (q, k, v))
            out, lse = attn.attention_lse(qn, kn, vn)
            nan = [torch.full_like(t, float("nan")) for t in (qn, kn, vn)]
            written = attn.backward(do, qn, kn, vn, out, lse, dq=nan[0], dk=nan[1], dv=nan[2])
        assert all(x is y for x, y in zip(written, nan, strict=True)), "dq=, dk=, dv= are written into"
    mask = torch.from_numpy(dense_mask(P.pattern(src), n)).cuda()
    g = h // hkv
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.repeat_interleave(g, 1).transpose(-1, -2) * d**-0.5).masked_fill(~mask, torch.finfo(torch.float64).min)
    ref = (torch.softmax(s, -1) * mask.any(-1)[..., None]) @ vd.repeat_interleave(g, 1)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    errs = {}
    for how, grads in (("", got), ("backward ", written)):
        for name, x, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
            assert not torch.isnan(x).any(), f"{how}{name} has NaN"
            errs[how + name] = ((x.double() - w).norm() / w.norm()).item()
    return errs


@pytest.mark.parametrize("src", BENCH)
def test_gpu_gradients_bf16_d128(src: str) -> None:
    errs = _grads(src, 2000, torch.bfloat16, 128)
    assert max(errs.values()) < TOL[torch.bfloat16], errs


@pytest.mark.parametrize("src", BENCH)
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_backward_pre_pass_gradients(src: str, tma: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delta pre-pass (`bwd_fuse_pre=False`; on by default, the dQ kernel computing delta and lse2), TMA and
    pointer loads: the options reach the launches (autograd's backward and `attn.backward` alike)."""
    from patterndsl.runtime import backward

    pre: list[Any] = []
    dq: list[Any] = []
    spy_launches(monkeypatch, backward, "_attn_bwd_pre", pre, lambda kw: kw["BLOCK_M"])
    spy_launches(monkeypatch, backward, "_attn_bwd_dq", dq, lambda kw: (kw.get("PRE", False), kw["TMA"]))
    errs = _grads(src, 2000, torch.bfloat16, 128, options={"bwd_fuse_pre": False, "bwd_tma": tma})
    assert max(errs.values()) < TOL[torch.bfloat16], errs
    # a token layout (the dilated window's) reads through pointer loads
    tma_mode = int(tma and P.compile(f"pattern p = {src}\n").spec.layouts[0] is None)
    assert len(pre) == 2 and dq == [(False, tma_mode)] * 2, (pre, dq)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_gradients_other_dtypes(dtype: str) -> None:
    errs = _grads("causal & window(1023)", 1500, getattr(torch, dtype), 128)
    assert max(errs.values()) < TOL[getattr(torch, dtype)], errs


@pytest.mark.parametrize("d", [64, 256])
def test_gpu_gradients_head_dims_and_mqa(d: int) -> None:
    errs = _grads("causal & window(1023)", 1100, torch.bfloat16, d, h=4, hkv=1)
    assert max(errs.values()) < TOL[torch.bfloat16], errs


def test_gpu_empty_rows_zero_gradients() -> None:
    src = "where(q >= 100) & causal & window(300)"
    errs = _grads(src, 1000, torch.bfloat16, 128)
    assert max(errs.values()) < TOL[torch.bfloat16], errs


SINK = "causal & (window(63) | sink(64))"
NSA_SEL = "causal & (sink(64) | window(63) | topk(4, block=64, share=kv))"


@pytest.mark.parametrize("split", [None, 0], ids=["split", "whole"])
def test_gpu_sink_rows_split_over_programs(split: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """N = 8192, 8 query heads over one KV head, bf16: the sink's key block (every query block of every head,
    far above the mean row) runs in pieces merged from a float32 workspace by default (`bwd_split=None`),
    whole with `bwd_split=0`; both against float64 autograd."""
    from patterndsl.runtime import backward

    merged: list[Any] = []
    spy_launches(monkeypatch, backward, "_attn_bwd_dkdv_merge", merged, lambda kw: kw["BLOCK_N"])
    errs = _grads(SINK, 8192, torch.bfloat16, 128, h=8, hkv=1, b=1, options={"bwd_split": split})
    assert max(errs.values()) < TOL[torch.bfloat16], errs
    assert bool(merged) == (split is None), merged


@pytest.mark.parametrize("split", [None, 0], ids=["split", "whole"])
def test_gpu_selected_rows_split_over_programs(split: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """NSA's selected branch at N = 8192 (sink, window, top-4 blocks shared by a KV head's 8 query heads),
    bf16: the rows to split are numbered on the device (the sink's, and blocks many queries pick); gradients
    against float64 autograd over the blocks the kernels picked."""
    import numpy as np

    from patterndsl.runtime import backward
    from patterndsl.selectors import split as split_pattern

    merged: list[Any] = []
    spy_launches(monkeypatch, backward, "_attn_bwd_dkdv_merge", merged, lambda kw: kw["BLOCK_N"])
    sp = split_pattern(P.pattern(NSA_SEL))
    attn = P.compile(f"pattern p = {NSA_SEL}\n")
    n, d, h, hkv = 8192, 128, 8, 1
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k = (torch.randint(-2, 3, (1, x, n, d), device="cuda", generator=g).to(torch.bfloat16) for x in (h, hkv))
    v = torch.randn(1, hkv, n, d, device="cuda", generator=g).to(torch.bfloat16)
    with attn.options(bwd_split=split):
        sel = attn.selected_blocks(q, k).cpu().numpy()
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        w = torch.randn(q.shape, device="cuda", dtype=torch.float64, generator=g)
        (attn.attention(qs, ks, vs).double() * w).sum().backward()
    assert bool(merged) == (split is None), merged
    blk = np.arange(n) // sp.block
    mask = dense_mask(sp.static, n)[None, None] | (sel[:, :, blk][:, :, :, blk] & dense_mask(sp.selected, n))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = qd @ kd.repeat_interleave(h // hkv, 1).transpose(-1, -2) * d**-0.5
    s = s.masked_fill(~torch.from_numpy(mask).cuda(), float("-inf"))
    (torch.softmax(s, -1) @ vd.repeat_interleave(h // hkv, 1) * w).sum().backward()
    for got, want in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and want is not None
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOL[torch.bfloat16], err
