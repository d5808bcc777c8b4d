"""The FlashAttention-4 backend on a CUDA GPU: on every case, FA4's outputs, log-sum-exps and gradients against
our Triton kernels' and a float64 reference; where FA4 is not installed, the same calls run ours.

Run with `pytest -m gpu tests/gpu/test_gpu_fa4.py` (FA4 where `benchmarks/fa4_carry.sh` installed it on the
PYTHONPATH). The comparisons are skipped without FA4; the fallback test runs only then.
"""

from __future__ import annotations

from typing import Any

import pytest

import patterndsl as P
from patterndsl.mask import dense_mask
from patterndsl.runtime import fa4
from patterndsl.runtime.options import options

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

BANDS = ["full", "causal", "causal & window(1023)", "causal & window(100)", "window(64)", "window(200, 17)",
         "causal | window(0, 5)", "~causal | window(7, 0)"]  # the last two: one side unbounded
SHAPES = [(1000, 64, 4, 4), (2048, 128, 8, 2), (4096, 128, 4, 4), (777, 256, 4, 1)]  # N, D, H, Hkv (batch 2)
needs_fa4 = pytest.mark.skipif(fa4._function() is None, reason="flash-attn-4 is not installed")


def _inputs(n: int, d: int, h: int, hkv: int, grad: bool) -> tuple[Any, ...]:
    g = torch.Generator(device="cuda").manual_seed(n + d + h)
    q, k, v = (torch.randn(2, x, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
               for x in (h, hkv, hkv))
    return q, k, v, torch.randn(2, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)


def _reference(src: str, q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
    """float64 (out, lse) and the graph's leaves, straight from the pattern's dense mask."""
    n, d = q.shape[2], q.shape[3]
    mask = torch.from_numpy(dense_mask(P.pattern(src), n)).cuda()
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.repeat_interleave(g, 1).transpose(-1, -2) * d**-0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vd.repeat_interleave(g, 1), torch.logsumexp(s, -1), (qd, kd, vd)


def _err(x: Any, w: Any) -> float:
    return ((x.double() - w).norm() / w.norm()).item()


@needs_fa4
@pytest.mark.parametrize("src", BANDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_fa4_forward_and_gradients(src: str, shape: tuple[int, int, int, int]) -> None:
    n, d, h, hkv = shape
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v, do = _inputs(n, d, h, hkv, True)
    with attn.options(fa4=True):
        assert attn.backend(q, k, v) == "fa4"
        o, lse = attn(q, k, v, return_lse=True)
        grads = torch.autograd.grad(o, (q, k, v), do)
    with attn.options(fa4=False):
        assert attn.backend(q, k, v) == "triton"
        o_t, lse_t = attn(q, k, v, return_lse=True)
        grads_t = torch.autograd.grad(o_t, (q, k, v), do)
    ref, ref_lse, leaves = _reference(src, q, k, v)
    want = torch.autograd.grad(ref, leaves, do.double())
    assert o.shape == o_t.shape and lse.shape == lse_t.shape
    assert _err(o, ref) < 1e-2 and _err(o_t, ref) < 1e-2
    assert (lse.double() - ref_lse).abs().max().item() < 1e-2, "FA4's lse is the natural log, as ours"
    assert (lse - lse_t).abs().max().item() < 1e-2
    for name, a, b, w in zip(("dq", "dk", "dv"), grads, grads_t, want, strict=True):
        assert _err(a, w) < 2e-2, (name, _err(a, w))
        assert _err(b, w) < 2e-2, (name, _err(b, w))


def _doc(t: Any, s: int, n: int, packed: bool) -> Any:
    """Document tokens s:s+n of a packed [total, H, D] or [1, H, total, D] tensor, as [1, H, n, D]."""
    return t.narrow(0, s, n).transpose(0, 1)[None] if packed else t.narrow(2, s, n)


@needs_fa4
@pytest.mark.parametrize("src", ["causal", "causal & window(100)", "window(30, 7)"])
@pytest.mark.parametrize("packed", [True, False])
def test_gpu_fa4_packed_documents(src: str, packed: bool) -> None:
    """Packed documents (an empty one among them) on FA4's varlen kernels: outputs, lse and gradients against
    ours and a float64 reference per document."""
    attn = P.compile(f"pattern p = {src}\n")
    lengths = [300, 0, 1, 1200, 77]
    total, h, hkv, d = sum(lengths), 4, 2, 128
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    cu = torch.tensor([0, *(s + n for s, n in zip(starts, lengths, strict=True))], device="cuda", dtype=torch.int32)
    q, k, v, do = (t[:1].detach() for t in _inputs(total, d, h, hkv, False))
    if packed:
        q, k, v, do = (t[0].transpose(0, 1).contiguous() for t in (q, k, v, do))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got = {}
    for way in (True, False):
        with attn.options(fa4=way):
            o, lse = attn(q, k, v, cu_seqlens=cu, return_lse=True)
            got[way] = (o, *torch.autograd.grad(o, (q, k, v), do), lse)
    assert not torch.equal(got[True][0], got[False][0]), "two different kernels ran (their roundings differ)"
    for s, n in zip(starts, lengths, strict=True):
        if not n:
            continue
        ref, ref_lse, leaves = _reference(src, *(_doc(t, s, n, packed) for t in (q, k, v)))
        want = (ref, *torch.autograd.grad(ref, leaves, _doc(do, s, n, packed).double()))
        for name, a, b, w in zip(("out", "dq", "dk", "dv"), got[True], got[False], want, strict=True):
            assert _err(_doc(a, s, n, packed), w) < 2e-2, (name, s, n)
            assert _err(_doc(b, s, n, packed), w) < 2e-2, (name, s, n)
        lse_fa4 = got[True][4].narrow(-1, s, n)
        assert (lse_fa4.double() - ref_lse.reshape(lse_fa4.shape)).abs().max().item() < 1e-2, (s, n)


@needs_fa4
@pytest.mark.parametrize("src", ["causal", "causal & window(1023)"])
def test_gpu_fa4_outputs_passed_in(src: str) -> None:
    """out= and lse= are written, as on the Triton path (NaN-filled: an unwritten element shows)."""
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v, _ = _inputs(1024, 128, 4, 4, False)
    out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"), device="cuda")
    with attn.options(fa4=True), torch.no_grad():
        got = attn(q, k, v, out=out, lse=lse, return_lse=True)
        want = attn(q, k, v, return_lse=True)
    assert got[0] is out and got[1] is lse and torch.equal(out, want[0]) and torch.equal(lse, want[1])


@needs_fa4
def test_gpu_fa4_not_for_what_it_cannot_express() -> None:
    """Longformer's global tokens, a dilated window and float32 stay on the Triton kernels under fa4=True."""
    q, k, v, _ = _inputs(1024, 64, 4, 4, False)
    with options(fa4=True):
        for src in ("window(256) | global(0:16)", "causal & window(255, dilation=4)"):
            assert P.compile(f"pattern p = {src}\n").backend(q, k, v) == "triton", src
        assert P.compile("pattern p = causal\n").backend(q.float(), k.float(), v.float()) == "triton"


@pytest.mark.skipif(fa4._function() is not None, reason="FA4 is installed: the comparisons above run")
@pytest.mark.parametrize("fa4_option", [True, None])
def test_gpu_without_fa4_bands_run_triton(fa4_option: bool | None) -> None:
    """The fallback on a GPU without FA4: band patterns run our kernels, with the reference's results."""
    src = "causal & window(100)"
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v, _ = _inputs(1000, 64, 4, 2, False)
    with attn.options(fa4=fa4_option):
        assert attn.backend(q, k, v) == "triton"
        o = attn(q, k, v)
    assert _err(o, _reference(src, q, k, v)[0]) < 1e-2


@needs_fa4
def test_gpu_fa4_tuner_picks_one_and_both_agree() -> None:
    """Left to the tuner (the default), a band's call runs whichever forward it timed faster; either way the
    results are the reference's."""
    src = "causal"
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v, _ = _inputs(4096, 128, 16, 16, False)
    assert attn.backend(q, k, v) in ("fa4", "triton")
    assert _err(attn(q, k, v), _reference(src, q, k, v)[0]) < 1e-2
