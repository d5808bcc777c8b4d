"""Gradients with packed documents (`cu_seqlens`) against float64 autograd through a block-diagonal
masked softmax (each document's brute-force mask, `tests/reference.py`), in Triton's CPU interpreter;
float64 takes the PyTorch path. Result buffers are poisoned (NaN) before each run (`poisoned`: the
outputs of the autograd path's forward and its gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import VARLEN_PATTERNS, compiled, cu_of, reference_grads
from hypothesis import HealthCheck, given, settings
from reference_varlen import doc_mask
from strategies import document_splits

import patterndsl as P

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from patterndsl.runtime import autograd  # noqa: E402 (it imports torch)

SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))


def module(src: str) -> Any:
    return compiled(src, **SMALL)


def _nan(shape: Any, dtype: Any, device: Any) -> Any:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Inside the block the autograd path (the functions `patterndsl.runtime.autograd` calls) writes its
    results into NaN-filled tensors: out and lse of each forward, dq, dk, dv of each backward, dense and
    packed, so an element the kernels leave unwritten shows as NaN (where dK, dV are summed over head
    patterns the runtime zeroes them first, as it does its own)."""
    fwd, vfwd, bwd, vbwd = autograd._forward, autograd._varlen_forward, autograd._backward, autograd._varlen_backward

    def forward(spec: Any, q: Any, *args: Any, **kwargs: Any) -> Any:
        out, lse = _nan(q.shape, q.dtype, q.device), _nan(q.shape[:3], torch.float32, q.device)
        return fwd(spec, q, *args, out=out, lse=lse, **kwargs)

    def varlen_forward(spec: Any, q: Any, *args: Any, **kwargs: Any) -> Any:
        h, total = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[1], q.shape[2])
        out, lse = _nan(q.shape, q.dtype, q.device), _nan((1, h, total), torch.float32, q.device)
        return vfwd(spec, q, *args, out=out, lse=lse, **kwargs)

    def grads(q: Any, k: Any, v: Any) -> tuple[Any, ...]:
        return tuple(_nan(t.shape, t.dtype, t.device) for t in (q, k, v))

    def backward(spec: Any, do: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        return bwd(spec, do, q, k, v, *args, grads=grads(q, k, v), **kwargs)

    def varlen_backward(spec: Any, do: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        return vbwd(spec, do, q, k, v, *args, grads=grads(q, k, v), **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # (not the fixture: hypothesis runs a test many times)
        for name, f in (("_forward", forward), ("_varlen_forward", varlen_forward), ("_backward", backward),
                        ("_varlen_backward", varlen_backward)):
            mp.setattr(autograd, name, f)
        yield


def check_grads(m: Any, src: str, lengths: list[int], h: int = 2, hkv: int | None = None, d: int = 16,
                dtype: Any = torch.float32, with_lse: bool = False, four_d: bool = False,
                public: bool = False) -> None:  # fmt: skip
    """Gradients through autograd (`poisoned`) against the reference; `public`: also `attn.backward` with the
    packed [total, H, D] tensors, written into dq, dk, dv filled with NaN."""
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, h, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(total, hkv or h, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    do = torch.randn(total, h, d, generator=g).to(dtype)
    dlse = torch.randn(h, total, generator=g) if with_lse else None
    with poisoned():
        if four_d:
            out4, lse4 = m.attention_lse(*(t.transpose(0, 1)[None] for t in (q, k, v)), cu_seqlens=cu_of(lengths))
            out, lse = out4[0].transpose(0, 1), lse4[0]
        else:
            out, lse = m.attention_lse(q, k, v, cu_seqlens=cu_of(lengths))
        assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN) outputs"
        loss = (out.float() * do.float()).sum()
        if with_lse:
            loss = loss + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()
        got = torch.autograd.grad(loss, (q, k, v))
    runs = [got]
    if public:
        given = tuple(torch.full(tuple(t.shape), float("nan"), dtype=dtype) for t in (q, k, v))
        g_lse = None if dlse is None else torch.where(torch.isfinite(lse), dlse, 0.0).detach()
        with torch.no_grad():
            res = m.backward(do, q, k, v, out, lse, dlse=g_lse, cu_seqlens=cu_of(lengths), dq=given[0],
                             dk=given[1], dv=given[2])  # fmt: skip
        assert all(a is b for a, b in zip(res, given, strict=True)), "gradients not written into dq=, dk=, dv="
        runs.append(res)
    q4, k4, v4, do4 = (t.transpose(0, 1)[None] for t in (q, k, v, do))
    want = reference_grads(q4, k4, v4, doc_mask(P.pattern(src), lengths), d**-0.5, do4,
                           None if dlse is None else dlse[None])  # fmt: skip
    tol = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2}[dtype]
    for grads in runs:
        for name, x, ref in zip(("dq", "dk", "dv"), grads, want[2:], strict=True):
            ref = ref[0].transpose(0, 1)
            assert x.dtype == dtype and x.shape == ref.shape, name
            assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or 0 * inf)"
            err = (x.double() - ref).abs().max().item()
            assert err < tol * max(1.0, ref.abs().max().item()), f"{name}: max error {err}"


# bigbird (random keys drawn at each document's N) takes 4-9 s: slow tier; quarter keeps the per-document-N tables
@pytest.mark.parametrize("name", ["swa_sink", pytest.param("quarter", marks=pytest.mark.slow),
                                  pytest.param("bigbird", marks=pytest.mark.slow)])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=document_splits)
def test_gradients_on_random_document_splits(name: str, lengths: list[int]) -> None:
    check_grads(module(VARLEN_PATTERNS[name]), VARLEN_PATTERNS[name], lengths)


@pytest.mark.parametrize("fuse_pre", [False, pytest.param(True, marks=pytest.mark.slow)])  # 5 s each
def test_gradients_gqa_lse_four_d_and_float64(fuse_pre: bool) -> None:
    """Also with bwd_fuse_pre: the dQ kernel's tiles (documents' query blocks) fill delta and lse2."""
    src = VARLEN_PATTERNS["swa_sink"]
    m = module(src)
    with m.options(bwd_fuse_pre=fuse_pre):
        check_grads(m, src, [1, 23, 3, 40], h=4, hkv=1, with_lse=True, public=True)
        check_grads(m, src, [17, 1, 30], h=4, hkv=2, four_d=True, public=True)
        check_grads(m, src, [17, 0, 1, 30], dtype=torch.float64, with_lse=True, public=True)


def test_gradients_heads_pattern() -> None:
    text = "pattern m = heads {\n  0:1 => causal & window(3)\n  1:3 => sink(2) | window(0)\n}\n"
    m = P.compile(text, **SMALL)
    lengths = [9, 1, 30]
    total = sum(lengths)
    q = torch.randn(total, 3, 16, requires_grad=True)
    parts = []
    with poisoned():
        out = m.attention(q, q, q, cu_seqlens=cu_of(lengths))
        (dq,) = torch.autograd.grad(out.sum(), (q,))
        s = 0
        for n in lengths:  # each document alone through the dense path must give the same gradient
            x = q.detach()[s : s + n].transpose(0, 1)[None].clone().requires_grad_()
            (g,) = torch.autograd.grad(m.attention(x, x, x).sum(), (x,))
            parts.append(g[0].transpose(0, 1))
            s += n
    assert not torch.isnan(dq).any()
    assert (dq - torch.cat(parts)).abs().max().item() < 1e-4


def test_model_layers_with_packed_documents() -> None:
    """A module compiled from a model: layer= picks the pattern inside each document, forward and backward."""
    text = "model m = layers(2) {\n  every 2 => causal & window(2)\n  else => sink(3) | window(1)\n}\n"
    m = P.compile(text, **SMALL)
    lengths = [7, 1, 20]
    for layer in (0, 1):
        q = torch.randn(sum(lengths), 2, 16, requires_grad=True)
        want_out, want_dq, s = [], [], 0
        with poisoned():
            out = m.attention(q, q, q, cu_seqlens=cu_of(lengths), layer=layer)
            (dq,) = torch.autograd.grad((out * out).sum(), (q,))
            for n in lengths:
                x = q.detach()[s : s + n].transpose(0, 1)[None].clone().requires_grad_()
                o = m.attention(x, x, x, layer=layer)
                (g,) = torch.autograd.grad((o * o).sum(), (x,))
                want_out.append(o.detach()[0].transpose(0, 1))
                want_dq.append(g[0].transpose(0, 1))
                s += n
        assert not torch.isnan(out).any() and not torch.isnan(dq).any()
        assert (out.detach() - torch.cat(want_out)).abs().max().item() < 1e-5
        assert (dq - torch.cat(want_dq)).abs().max().item() < 1e-4
