"""Autograd: four torch.library custom ops shared by every pattern, so torch.compile(fullgraph=True) sees one
opaque node per attention call; eagerly the same functions run under a plain autograd.Function.

The ops take the pattern as a string, the key of its `PatternSpec` in a registry, so one set of ops serves
every compiled pattern and a module loaded from any file path compiles without graph breaks. The ops'
namespace names this runtime's sources (`patterndsl_<hash>`), and the registry is one per namespace and
process, so a standalone copy of the same runtime shares both and a different one gets its own.
Patterns with a selector take an eager autograd.Function instead: the selection's data-dependent sizes keep
them out of the custom ops.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .backward import _backward, _varlen_backward
from .common import _head_patterns
from .forward import _forward, _varlen_forward
from .options import current_options, restored
from .selection import _picks
from .tuning import RUNTIME_ID

if TYPE_CHECKING:
    from .spec import PatternSpec

NAMESPACE = f"patterndsl_{RUNTIME_ID}"
_SHARED = sys.modules.setdefault(f"_{NAMESPACE}_registry", types.ModuleType(f"_{NAMESPACE}_registry"))
_SPECS: dict[str, PatternSpec] = _SHARED.__dict__.setdefault("specs", {})
_OPS = getattr(torch.ops, NAMESPACE)


def register(spec: PatternSpec) -> PatternSpec:
    """Make `spec` reachable from the custom ops by its key (idempotent)."""
    _SPECS.setdefault(spec.key, spec)
    return spec


def _spec(key: str) -> PatternSpec:
    return _SPECS[key]


def _layer(layer: int) -> int | None:
    return None if layer < 0 else layer


class DynamicAttention(torch.autograd.Function):
    """Autograd for patterns with a selector: the blocks are picked once in the forward pass (not
    differentiated) and the backward kernels read the same per-(batch, head) tables."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int,
                scores: torch.Tensor | None, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        spec = _spec(key)
        patterns = _head_patterns(spec, _layer(layer))
        group = q.shape[1] // k.shape[1]
        picks = _picks(spec, q, k, scores, group, patterns)
        out, lse = _forward(spec, q, k, v, scale, group, patterns, scores, picks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.layer, ctx.picks, ctx.key = scale, layer, picks, key
        ctx.options = current_options()
        return out, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor | None,
                 dlse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None, None]:
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        with restored(ctx.options):
            dq, dk, dv = _backward(_spec(ctx.key), do.contiguous(), q, k, v, o, lse, dlse, ctx.scale, ctx.layer,
                                   ctx.picks)
        return dq, dk, dv, None, None, None, None


# --- the static ops ------------------------------------------------------------------------------------
def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(key)
    return _forward(spec, q, k, v, scale, q.shape[1] // k.shape[1], _head_patterns(spec, _layer(layer)))


def _bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, scale: float, layer: int,
              key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(_spec(key), do, q, k, v, o, lse, dlse, scale, layer)


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32)


def _bwd_fake(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, scale: float, layer: int,
              key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, scale, layer, key = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.layer, ctx.key = scale, layer, key
    ctx.options = current_options()


def _grad(ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None,
          backward: Callable[..., Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    with restored(getattr(ctx, "options", current_options())):
        dq, dk, dv = (backward or _OPS.backward)(do, q, k, v, o, lse, dlse, ctx.scale, ctx.layer, ctx.key)
    return dq, dk, dv, None, None, None


# --- the packed-documents ops ----------------------------------------------------------------------------
def _varlen_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(key)
    return _varlen_forward(spec, q, k, v, cu_seqlens, scale, _head_patterns(spec, _layer(layer)))


def _varlen_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens: torch.Tensor,
                     scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _varlen_backward(_spec(key), do, q, k, v, o, lse, dlse, cu_seqlens, scale, layer)


def _varlen_fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    H, total = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[1], q.shape[2])
    return q.new_empty(q.shape), q.new_empty((1, H, total), dtype=torch.float32)


def _varlen_bwd_fake(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens: torch.Tensor,
                     scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cu_seqlens, scale, layer, key = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.scale, ctx.layer, ctx.key = scale, layer, key
    ctx.options = current_options()


def _varlen_grad(ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None,
                 backward: Callable[..., Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None, None]:
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    with restored(getattr(ctx, "options", current_options())):
        dq, dk, dv = (backward or _OPS.varlen_backward)(do, q, k, v, o, lse, dlse, cu_seqlens,
                                                                        ctx.scale, ctx.layer, ctx.key)
    return dq, dk, dv, None, None, None, None


def _define_ops() -> None:
    """The four ops, defined once per process (a second import of this module reuses them)."""
    if hasattr(_OPS, "forward"):
        return
    ops = (
        ("forward", _fwd_impl, _fwd_fake,
         "(Tensor q, Tensor k, Tensor v, float scale, int layer, str pattern) -> (Tensor, Tensor)"),
        ("backward", _bwd_impl, _bwd_fake,
         "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? dlse, float scale, int layer,"
         " str pattern) -> (Tensor, Tensor, Tensor)"),
        ("varlen_forward", _varlen_fwd_impl, _varlen_fwd_fake,
         "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, int layer, str pattern) -> (Tensor, Tensor)"),
        ("varlen_backward", _varlen_bwd_impl, _varlen_bwd_fake,
         "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? dlse, Tensor cu_seqlens,"
         " float scale, int layer, str pattern) -> (Tensor, Tensor, Tensor)"),
    )
    made: dict[str, Any] = {}
    for name, impl, fake, schema in ops:
        made[name] = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
        made[name].register_fake(fake)
    made["forward"].register_autograd(_grad, setup_context=_setup_context)
    made["varlen_forward"].register_autograd(_varlen_grad, setup_context=_varlen_setup_context)


_define_ops()


class _Eager(torch.autograd.Function):
    """A custom op's autograd (its forward, setup_context and backward functions) outside torch.compile: the
    dispatcher's checks around a custom op cost tens of microseconds a call on the host, the same order as a
    short layer's kernels. torch.compile keeps the custom ops, which it can trace."""

    @staticmethod
    def forward(ctx: Any, fwd: Callable[..., Any], setup: Callable[..., None], grad: Callable[..., Any],
                backward: Callable[..., Any], *inputs: Any) -> Any:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, as the grads expect
        output = fwd(*inputs)
        setup(ctx, inputs, output)
        ctx.grad, ctx.backward = grad, backward
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        return (None, None, None, None, *ctx.grad(ctx, *grads, backward=ctx.backward))


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) with autograd for a static pattern: the custom op under torch.compile, else the same
    functions under `_Eager`."""
    if torch.compiler.is_compiling():
        return _OPS.forward(q, k, v, scale, layer, key)  # type: ignore[no-any-return]
    return _Eager.apply(_fwd_impl, _setup_context, _grad, _bwd_impl, q, k, v, scale, layer, key)  # type: ignore[no-untyped-call, no-any-return]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, layer: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) with autograd for packed documents, as `static_attention`."""
    if torch.compiler.is_compiling():
        return _OPS.varlen_forward(q, k, v, cu_seqlens, scale, layer, key)  # type: ignore[no-any-return]
    return _Eager.apply(_varlen_fwd_impl, _varlen_setup_context, _varlen_grad, _varlen_bwd_impl,  # type: ignore[no-untyped-call, no-any-return]
                        q, k, v, cu_seqlens, scale, layer, key)


def differentiable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Take the autograd path (custom op, torch.compile) rather than the bare kernel launch?"""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
