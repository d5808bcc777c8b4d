"""Host helpers every kernel launch shares: sizes, devices, tensor descriptors, heads and tables' CSR form."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import triton

from .options import current_options

if TYPE_CHECKING:
    from .spec import PatternSpec

_R = TypeVar("_R")
_V = TypeVar("_V")

_LOG2E = 1.4426950408889634

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    """The least power of two >= n, in plain Python: triton.next_power_of_2 goes through triton's
    constexpr-function wrapper on the host, which a training step would pay before every launch."""
    return 1 << max(0, n - 1).bit_length()


def _d_pad(D: int) -> int:
    """A head_dim padded for the kernels' tiles: a power of two, at least 16."""
    return max(16, _pow2(D))


def _on_device_of(fn: Callable[..., _R]) -> Callable[..., _R]:
    """Run `fn(spec, t, ...)` with t's GPU as the current device: Triton launches on the current device, and a
    model split over several GPUs calls with tensors on another one. (Inside a torch.compile trace the custom
    ops' own implementations, which carry this too, do the launching.)"""
    @functools.wraps(fn)
    def run(spec: PatternSpec, t: torch.Tensor, *args: Any, **kwargs: Any) -> _R:
        if t.is_cuda and not torch.compiler.is_compiling() and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(spec, t, *args, **kwargs)
        return fn(spec, t, *args, **kwargs)

    return run


def pred_kernel(spec: PatternSpec, pat: int) -> Any:
    """The @triton.jit predicate of pattern `pat`, the constexpr function argument the kernels call."""
    return spec.predicates[pat].kernel


def layout_kernel(spec: PatternSpec, pat: int) -> Any:
    """The @triton.jit token layout of pattern `pat` (rows -> (tokens, valid)), or None (contiguous)."""
    lay = spec.layouts[pat]
    return None if lay is None else lay.kernel


def _by_width(table: Sequence[tuple[int, _V]], D: int, itemsize: int) -> _V:
    """The entry of a (largest padded head_dim, value) table for head_dim D: tables are sized for 2-byte
    elements, so float32 rows, twice as wide in shared memory, take the entry of a head_dim twice as large."""
    width = D * max(1, itemsize // 2)
    for d, value in table:
        if width <= d:
            return value
    return table[-1][1]


_SMS: dict[int | None, int] = {}


def _sm_count(device: torch.device, otherwise: int) -> int:
    """The GPU's multiprocessors (cached), or `otherwise` off a GPU (the interpreter)."""
    if device.type != "cuda":
        return otherwise
    sms = _SMS.get(device.index)
    if sms is None:
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


_CAPABILITY: dict[int | None, int] = {}
_TMA_LAYOUTS: set[tuple[Any, ...]] = set()  # (shape, strides, dtype, d_pad) whose strides allow TMA


def _tma_mode(tensors: Sequence[torch.Tensor], d_pad: int, mode: int | None = None) -> int:
    """`mode` (default: the `tma_mode` option) where the GPU and every tensor allow it (16-byte aligned base and strides), else 0."""
    mode = current_options().tma_mode if mode is None else mode
    if mode == 0:
        return 0
    dev = tensors[0].device
    if dev.type == "cuda":
        cap = _CAPABILITY.get(dev.index)
        if cap is None:
            cap = _CAPABILITY[dev.index] = torch.cuda.get_device_capability(dev)[0]
        if cap < 9:
            return 0
    for t in tensors:  # plain loops: this runs before every launch, on the step's critical path
        if t.data_ptr() % 16:
            return 0
        layout = (t.shape, t.stride(), t.dtype, d_pad)
        if layout in _TMA_LAYOUTS:
            continue
        size, strides = t.element_size(), layout[1]
        if d_pad * size < 16:
            return 0
        for s in strides[:-1]:
            if (s * size) % 16:
                return 0
        for s, n in zip(strides, layout[0], strict=True):
            if s == 0 and n > 1:
                return 0  # a broadcast (expanded) tensor, e.g. the output gradient of out.sum(): pointer loads
        _TMA_LAYOUTS.add(layout)  # only the base's alignment changes the verdict for this layout now
    if mode == 2:
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            # on a GPU "cuda", the current device, which _on_device_of makes the tensors' own for every launch
            where = "cuda" if dev.type == "cuda" else dev
            triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=where))
    return mode


_CHECKED: set[tuple[Any, ...]] = set()  # (shape, strides, dtype, block, d_pad) that TensorDescriptor accepted


@functools.cache
def _descriptor_class() -> Any:
    """Triton's host TensorDescriptor, imported once (triton >= 3.2 is allowed; older ones lack it, and an
    import statement on every launch costs about a microsecond)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


def _descriptor(t: torch.Tensor, block: int, d_pad: int) -> Any:
    """A host TMA descriptor of a [B, H, N, D] tensor with [1, 1, block, d_pad] boxes: rows past N and
    columns past D load as zeros. TensorDescriptor's checks depend on the shape, strides, dtype, box and the
    base's alignment: once they passed for the first four, a descriptor of an aligned base is made without
    them (they cost more than the launch on a short step's host path)."""
    cls = _descriptor_class()
    shape, strides = t.shape, t.stride()
    key = (shape, strides, t.dtype, block, d_pad)
    if key not in _CHECKED or t.data_ptr() % 16:
        desc = cls.from_tensor(t, [1, 1, block, d_pad])
        _CHECKED.add(key)
        return desc
    desc = object.__new__(cls)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = t, shape, strides, [1, 1, block, d_pad], "zero"
    return desc


def _descriptors(mode: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, block_m: int,
                 block_n: int, d_pad: int) -> tuple[Any, Any, Any, Any]:
    if mode != 1:
        return None, None, None, None
    return (_descriptor(q, block_m, d_pad), _descriptor(k, block_n, d_pad), _descriptor(v, block_n, d_pad),
            _descriptor(out, block_m, d_pad))


def _csr(rows: torch.Tensor, cols: torch.Tensor, nrows: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(rows * ncols + cols)
    rows, cols = rows[order], cols[order]
    offsets = torch.searchsorted(rows, torch.arange(nrows + 1, dtype=rows.dtype, device=rows.device))  # no host sync
    return offsets.to(torch.int32), cols.to(torch.int32)


def _head_patterns(spec: PatternSpec, layer: int | None) -> int | tuple[int, ...]:
    """Which predicate each head of this call uses: an int (every head) or a tuple (one per head)."""
    if spec.model_layers is None:
        if layer is not None:
            raise TypeError(f"layer= is for modules compiled from a model; '{spec.name}' is one pattern")
        return 0 if spec.head_pattern is None else spec.head_pattern
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(spec.model_layers):
        raise ValueError(f"model '{spec.name}' has {len(spec.model_layers)} layers: pass layer=0..{len(spec.model_layers) - 1}, got {layer!r}")
    return spec.model_layers[layer]


def _heads_of(patterns: int | tuple[int, ...], pat: int, H: int) -> list[int]:
    return [h for h in range(H) if (patterns if isinstance(patterns, int) else patterns[h]) == pat]


_HEAD_IDS: dict[tuple[Any, ...], torch.Tensor] = {}


def _heads(pat: int, patterns: int | tuple[int, ...], H: int, device: torch.device | str) -> torch.Tensor:
    key = (pat, patterns, H, str(device))
    heads = _HEAD_IDS.get(key)
    if heads is None:
        heads = _HEAD_IDS[key] = torch.tensor(_heads_of(patterns, pat, H), dtype=torch.int32, device=device)
    return heads


def _layout4(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[total, H, D] tensors as [1, H, total, D] views (4-D ones unchanged)."""
    return tuple(t.permute(1, 0, 2)[None] if t.dim() == 3 else t for t in ts)


def _docs(cu_seqlens: torch.Tensor) -> tuple[list[int], list[int]]:
    cu = cu_seqlens.tolist()
    return cu[:-1], [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]


def _torch_path(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and (not _INTERPRET or q.dtype == torch.float64)


def _dot_prec(q: torch.Tensor) -> str:
    """The kernels' tl.dot input precision: exact for float32 inputs, tensor cores otherwise."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


_ARRIVALS: dict[tuple[str, int], torch.Tensor] = {}


@contextlib.contextmanager
def counted(n: int, device: torch.device) -> Iterator[torch.Tensor]:
    """`arrivals(n, device)` for a launch: a launch that raises (the interpreter stops a program midway) may
    leave counters set, so they are zeroed again before the error propagates."""
    counters = arrivals(n, device)
    try:
        yield counters
    except BaseException:
        counters.zero_()
        raise


def arrivals(n: int, device: torch.device) -> torch.Tensor:
    """At least n int32 arrival counters, zero between launches (a kernel's last program to arrive on one
    resets it), so that the last of a group of programs finishes their work without a second launch (the
    decode step's split merge). One buffer per device and stream: launches
    running at the same time on other streams never share it (a CUDA graph keeps the buffer of the stream
    it was captured on)."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    hit = _ARRIVALS.get(key)
    if hit is None or hit.numel() < n:
        hit = _ARRIVALS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return hit
