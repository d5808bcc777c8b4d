"""Packed documents (`cu_seqlens`) on a CUDA GPU against a float64 per-document reference, realistic sizes;
and the no-recompilation promise checked on Triton's real kernel cache.

Run with `pytest -m gpu tests/gpu/test_gpu_varlen.py` on a machine with CUDA; skipped elsewhere. Results are
written into NaN-filled tensors (`out=`, `lse=`; `dq=`, `dk=`, `dv=` of `attn.backward`): an element a
kernel leaves unwritten shows as NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from reference_varlen import packed_tables

import patterndsl as P
from patterndsl.mask import dense_mask

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

CASES = [
    "causal & window(1023)",  # N-free: rows cut from one shared table
    "causal & blockwise(64, hops(2) | window(1))",
    "window(128) | global(0:16)",  # reads N: every tile classified at its own N
    "blockwise(64, window(1) | global(0:2) | random(3, seed=0))",  # BigBird: each document's own draw
]


def _compile(src: str) -> Any:
    return P.compile(f"pattern p = {src}\n")


def _lengths(seed: int, total: int) -> list[int]:
    rng = np.random.default_rng(seed)
    out: list[int] = [1, 1, 7, 130]
    while sum(out) < total:
        out.append(int(rng.choice([1, 2, 63, 64, 65, int(rng.integers(1, 3000))])))
    rng.shuffle(out)
    return out


def _check(attn: Any, src: str, lengths: list[int], dtype: Any, h: int = 4, hkv: int = 2, d: int = 128) -> float:
    total = sum(lengths)
    q = torch.randn(total, h, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(total, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device="cuda")
    nan_out = torch.full_like(q, float("nan"))
    nan_lse = torch.full((h, total), float("nan"), dtype=torch.float32, device="cuda")
    with torch.no_grad():
        out, lse = attn.attention_lse(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), out=nan_out, lse=nan_lse)
    assert out is nan_out and lse.data_ptr() == nan_lse.data_ptr(), "out= and lse= are written into"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    num = den = 0.0
    s0 = 0
    masks: dict[int, Any] = {}
    for n in lengths:
        if n not in masks:
            masks[n] = torch.from_numpy(dense_mask(P.pattern(src), n)).cuda()
        qq = q[s0 : s0 + n].transpose(0, 1).double()
        kk = k[s0 : s0 + n].transpose(0, 1).double().repeat_interleave(h // hkv, 0)
        vv = v[s0 : s0 + n].transpose(0, 1).double().repeat_interleave(h // hkv, 0)
        s = (qq @ kk.transpose(-1, -2) * d**-0.5).masked_fill(~masks[n], float("-inf"))
        ref_lse = torch.logsumexp(s, -1)
        ref = torch.where(torch.isinf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None])) @ vv
        assert torch.equal(torch.isinf(lse[:, s0 : s0 + n]), torch.isinf(ref_lse))
        num += (out[s0 : s0 + n].transpose(0, 1).double() - ref).norm().item() ** 2
        den += ref.norm().item() ** 2
        s0 += n
    return (num / den) ** 0.5


def _compiled_kernels() -> int:
    """Compiled specialisations of the attention kernels (shared by every pattern: the predicate is a
    constexpr argument, so each pattern adds its own)."""
    from patterndsl.runtime import bwd_kernels, fwd_kernels

    kernels = [fwd_kernels._attn_fwd, bwd_kernels._attn_bwd_pre, bwd_kernels._attn_bwd_dq, bwd_kernels._attn_bwd_dkdv]
    return sum(len(caches[0]) for kernel in kernels for caches in kernel.device_caches.values())


@pytest.mark.parametrize("src", [CASES[0], CASES[2]])
def test_gpu_fifty_random_length_calls_compile_once(src: str) -> None:
    attn = _compile(src)
    rng = np.random.default_rng(4)
    counts = []
    for _ in range(50):
        lengths = rng.integers(1, 5000, rng.integers(1, 12)).tolist()
        q = torch.randn(sum(lengths), 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(sum(lengths), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device="cuda")
        out = attn.attention(q, kv, kv, cu_seqlens=cu)
        out.sum().backward()
        counts.append(_compiled_kernels())
    assert counts[0] >= 1 and counts[-1] == counts[0], counts


def test_gpu_varlen_gradients_match_float64_reference() -> None:
    """Through autograd, and through `attn.backward(..., cu_seqlens=)` into NaN-filled gradients."""
    src = CASES[0]
    attn = _compile(src)
    lengths = _lengths(5, 6000)
    total, h, hkv, d = sum(lengths), 4, 2, 128
    q = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device="cuda")
    got = torch.autograd.grad(attn.attention(q, k, v, cu_seqlens=cu), (q, k, v), do)
    with torch.no_grad():
        qn, kn, vn = (t.detach() for t in (q, k, v))
        out, lse = attn.attention_lse(qn, kn, vn, cu_seqlens=cu)
        nan = [torch.full_like(t, float("nan")) for t in (qn, kn, vn)]
        written = attn.backward(do, qn, kn, vn, out, lse, cu_seqlens=cu, dq=nan[0], dk=nan[1], dv=nan[2])
    assert all(x is y for x, y in zip(written, nan, strict=True)), "dq=, dk=, dv= are written into"
    want = [torch.zeros(t.shape, dtype=torch.float64, device="cuda") for t in (q, k, v)]
    s0 = 0
    for n in lengths:
        part = slice(s0, s0 + n)
        mask = torch.from_numpy(dense_mask(P.pattern(src), n)).cuda()
        qq, kk, vv = (t.detach()[part].transpose(0, 1).double().requires_grad_() for t in (q, k, v))
        kr, vr = kk.repeat_interleave(h // hkv, 0), vv.repeat_interleave(h // hkv, 0)
        s = (qq @ kr.transpose(-1, -2) * d**-0.5).masked_fill(~mask, float("-inf"))
        out = torch.softmax(s, -1) @ vr
        for w, g in zip(want, torch.autograd.grad(out, (qq, kk, vv), do[part].transpose(0, 1).double()), strict=True):
            w[part] = g.transpose(0, 1)
        s0 += n
    for how, grads in (("autograd", got), ("backward", written)):
        for name, x, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
            assert not torch.isnan(x).any(), (how, name)
            err = ((x.double() - ref).norm() / ref.norm()).item()
            assert err < 2e-2, (how, name, err)


@pytest.mark.parametrize("src", CASES)
def test_gpu_varlen_matches_float64_reference(src: str) -> None:
    err = _check(_compile(src), src, _lengths(1, 12000), torch.bfloat16)
    assert err < 1e-2, err


def test_gpu_varlen_float16_and_thousands_of_documents() -> None:
    src = CASES[0]
    attn = _compile(src)
    assert _check(attn, src, _lengths(2, 6000), torch.float16) < 2e-3
    lengths = np.random.default_rng(3).integers(1, 40, 3000).tolist()
    assert _check(attn, src, lengths, torch.float16) < 2e-3


def test_gpu_n_free_tables_bit_identical_and_without_host_sync() -> None:
    """The per-call N-free build on the GPU (row templates kept on the device, a sort, three Triton kernels)
    against the plain Python assembly of tests/reference_varlen.py, bit for bit, at the forward, dQ and
    transposed dK/dV tiles; the benchmark's shape, thousands of short documents, empty ones. Each build
    (shared table already made) runs with torch's sync debug mode set to error: a synchronising CUDA call
    fails it, with new document shapes (templates computed and copied) and with known ones."""
    from patterndsl.runtime.backward import _bwd_config
    from patterndsl.runtime.forward import _config
    from patterndsl.runtime.tables import block_tables
    from patterndsl.runtime.varlen import _free_source, _varlen_tables

    spec = _compile(CASES[0]).spec
    d_pad = 128
    bm1, bn1, bm2, bn2 = _bwd_config(spec, d_pad)[:4]
    tiles = [(*_config(spec, d_pad)[:2], False), (bm2, bn2, False), (bm1, bn1, True)]
    rng = np.random.default_rng(6)
    splits = [rng.integers(1024, 32769, 32).tolist(), _lengths(7, 20000), rng.integers(1, 40, 3000).tolist(),
              [0, 1, 0, 5000, 0], rng.integers(1024, 32769, 32).tolist()]
    for lengths in splits + splits[:2]:  # the last two: every shape known
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device="cuda")
        for bm, bn, transpose in tiles:
            top = max(1 << (max(lengths) - 1).bit_length(), bm, bn)
            _free_source(spec, 0, top, bm, bn, cu.device)  # the shared table: built once per length bucket (syncs)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = _varlen_tables(spec, cu, lengths, bm, bn, transpose=transpose)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            want = packed_tables(block_tables(spec, top, bm, bn, "cpu", layout=False), lengths, bm, bn, transpose)
            for name, x, y in zip(("tiles", "f_off", "f_idx", "p_off", "p_idx"), got, want, strict=True):
                assert x.is_cuda and x.dtype == torch.int32 and torch.equal(x.cpu(), y), (bm, bn, transpose, name)
