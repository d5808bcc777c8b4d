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
from patterndsl.runtime.options import options

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

SRC = "pattern p = causal & window(20)\n"
SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))
# (N, head_dim, dtype, scale, options): each differs from the first in one thing that changes a launch
CASES = [
    (32, 16, "float32", None, {}),
    (48, 16, "float32", None, {}),
    (32, 32, "float32", None, {}),
    (32, 16, "float16", None, {}),
    (32, 16, "float32", 0.5, {}),
    (32, 16, "float32", None, {"one_loop": True, "fold": False}),
]


def _step(attn: Any, n: int, d: int, dtype: str, scale: float | None, opts: dict[str, Any]) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(n * 1000 + d)
    q, k, v, do = (torch.randn(1, 1, n, d, generator=g).to(getattr(torch, dtype)) for _ in range(4))
    qkv = [t.requires_grad_() for t in (q, k, v)]
    with attn.options(**opts):
        o = attn(*qkv, scale=scale)
        return (o.detach(), *torch.autograd.grad(o, qkv, do))


def test_reused_plans_launch_what_new_ones_do() -> None:
    attn = P.compile(SRC, **SMALL)
    plans._PLANS.clear()  # (the cache is the runtime's own: each key's plan is built again on a miss)
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
    _step(attn, *CASES[1])
    check_grads(attn, dense_mask(P.loads(SRC).get("p").body, 40), autograd=True)  # type: ignore[union-attr]


def _step_plans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """(kernel, args, kwargs, plan) of every plan a training step and a decode step build (in a cache of their
    own)."""
    made: list[tuple[Any, ...]] = []
    make = plans.make

    def spy(kernel: Any, grid: Any, args: Any, kwargs: Any, live: Any) -> Any:
        plan = make(kernel, grid, args, kwargs, live)
        made.append((kernel, args, kwargs, plan))
        return plan

    monkeypatch.setattr(plans, "make", spy)
    monkeypatch.setattr(plans, "_PLANS", {})
    attn = P.compile(SRC, **SMALL)
    _step(attn, *CASES[0])
    g = torch.Generator().manual_seed(1)
    kc, vc = (torch.randn(2, 1, 40, 16, generator=g) for _ in range(2))
    with attn.options(decode_splits=2):  # a workspace among the live tensors
        attn.decode(torch.randn(2, 2, 1, 16, generator=g), kc, vc, torch.tensor([33, 7], dtype=torch.int32))
    assert len(made) >= 4 and made[-1][0].fn.__name__ == "_decode_split"
    return made


def _binder(kernel: Any) -> tuple[Any, Any]:
    """(an sm_90 backend, Triton's binder of `kernel`) as JITFunction.run makes them on a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    jit = JITFunction(getattr(kernel, "fn", kernel))
    return backend, create_function_from_signature(jit.signature, jit.params, backend)


def test_bound_arguments_are_tritons(monkeypatch: pytest.MonkeyPatch) -> None:
    """For every plan a training step builds: the list `bound_args` makes of the plan's entries is what
    Triton's binder makes of the original call, and with other live tensors put in at the positions it gives,
    what the binder makes of the call with those tensors."""
    for kernel, args, kwargs, plan in _step_plans(monkeypatch):
        binder = _binder(kernel)[1]
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


def test_direct_launches_pass_what_jit_run_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the interpreter, a plan's first launch takes JITFunction.run and later ones the compiled kernel's
    launcher, with three grid sizes and the arguments JITFunction.run hands the launcher; a kernel wrapped
    after binding (a spy) takes JITFunction.run. Stand-ins record both: a kernel whose `run` binds as
    Triton's does, its compiled kernel, and the driver's current device."""
    from triton.runtime.driver import driver

    made = _step_plans(monkeypatch)

    class Device:
        def get_current_device(self) -> int:
            return 0

    monkeypatch.setattr(driver, "_active", Device())  # what `driver.active` returns (set_active, undone after)
    monkeypatch.setattr(plans, "_INTERPRET", False)
    with options(direct_launch=False):  # the default: every launch takes JITFunction.run
        kernel, args, kwargs, plan = made[0]
        seen0: list[tuple[str, Any, list[Any]]] = []
        named0 = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
        jit0 = _recording(kernel, seen0)
        plan.direct = None
        for _ in range(2):
            plan(jit0, [named0.get(n) for n in plan.live])
        assert [s[0] for s in seen0] == ["run", "run"] and plan.direct is None
    with options(direct_launch=True):
        _direct_runs(made)


def test_direct_launches_take_jit_run_while_a_graph_is_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CUDA graph capture a bound plan launches through JITFunction.run, as on the H100 the compiled
    launcher broke the capture; once the capture is over it takes the launcher again."""
    from triton.runtime.driver import driver

    made = _step_plans(monkeypatch)

    class Device:
        def get_current_device(self) -> int:
            return 0

    monkeypatch.setattr(driver, "_active", Device())
    monkeypatch.setattr(plans, "_INTERPRET", False)
    kernel, args, kwargs, plan = made[0]
    seen: list[tuple[str, Any, list[Any]]] = []
    named = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
    jit = _recording(kernel, seen)
    live = [named.get(n) for n in plan.live]
    with options(direct_launch=True):
        plan.direct = None
        plan(jit, live)
        monkeypatch.setattr(plans, "_capturing", lambda: True)
        plan(jit, live)
        monkeypatch.setattr(plans, "_capturing", lambda: False)
        plan(jit, live)
    assert [s[0] for s in seen] == ["run", "run", "direct"]


def _direct_runs(made: list[Any]) -> None:
    for kernel, args, kwargs, plan in made:
        seen: list[tuple[str, Any, list[Any]]] = []
        named = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
        first = [named.get(n) for n in plan.live]
        later = [t.clone() if torch.is_tensor(t) else t for t in first]
        jit = _recording(kernel, seen)
        plan.direct = None
        plan(jit, first)
        plan(jit, later)
        plan(_recording(kernel, seen), later)  # another kernel object: not the one bound
        assert [s[0] for s in seen] == ["run", "direct", "run"]
        assert seen[1][1] == seen[0][1]
        _same(seen[1][2], seen[2][2])


def _recording(kernel: Any, seen: list[tuple[str, Any, list[Any]]]) -> Any:
    """A stand-in of `kernel` off the interpreter: `[grid](*args, **params)` appends ("run", the grid as the launcher
    takes it, what Triton's binder makes of params) and returns a compiled kernel whose `[grid](*args)`
    appends ("direct", grid, args)."""
    backend, binder = _binder(kernel)

    class Compiled:
        def __getitem__(self, grid: Any) -> Any:
            return lambda *a: seen.append(("direct", grid, list(a)))

    class Jit:
        arg_names = kernel.arg_names
        device_caches = {0: ({}, {}, None, backend, binder)}

        def __getitem__(self, grid: Any) -> Any:
            def run(*args: Any, **params: Any) -> Any:
                seen.append(("run", (*grid, 1, 1)[:3], list(binder(*args, **params)[0].values())))
                return Compiled()

            return run

    return Jit()


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x is y or (not torch.is_tensor(x) and not torch.is_tensor(y) and x == y), (x, y)


def test_descriptors_made_without_checks_equal_checked_ones() -> None:
    """`_descriptor` skips TensorDescriptor's checks once a (shape, strides, dtype, box) passed them: what it
    makes then equals what `from_tensor` makes, and an unaligned base goes through the checks again."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from patterndsl.runtime.common import _descriptor

    base = torch.zeros(2 * 64 * 64 + 8, dtype=torch.bfloat16)
    for t in (base[: 2 * 64 * 64].view(1, 2, 64, 64), base[8:].view(1, 2, 64, 64)):  # two aligned bases
        first, second = _descriptor(t, 32, 64), _descriptor(t, 32, 64)
        assert first == second == TensorDescriptor.from_tensor(t, [1, 1, 32, 64])
        assert second.base is t
    shifted = base[1 : 1 + 2 * 64 * 64].view(1, 2, 64, 64)  # 2 bytes off: the checks run and refuse it
    with pytest.raises(Exception) as want:
        TensorDescriptor.from_tensor(shifted, [1, 1, 32, 64])
    with pytest.raises(want.type):
        _descriptor(shifted, 32, 64)


def test_tma_verdicts_remembered_per_layout_still_check_each_base() -> None:
    """`_tma_mode` remembers a (shape, strides, dtype, head width) whose strides allow TMA, so later calls only
    look at the base: an unaligned base of a remembered layout, a broadcast tensor and strides of odd bytes are
    refused every time, and an aligned base of the layout is accepted again after them."""
    from patterndsl.runtime.common import _tma_mode

    base = torch.zeros(2 * 40 * 16 + 8, dtype=torch.bfloat16)
    aligned, shifted = base[: 2 * 40 * 16].view(1, 2, 40, 16), base[1 : 1 + 2 * 40 * 16].view(1, 2, 40, 16)
    odd = torch.zeros(1, 2, 40, 17, dtype=torch.bfloat16)[..., :16]  # rows 34 bytes apart
    broadcast = torch.zeros(16, dtype=torch.bfloat16).expand(1, 2, 40, 16)
    for _ in range(2):
        assert _tma_mode((aligned,), 16, 1) == 1
        assert _tma_mode((aligned, shifted), 16, 1) == 0
        assert _tma_mode((odd,), 16, 1) == 0 and _tma_mode((broadcast,), 16, 1) == 0
        assert _tma_mode((aligned,), 16, 0) == 0  # the mode asked for
