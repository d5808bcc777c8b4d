"""Generated kernels on a CUDA GPU (the lent H100) against a float64 dense reference, realistic sizes.

Run with `pytest -m gpu tests/test_gpu_kernels.py` on a machine with CUDA; skipped elsewhere.
"""

from __future__ import annotations

from typing import Any

import pytest
from switches import switched

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


def _run(src: str, n: int, dtype: Any, d: int, h: int = 4, hkv: int = 2, cfg: tuple[int, ...] | None = None,
         switches: dict[str, Any] | None = None) -> float:
    module = P.compile(f"pattern p = {src}\n")
    changes = dict(switches or {})
    if cfg is not None:  # launch exactly these tiles (BLOCK_M, BLOCK_N, warps, stages, TMA mode[, one loop])
        changes["_choose"] = lambda *args, **kwargs: cfg
        changes["TMA_MODE"] = max(1, cfg[4])  # the tuner offers a TMA mode only when the module is set to it
    with switched(module, changes):
        return _run_module(module, src, n, dtype, d, h, hkv)


def _run_module(module: Any, src: str, n: int, dtype: Any, d: int, h: int, hkv: int) -> float:
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    q = torch.randn(2, h, n, d, device="cuda", dtype=dtype)
    k = torch.randn(2, hkv, n, d, device="cuda", dtype=dtype)
    v = torch.randn(2, hkv, n, d, device="cuda", dtype=dtype)
    out, lse = module.attention_lse(q, k, v)
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
    err = _run(src, 2000, torch.bfloat16, 128, switches={"ONE_LOOP": True, "TMA_MODE": tma})
    assert err < 1e-2, err


@pytest.mark.parametrize("d", [32, 64, 96, 256])
def test_gpu_head_dims(d: int) -> None:
    assert _run("causal & window(200)", 1500, torch.bfloat16, d) < 1e-2


def _candidates(d: int, itemsize: int) -> list[tuple[int, ...]]:
    module = P.compile("pattern p = causal\n")
    d_pad = max(16, 1 << (d - 1).bit_length())
    out = []
    for mode in (1, 2):  # host and device tensor descriptors
        for c in module._tune_candidates(d_pad, mode, itemsize):
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
    from pathlib import Path

    from patterndsl import ir

    root = Path(__file__).resolve().parent.parent / "patterns"
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
    module = P.compile(path, name)
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out, lse = module.attention_lse(q, k, v)
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
    module = P.compile(src)
    assert module.LAYOUTS[0] is not None, "these patterns are meant to run with a layout"
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, 2, n, 128, device="cuda", dtype=dt) for _ in range(3))
    out, lse = module.attention_lse(q, k, v)
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    s = (q.double() @ k.double().transpose(-1, -2) * 128**-0.5).masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.where(torch.isinf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None])) @ v.double()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert ((out.double() - ref).norm() / ref.norm()).item() < {"bfloat16": 1e-2, "float32": 1e-4}[dtype]


@pytest.mark.parametrize("src, n", [LAYOUT_CASES[1], LAYOUT_CASES[2], LAYOUT_CASES[3]])
def test_gpu_gradients_with_layouts_match_float64_reference(src: str, n: int) -> None:
    body = P.loads(src).patterns[0].body
    module = P.compile(src)
    assert module.LAYOUTS[0] is not None
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16)
    got = torch.autograd.grad(module.attention(q, k, v), (q, k, v), do)
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2) * 64**-0.5).masked_fill(~mask, torch.finfo(torch.float64).min)
    want = torch.autograd.grad((torch.softmax(s, -1) * mask.any(-1)[..., None]) @ vd, (qd, kd, vd), do.double())
    for name, x, ref in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert not torch.isnan(x).any(), name
        assert ((x.double() - ref).norm() / ref.norm()).item() < 5e-3, name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_the_second_gpu_while_the_first_is_current() -> None:
    src = "causal & window(100)"
    module = P.compile(f"pattern p = {src}\n")
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda:1", dtype=torch.float16, requires_grad=True) for _ in range(3))
    with torch.cuda.device(0):
        out = module.attention(q, k, v)
        got = torch.autograd.grad(out.float().sum(), (q, k, v))
    mask = torch.from_numpy(dense_mask(P.pattern(src), 300)).to("cuda:1")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax((qd @ kd.transpose(-1, -2) * 64**-0.5).masked_fill(~mask, float("-inf")), -1) @ vd
    want = torch.autograd.grad(ref.sum(), (qd, kd, vd))
    assert out.device == q.device and ((out.double() - ref).norm() / ref.norm()).item() < 2e-3
    for x, y in zip(got, want, strict=True):
        assert x.device == q.device and ((x.double() - y).norm() / y.norm()).item() < 5e-3
