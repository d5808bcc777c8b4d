"""Launch plans (`runtime.plans`): a call that reuses a plan launches what a call that builds one does, across
changes of N, head_dim, dtype, scale and options (a changed one never reuses a stale plan), and the argument
list a plan hands the compiled kernel's own launcher on a GPU is the one Triton's binder makes of the call.
The kernels run in the interpreter; the direct launch itself is covered on the GPU
(tests/gpu/test_gpu_plans.py)."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import check_grads

import patterndsl as P
from patterndsl.mask import dense_mask
from patterndsl.runtime import plans

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

SRC = "pattern p = causal & window(20)\n"
SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))
# (N, head_dim, dtype, scale, options): each differs from the first in one thing that changes a launch
CASES = [
    (48, 16, "float32", None, {}),
    (80, 16, "float32", None, {}),
    (48, 32, "float32", None, {}),
    (48, 16, "float16", None, {}),
    (48, 16, "float32", 0.5, {}),
    (48, 16, "float32", None, {"one_loop": True, "fold": False}),
]


def _step(attn: Any, n: int, d: int, dtype: str, scale: float | None, opts: dict[str, Any]) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(n * 1000 + d)
    q, k, v, do = (torch.randn(1, 2, n, d, generator=g).to(getattr(torch, dtype)) for _ in range(4))
    qkv = [t.requires_grad_() for t in (q, k, v)]
    with attn.options(**opts):
        o = attn(*qkv, scale=scale)
        return (o.detach(), *torch.autograd.grad(o, qkv, do))


def test_reused_plans_launch_what_new_ones_do() -> None:
    attn = P.compile(SRC, **SMALL)
    plans._PLANS.clear()
    first = [_step(attn, *case) for case in CASES]  # each case builds its plans (its key is new)
    built = len(plans._PLANS)
    kinds = [key[0] for key in plans._PLANS]  # type: ignore[index]
    assert kinds.count("fwd") == len(CASES)  # no case reused another's forward plan
    assert kinds.count("dq") == kinds.count("dkdv") == len(CASES) - 1  # the backward ignores those options
    for case, want in zip(reversed(CASES), reversed(first), strict=True):  # every plan now comes from the cache
        got = _step(attn, *case)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), case
    assert len(plans._PLANS) == built


def test_reused_plans_are_exact() -> None:
    """After plans of other shapes, a cached plan's gradients against the float64 reference."""
    attn = P.compile(SRC, **SMALL)
    mask = dense_mask(P.loads(SRC).get("p").body, 40)  # type: ignore[union-attr]
    for _ in range(2):
        check_grads(attn, mask, autograd=True)


def test_bound_arguments_are_tritons(monkeypatch: pytest.MonkeyPatch) -> None:
    """For every plan a training step builds: the list `bound_args` makes of the plan's entries is what
    Triton's binder makes of the original call, and with other live tensors put in at the positions it gives,
    what the binder makes of the call with those tensors."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    made: list[tuple[Any, ...]] = []
    make = plans.make

    def spy(kernel: Any, grid: Any, args: Any, kwargs: Any, live: Any) -> Any:
        plan = make(kernel, grid, args, kwargs, live)
        made.append((kernel, args, kwargs, plan))
        return plan

    monkeypatch.setattr(plans, "make", spy)
    plans._PLANS.clear()
    _step(P.compile(SRC, **SMALL), *CASES[0])
    assert len(made) >= 3
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for kernel, args, kwargs, plan in made:
        jit = JITFunction(getattr(kernel, "fn", kernel))
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, where = plans.bound_args(binder, plan.params, plan.live)
        assert all(bound[i] is None for i in where)  # the plan holds none of the first call's tensors
        named = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
        for i, n in zip(where, plan.live, strict=True):
            bound[i] = named.get(n)
        _same(bound, list(binder(*args, **kwargs)[0].values()))  # the call as the call site made it
        fresh = [torch.empty(0) for _ in plan.live]
        for i, t in zip(where, fresh, strict=True):
            bound[i] = t
        _same(bound, list(binder(**{**named, **dict(zip(plan.live, fresh, strict=True))})[0].values()))


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x is y or (not torch.is_tensor(x) and not torch.is_tensor(y) and x == y), (x, y)
