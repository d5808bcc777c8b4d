"""vertical / slash (MInference's vertical-slash heads) on a CUDA GPU: the selection against float64 scores
computed here straight from the definition (a kept column or diagonal never scores below a dropped one,
up to float32 rounding), the output and gradients against a float64 masked softmax over the mask of the
columns and diagonals the call kept.

Run with `pytest -m gpu tests/gpu/test_gpu_tokens.py` on a machine with CUDA; skipped elsewhere. The
forward writes into NaN-filled `out=` and `lse=`: an element the kernel leaves unwritten shows as NaN.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from helpers import ROOT

import patterndsl as P

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_minference  # noqa: E402  (the variant table it times)

pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

SRC = "causal & (vertical(96, last=64) | slash(40, last=64) | sink(16) | window(63))"


def _inputs(n: int, dtype: Any, h: int = 4, hkv: int = 2, d: int = 128) -> tuple[Any, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(1, x, n, d, device="cuda", generator=g).to(dtype) for x in (h, hkv, hkv))


def _scores(q: Any, k: Any, last: int) -> tuple[Any, Any]:
    """float64 column and diagonal scores of the definition (causal context), [H, N] each."""
    n, d = q.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    qd, kd = q[0].double(), k[0].double().repeat_interleave(group, 0)
    rows = torch.arange(n - last, n, device=q.device)
    s = (qd[:, rows] @ kd.transpose(-1, -2)) / d**0.5
    s = s.masked_fill(torch.arange(n, device=q.device)[None, None, :] > rows[None, :, None], float("-inf"))
    p = torch.softmax(s, -1)
    cols = p.sum(1)
    diags = torch.zeros_like(cols)
    for r, i in enumerate(rows.tolist()):
        diags[:, : i + 1] += p[:, r, : i + 1].flip(-1)
    return cols, diags


def _mask(cols: Any, offs: Any, n: int) -> Any:
    """[H, N, N] bool of SRC for the kept columns and offsets."""
    i = torch.arange(n, device=cols.device)[:, None]
    j = torch.arange(n, device=cols.device)[None, :]
    h = cols.shape[1]
    in_v = torch.zeros((h, n), dtype=torch.bool, device=cols.device).scatter_(1, cols[0], True)
    in_s = torch.zeros((h, n), dtype=torch.bool, device=cols.device).scatter_(1, offs[0], True)
    d = i - j
    return (d >= 0) & (in_v[:, None, :] | in_s[:, d.clamp(min=0)] | (j < 16) | (d <= 63))


def _reference(q: Any, k: Any, v: Any, mask: Any) -> Any:
    group = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask[None], float("-inf")), -1) @ v.double().repeat_interleave(group, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selection_and_forward(dtype: Any) -> None:
    n = 3000  # ragged last tile
    q, k, v = _inputs(n, dtype)
    attn = P.compile(f"pattern p = {SRC}\n")
    cols, offs = attn.selected_tokens(q, k)[0]
    want_c, want_d = _scores(q, k, 64)
    for got, score in ((cols[0], want_c), (offs[0], want_d)):
        kept = torch.zeros_like(score, dtype=torch.bool).scatter_(1, got, True)
        low = torch.where(kept, score, float("inf")).amin(1)
        high = torch.where(kept, float("-inf"), score).amax(1)
        assert bool((low >= high - 1e-5).all()), "a dropped column or diagonal scores above a kept one"
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    with torch.no_grad():
        attn.attention_lse(q, k, v, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    want = _reference(q, k, v, _mask(cols, offs, n))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # tf32 products
    assert (out.double() - want).abs().max().item() < tol


def test_gradients() -> None:
    n = 1000
    q, k, v = (t.requires_grad_() for t in _inputs(n, torch.float32))
    attn = P.compile(f"pattern p = {SRC}\n")
    cols, offs = attn.selected_tokens(q.detach(), k.detach())[0]
    do = torch.randn_like(q)
    grads = torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_reference(qd, kd, vd, _mask(cols, offs, n)), (qd, kd, vd), do.double())
    for got, ref in zip(grads, want, strict=True):
        assert (got.double() - ref).abs().max().item() < 5e-3 * max(1.0, ref.abs().max().item())


# the kernel's variants (Options.token_* and fold), the ones benchmarks/bench_minference.py times
VARIANTS = {"default": {}, **bench_minference.VARIANTS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_forward(variant: str) -> None:
    """Every variant at N = 4096 (bf16, 64 tiles) against the float64 reference over the mask of the call's
    picks, into NaN-filled buffers."""
    n = 4096
    q, k, v = _inputs(n, torch.bfloat16)
    attn = P.compile(f"pattern p = {SRC}\n")
    cols, offs = attn.selected_tokens(q, k)[0]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    with torch.no_grad(), attn.options(**VARIANTS[variant]):
        attn.attention_lse(q, k, v, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    want = _reference(q, k, v, _mask(cols, offs, n))
    assert (out.double() - want).abs().max().item() < 2e-2


@pytest.mark.parametrize("variant", ["default", "rows128", "bytes", "late_kv", "first_kernel"])
def test_variants_gradients(variant: str) -> None:
    """The backward (64 query rows per program whatever the forward's) after each variant's forward."""
    n = 1000
    q, k, v = (t.requires_grad_() for t in _inputs(n, torch.float32))
    attn = P.compile(f"pattern p = {SRC}\n")
    cols, offs = attn.selected_tokens(q.detach(), k.detach())[0]
    do = torch.randn_like(q)
    with attn.options(**VARIANTS[variant]):
        grads = torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_reference(qd, kd, vd, _mask(cols, offs, n)), (qd, kd, vd), do.double())
    for got, ref in zip(grads, want, strict=True):
        assert (got.double() - ref).abs().max().item() < 5e-3 * max(1.0, ref.abs().max().item())
