"""Launch plans on a CUDA GPU: after a plan's first launch (JITFunction.run, which compiles) later launches
go through the compiled kernel's own launcher, and give bit for bit what JITFunction.run gives, across
changes of N, head_dim, dtype and options, under a CUDA graph, and for inputs whose data pointers Triton
specialises differently (not 16-byte aligned).

Run with `pytest -m gpu tests/gpu/test_gpu_plans.py`; skipped without CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest

import patterndsl as P
from patterndsl.runtime import capture, plans

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

SRC = "pattern p = causal & window(1023)\n"
CASES = [
    (4096, 64, torch.bfloat16, {}),
    (4096, 128, torch.bfloat16, {}),
    (3000, 64, torch.bfloat16, {}),
    (4096, 64, torch.float16, {}),
    (4096, 64, torch.bfloat16, {"one_loop": True}),
    (4096, 64, torch.bfloat16, {"tma_mode": 0, "bwd_tma": False}),
]


def _inputs(n: int, d: int, dtype: Any, offset: int = 0) -> tuple[Any, ...]:
    g = torch.Generator(device="cuda").manual_seed(n + d)
    made = []
    for _ in range(4):
        buf = torch.randn(2 * 4 * n * d + offset, device="cuda", dtype=dtype, generator=g)
        made.append(buf[offset:].view(2, 4, n, d))  # offset: a base not 16-byte aligned
    return tuple(made)


def _step(attn: Any, q: Any, k: Any, v: Any, do: Any, opts: dict[str, Any]) -> tuple[Any, ...]:
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    with attn.options(direct_launch=True, **opts):
        o = attn(*qkv)
        return (o.detach(), *torch.autograd.grad(o, qkv, do))


def _direct_plans() -> int:
    return sum(1 for p in plans._PLANS.values() for x in (p if isinstance(p, tuple) else (p,))
               if isinstance(x, plans.Plan) and x.direct is not None)


@pytest.mark.parametrize("n, d, dtype, opts", CASES)
def test_direct_launches_match_jit_run(n: int, d: int, dtype: Any, opts: dict[str, Any]) -> None:
    attn = P.compile(SRC)
    q, k, v, do = _inputs(n, d, dtype)
    _step(attn, q, k, v, do, opts)  # compiles, tunes
    plans._PLANS.clear()
    want = _step(attn, q, k, v, do, opts)  # plans built: JITFunction.run
    assert _direct_plans() >= 3
    for _ in range(2):
        got = _step(attn, q, k, v, do, opts)  # the compiled kernels' launchers
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_unaligned_inputs_after_aligned_ones() -> None:
    attn = P.compile(SRC)
    opts = {"tma_mode": 0, "bwd_tma": False}  # pointer loads: unaligned bases keep the same plan key
    aligned = _inputs(1024, 64, torch.float16)
    _step(attn, *aligned, opts)
    _step(attn, *aligned, opts)
    shifted = _inputs(1024, 64, torch.float16, offset=1)
    assert shifted[0].data_ptr() % 16
    got = _step(attn, *shifted, opts)
    plans._PLANS.clear()
    want = _step(attn, *shifted, opts)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_direct_launches_replay_in_a_graph() -> None:
    attn = P.compile(SRC)
    q, k, v, do = _inputs(4096, 64, torch.bfloat16)
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]

    def step() -> Any:
        with attn.options(direct_launch=True):
            o = attn(*qkv)
            return (o, *torch.autograd.grad(o, qkv, do))

    want = [t.clone() for t in step()]
    graph, out = capture(step, warmups=2)
    for t in out:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("paged", [False, True])
def test_direct_decode_steps_match_jit_run(paged: bool) -> None:
    """A static pattern's decode step (window + sinks, 32 query over 8 KV heads, a contiguous cache with its
    TMA loads or a paged one, k_new appended) through the compiled launcher equals JITFunction.run's, bit for
    bit, at new lengths too."""
    attn = P.compile("pattern p = causal & (window(1023) | sink(4))\n")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, hkv, cap, d, page = 2, 8, 8192, 128, 64
    q = torch.randn(B, 32, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kn, vn = (torch.randn(B, hkv, 1, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    kc, vc = (torch.randn(B, hkv, cap, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    table = None
    if paged:
        kc, vc = (t.view(B, hkv, cap // page, page, d).permute(0, 2, 3, 1, 4).reshape(-1, page, hkv, d)
                  for t in (kc, vc))
        table = torch.arange(B * cap // page, dtype=torch.int32, device="cuda").view(B, -1)

    def step(lengths: list[int]) -> Any:
        seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        with attn.options(direct_launch=True):
            return attn.decode(q, kc, vc, seqlens, page_table=table, k_new=kn, v_new=vn, return_lse=True)

    step([5000, 700])  # compiles, tunes
    plans._PLANS.clear()
    for lengths in ([5000, 700], [6001, 2]):
        want = [t.clone() for t in step(lengths)]  # a new plan: JITFunction.run
        assert _direct_plans() >= 1
        for _ in range(2):
            for a, b in zip(step(lengths), want, strict=True):  # the compiled launcher
                assert torch.equal(a, b)
        plans._PLANS.clear()
