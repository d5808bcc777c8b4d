"""Launch plans: a kernel launch whose arguments, but for the call's own tensors, are bound once per key.

A short training step is bound by host time: before each launch the runtime rebuilds the same integers,
constexprs and table tensors, and Triton's `JITFunction.run` binds some sixty arguments, computes their
specialisation and a cache key. A plan keeps all of that for a key that determines it (the call site's
shapes, strides, dtypes, device, tiles, options, pattern), so a call only fills in its tensors. On a GPU,
after the plan's first launch (through `JITFunction.run`, which compiles), later ones go through the
compiled kernel's own launcher (`CompiledKernel[grid]`) with the argument list Triton bound the first time
(the `direct_launch` option, off by default until the GPU suite has run it; while a CUDA graph is
captured, launches take `JITFunction.run`);
a tensor that Triton would specialise differently (a data pointer not 16-byte aligned where the first
call's were) takes `JITFunction.run` again. Under the interpreter every launch takes `JITFunction.run`, on
the same arguments, so the tests cover what a plan passes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .common import _INTERPRET
from .options import current_options

_T = TypeVar("_T")
_PLANS: dict[Hashable, Any] = {}
_MAX_PLANS = 256


@dataclass
class Plan:
    """`fn[grid](**params)` with the entries named in `live` taken from each call. `direct`, once the first
    launch has compiled: the kernel it was bound for, the compiled kernel's launcher, Triton's bound argument
    list, and where in it the live entries go. `positional` and `keywords` are `params` as the call site
    passed them (live entries left out), and `slots` says where each live entry goes (an index into
    `positional`, or a name): copying the short list beats rebuilding a dict of every parameter and passing
    them all by name for each `JITFunction.run`."""

    grid: tuple[int, ...]
    params: dict[str, Any]
    live: tuple[str, ...]
    positional: list[Any]
    keywords: dict[str, Any]
    slots: tuple[int | str, ...]
    aligned: bool = True
    direct: tuple[Any, Callable[..., None], list[Any], tuple[int, ...]] | None = field(default=None, repr=False)

    def __call__(self, fn: Any, tensors: Sequence[Any]) -> None:
        """Launch `fn` (the call site's kernel, looked up at each call: one wrapped for a test or a profiler
        takes its own path) on `tensors`, the live entries in order."""
        direct = self.direct
        launcher = current_options().direct_launch
        # under CUDA graph capture the compiled launcher broke the capture on the H100 (the legacy stream made
        # to wait on the capturing one); a captured launch costs no host time at replay anyway
        if (launcher and direct is not None and direct[0] is fn and (not self.aligned or _aligned(tensors))
                and not _capturing()):
            _, runner, bound, where = direct
            args = bound.copy()
            for i, t in zip(where, tensors, strict=True):
                args[i] = t
            runner(*args)
            return
        args = self.positional.copy()
        named = self.keywords
        for slot, t in zip(self.slots, tensors, strict=True):
            if isinstance(slot, int):
                args[slot] = t
            else:
                if named is self.keywords:
                    named = named.copy()
                named[slot] = t
        kernel = fn[self.grid](*args, **named)
        if launcher and direct is None and not _INTERPRET and kernel is not None \
                and self.aligned == _aligned(tensors):
            params = {**self.params, **dict(zip(self.live, tensors, strict=True))}
            self.direct = _bind(fn, kernel, self.grid, params, self.live)


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (never on a build without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _aligned(tensors: Sequence[Any]) -> bool:
    """Every plain tensor's data 16-byte aligned, which Triton specialises pointers on (descriptors'
    bases must be aligned anyway)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() % 16:
            return False
    return True


def _bind(fn: Any, kernel: Any, grid: tuple[int, ...], params: dict[str, Any],
          live: tuple[str, ...]) -> tuple[Any, Callable[..., None], list[Any], tuple[int, ...]] | None:
    """(the compiled kernel's launcher, Triton's bound arguments, the live entries' positions) for a plan
    whose first launch compiled `kernel`; None where this triton lacks what it needs (its binder)."""
    from triton.runtime.driver import driver

    caches = getattr(fn, "device_caches", None)
    if caches is None:
        return None
    if hasattr(kernel, "result"):  # compiled asynchronously
        kernel = kernel.result()
    bound, where = bound_args(caches[driver.active.get_current_device()][4], params, live)
    for i in where:
        bound[i] = None  # a cached plan holds no call's tensors
    return fn, kernel[(*grid, 1, 1)[:3]], bound, where  # the launcher takes three grid sizes


def bound_args(binder: Callable[..., Any], params: dict[str, Any], live: Sequence[str]) -> tuple[list[Any], tuple[int, ...]]:
    """(the argument list Triton's `binder` makes of `params`, every parameter in the kernel's order with
    defaults filled, as `JITFunction.run` hands it to the launcher; the positions of the `live` entries)."""
    bound = binder(**params)[0]
    names = list(bound)
    return list(bound.values()), tuple(names.index(n) for n in live)


def cached(key: Hashable, build: Callable[[], _T]) -> _T:
    """What `build()` returns for `key` (plans and what a call site derives with them), built on a miss; the
    oldest entry is dropped past `_MAX_PLANS`."""
    hit = _PLANS.get(key)
    if hit is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        hit = _PLANS[key] = build()
    return hit


def make(kernel: Any, grid: tuple[int, ...], args: Sequence[Any], kwargs: dict[str, Any],
         live: Sequence[int | str]) -> Plan:
    """A plan of `kernel[grid](*args, **kwargs)` whose entries `live` (positions in args, names in kwargs) each
    call supplies, in that order; the rest (integers, constexprs, launch options, cached tables) stay. The
    plan remembers whether this first call's live tensors were aligned."""
    params = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
    names = tuple(n if isinstance(n, str) else kernel.arg_names[n] for n in live)
    aligned = _aligned([params.get(n) for n in names])
    params.update(dict.fromkeys(names))  # a cached plan holds no call's tensors
    positional = [None if i in live else a for i, a in enumerate(args)]  # the call site's own form
    keywords = {k: v for k, v in kwargs.items() if k not in names}
    return Plan(grid, params, names, positional, keywords, tuple(live), aligned)
