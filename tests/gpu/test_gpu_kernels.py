"""Generated kernels on a CUDA GPU (the lent H100) against a float64 dense reference, realistic sizes.

Run with `pytest -m gpu tests/gpu/test_gpu_kernels.py` on a machine with CUDA; skipped elsewhere. Results are
written into NaN-filled tensors (`out=`, `lse=`; `dq=`, `dk=`, `dv=` of `attn.backward`): an element a
kernel leaves unwritten shows as NaN.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import LIBRARY

import patterndsl as P
from patterndsl.mask import dense_mask

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

CASES = [
    "causal",
    "causal & window(255)",
    "window(128) | global(0:16)",
    "causal & blockwise(64, hops(2) | window(1))",
    "causal & window(255, dilation=4)",
    "causal & (window(127) | stride(128))",
    "where(q >= 100) & causal & window(300)",
    "blockwise(64, random(3, seed=7) | window(1) | global(0:2))",
    "(causal & window(100)) | random(5, seed=3)",
]


def _nan(shape: Any, dtype: Any) -> Any:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device="cuda")


def _forward(attn: Any, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """(out, lse) written into NaN-filled tensors (no autograd: out= and lse= take no gradients)."""
    out, lse = _nan(q.shape, q.dtype), _nan(q.shape[:3], torch.float32)
    with torch.no_grad():
        got = attn.attention_lse(q, k, v, out=out, lse=lse)
    assert got[0] is out and got[1] is lse, "out= and lse= are the tensors the results are written into"
    return got


def _backward(attn: Any, do: Any, q: Any, k: Any, v: Any) -> tuple[Any, ...]:
    """(dq, dk, dv) of `attn.backward` written into NaN-filled tensors, from a forward's out and lse."""
    q, k, v = (t.detach() for t in (q, k, v))
    with torch.no_grad():
        out, lse = attn.attention_lse(q, k, v)
        grads = tuple(_nan(t.shape, t.dtype) for t in (q, k, v))
        got = attn.backward(do, q, k, v, out, lse, dq=grads[0], dk=grads[1], dv=grads[2])
    assert all(x is y for x, y in zip(got, grads, strict=True)), "dq=, dk=, dv= are written into"
    return got


def _run(src: str, n: int, dtype: Any, d: int, h: int = 4, hkv: int = 2, cfg: tuple[int, ...] | None = None,
         options: dict[str, Any] | None = None) -> float:
    attn = P.compile(f"pattern p = {src}\n")
    changes = dict(options or {})
    if cfg is not None:  # launch exactly these tiles (BLOCK_M, BLOCK_N, warps, stages, TMA mode, one loop, maxnreg)
        changes["tiles"] = cfg
        changes["tma_mode"] = max(1, cfg[4])  # tma_mode=2 sets up the device descriptors' allocator
    with attn.options(**changes):
        return _run_attn(attn, src, n, dtype, d, h, hkv, cfg)


def _run_attn(attn: Any, src: str, n: int, dtype: Any, d: int, h: int, hkv: int, cfg: tuple[int, ...] | None) -> float:
    q = torch.randn(2, h, n, d, device="cuda", dtype=dtype)
    k = torch.randn(2, hkv, n, d, device="cuda", dtype=dtype)
    v = torch.randn(2, hkv, n, d, device="cuda", dtype=dtype)
    if cfg is not None:
        assert attn.config(q, k, v) == tuple(cfg), "the call launches the tiles given"
    out, lse = _forward(attn, q, k, v)
    mask = torch.from_numpy(dense_mask(P.pattern(src), n)).cuda()
    g = h // hkv
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * d**-0.5
    s = s.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None]))
    ref = p @ v.double().repeat_interleave(g, 1)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("src", CASES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_gpu_kernel_matches_float64_reference(src: str, dtype: str) -> None:
    err = _run(src, 2000, getattr(torch, dtype), 128)
    assert err < {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-4}[dtype], err


@pytest.mark.parametrize("src", CASES)
@pytest.mark.parametrize("tma", [0, 1])
def test_gpu_one_loop_kernel_matches_float64_reference(src: str, tma: int) -> None:
    """The grid kernel with FULL and PARTIAL key blocks in one loop (ONE_LOOP), pointer and TMA loads."""
    err = _run(src, 2000, torch.bfloat16, 128, options={"one_loop": True, "tma_mode": tma})
    assert err < 1e-2, err


@pytest.mark.parametrize("d", [32, 64, 96, 256])
def test_gpu_head_dims(d: int) -> None:
    assert _run("causal & window(200)", 1500, torch.bfloat16, d) < 1e-2


def _candidates(d: int, itemsize: int) -> list[tuple[int, ...]]:
    from patterndsl.runtime.tuning import _tune_candidates

    spec = P.compile("pattern p = causal\n").spec
    d_pad = max(16, 1 << (d - 1).bit_length())
    out = []
    for mode in (1, 2):  # host and device tensor descriptors
        for c in _tune_candidates(spec, d_pad, mode, itemsize):
            if c not in out:
                out.append(c)
    return out


@pytest.mark.parametrize(
    "d, dtype, cfg",
    [(d, "bfloat16", c) for d in (64, 128, 256) for c in _candidates(d, 2)]
    + [(128, "float32", c) for c in _candidates(128, 4)],
)
def test_gpu_every_tuning_candidate_matches_float64_reference(d: int, dtype: str, cfg: tuple[int, ...]) -> None:
    """The tuner keeps whichever candidate is fastest on the machine at hand, so each must be right on its
    own: ragged N, GQA, FULL and PARTIAL blocks, rows with a single allowed key."""
    err = _run("(causal & window(300)) | global(0:16)", 2000, getattr(torch, dtype), d, cfg=cfg)
    assert err < {"bfloat16": 1e-2, "float32": 1e-4}[dtype], err


def _layout_cases() -> list[Any]:
    from patterndsl import ir

    root = LIBRARY
    out = []
    for f in sorted(root.glob("*.pat")):
        for pdef in P.load(f).patterns:
            pats = ir.body_patterns(pdef.body)
            if any(ir.is_dynamic(p) or any(isinstance(x, ir.Random) for x in ir.walk(p)) for p in pats):
                continue
            sizes = [
                x.layout.size
                for p in pats
                for x in ir.walk(p)
                if isinstance(x, ir.Neighborhood | ir.Where) and x.layout is not None
            ]
            if sizes and sizes[0] <= 8192:
                out.append(pytest.param(f, pdef.name, sizes[0], id=f"{f.stem}:{pdef.name}"))
    return out


@pytest.mark.parametrize("path, name, n", _layout_cases())
def test_gpu_layout_patterns_match_float64_reference(path: Any, name: str, n: int) -> None:
    body = P.load(path).get(name).body  # type: ignore[union-attr]
    attn = P.compile(path, name)
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out, lse = _forward(attn, q, k, v)
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    s = (q.double() @ k.double().transpose(-1, -2) * 64**-0.5).masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.where(torch.isinf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None])) @ v.double()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3


LAYOUT_CASES = [
    # the benchmark's four kinds at sizes a float64 dense reference fits, sides and dilations ragged
    ("layout g = grid(64, 64)\npattern p = neighborhood(g, kernel=13)\n", 4096),
    ("layout g = grid(60, 72)\npattern p = neighborhood(g, kernel=7, dilation=4)\n", 4320),
    ("layout g = grid(8, 16, 24)\npattern p = neighborhood(g, kernel=(3, 7, 7), causal=(true, false, false))\n", 3072),
    ("pattern p = causal & window(255, dilation=4)\n", 4001),
    ("pattern p = stride(64)\n", 4096),
]


@pytest.mark.parametrize("src, n", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_kernels_with_layouts_match_float64_reference(src: str, n: int, dtype: str) -> None:
    body = P.loads(src).patterns[0].body
    attn = P.compile(src)
    assert attn.spec.layouts[0] is not None, "these patterns are meant to run with a layout"
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, 2, n, 128, device="cuda", dtype=dt) for _ in range(3))
    out, lse = _forward(attn, q, k, v)
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    s = (q.double() @ k.double().transpose(-1, -2) * 128**-0.5).masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.where(torch.isinf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None])) @ v.double()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert ((out.double() - ref).norm() / ref.norm()).item() < {"bfloat16": 1e-2, "float32": 1e-4}[dtype]


@pytest.mark.parametrize("src, n", [LAYOUT_CASES[1], LAYOUT_CASES[2], LAYOUT_CASES[3]])
def test_gpu_gradients_with_layouts_match_float64_reference(src: str, n: int) -> None:
    """Through autograd, and through `attn.backward` into NaN-filled gradients."""
    body = P.loads(src).patterns[0].body
    attn = P.compile(src)
    assert attn.spec.layouts[0] is not None
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16)
    got = torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do)
    written = _backward(attn, do, q, k, v)
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2) * 64**-0.5).masked_fill(~mask, torch.finfo(torch.float64).min)
    want = torch.autograd.grad((torch.softmax(s, -1) * mask.any(-1)[..., None]) @ vd, (qd, kd, vd), do.double())
    for how, grads in (("autograd", got), ("backward", written)):
        for name, x, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
            assert not torch.isnan(x).any(), (how, name)
            assert ((x.double() - ref).norm() / ref.norm()).item() < 5e-3, (how, name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_the_second_gpu_while_the_first_is_current() -> None:
    src = "causal & window(100)"
    attn = P.compile(f"pattern p = {src}\n")
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda:1", dtype=torch.float16, requires_grad=True) for _ in range(3))
    with torch.cuda.device(0):
        out = attn.attention(q, k, v)
        got = torch.autograd.grad(out.float().sum(), (q, k, v))
    mask = torch.from_numpy(dense_mask(P.pattern(src), 300)).to("cuda:1")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax((qd @ kd.transpose(-1, -2) * 64**-0.5).masked_fill(~mask, float("-inf")), -1) @ vd
    want = torch.autograd.grad(ref.sum(), (qd, kd, vd))
    assert out.device == q.device and ((out.double() - ref).norm() / ref.norm()).item() < 2e-3
    for x, y in zip(got, want, strict=True):
        assert x.device == q.device and ((x.double() - y).norm() / y.norm()).item() < 5e-3
