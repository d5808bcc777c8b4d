"""FlashAttention-4 as a backend for the patterns it expresses natively: a band of key offsets around the
diagonal (no mask, causal, a causal or two-sided sliding window).

Its sm90 kernels are warp-specialised (a producer warp issuing TMA loads, two consumer warpgroups in
ping-pong, softmax overlapped with the next tile's products), which the `tl` kernels are not; for a band
there is nothing our tables add, so the call may go to FA4. The Triton kernels stay the reference and the
default: FA4 is considered only where its package imports (the `fa4` extra), the GPU is sm90 or sm100, and
the inputs are in its range; then the tuner times both forwards at the first call per shape and keeps the
faster (the backward follows the forward's choice: FA4's autograd function, or ours). The `fa4` option
forces either way; `attn.backend(q, k, v)` says which one a call takes.

Which patterns are bands is derived from the predicate's meaning, not from its spelling: a predicate that
reads i and j only through d = i - j (`expr.offset_form`) has its allowed offsets found as runs by interval
subdivision (`intervals.runs`, work logarithmic in N), and is a band when they are one run holding d = 0.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..expr import offset_form
from ..intervals import runs
from .common import _INTERPRET, _pow2
from .forward import _may_tune
from .options import current_options
from .tuning import _tuned

if TYPE_CHECKING:
    from ..expr import Expr
    from .spec import PatternSpec


@dataclass(frozen=True)
class Band:
    """Keys j with i - left <= j <= i + right are allowed (FlashAttention's `window_size`); None: unbounded
    on that side."""

    left: int | None
    right: int | None

    @property
    def causal(self) -> bool:
        return self.left is None and self.right == 0

    def keywords(self) -> dict[str, Any]:
        """FA4's `flash_attn_func` arguments for this band."""
        if self.causal:
            return {"causal": True}
        return {"causal": False, "window_size": (self.left, self.right)}


BAND_WORK = 1 << 16  # classifier and point evaluations one band reading may spend before it answers None


class _OverBudget(Exception):
    """The band reading's own stop (not analysis.limits.OverBudget: a standalone module's runtime has no analysis)."""


def band(pred: Expr, n: int) -> Band | None:
    """The band that `pred` allows at length n, or None when it allows something else (or nothing, or its
    offsets are too scattered to read within `BAND_WORK`: then it is no band)."""
    form = offset_form(pred)
    if form is None or n < 1:
        return None
    spent = [0]

    def spend(units: int) -> None:
        spent[0] += units
        if spent[0] > BAND_WORK:
            raise _OverBudget

    try:
        found = runs(form, "i", -(n - 1), n - 1, n, spend)  # allowed offsets d = i - j, in work O(log N)
    except _OverBudget:
        return None
    if found.shape[0] != 1:
        return None
    lo, hi = int(found[0, 0]), int(found[0, 1])
    if lo > 0 or hi < 0:  # the diagonal outside: FA4's windows hold it
        return None
    return Band(None if hi >= n - 1 else hi, None if -lo >= n - 1 else -lo)


_BANDS: dict[tuple[str, int, int], Band | None] = {}


def _spec_band(spec: PatternSpec, pat: int, n: int) -> Band | None:
    """`band` of the spec's pattern `pat`, looked up by the spec's key on every call (no expression hashed)."""
    key = (spec.key, pat, n)
    if key not in _BANDS:
        if len(_BANDS) >= 4096:  # lengths that vary call after call: keep it bounded
            _BANDS.clear()
        _BANDS[key] = band(spec.predicates[pat].expr, n)
    return _BANDS[key]


@functools.cache
def _function(varlen: bool = False) -> Callable[..., Any] | None:
    """FA4's `flash_attn_func` (`flash_attn_varlen_func`), or None where its package (or its CUDA pieces) does
    not import."""
    try:
        from flash_attn.cute import (  # type: ignore[import-not-found, unused-ignore]
            flash_attn_func,
            flash_attn_varlen_func,
        )
    except Exception:  # noqa: BLE001 (not installed, or installed without a usable CUDA DSL)
        return None
    return flash_attn_varlen_func if varlen else flash_attn_func  # type: ignore[no-any-return, unused-ignore]


@dataclass(frozen=True)
class Docs:
    """Packed documents: the call's `cu_seqlens` (int32 or int64) and the longest document's length."""

    cu_seqlens: torch.Tensor
    longest: int


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn-4")
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # type: ignore[no-any-return, unused-ignore]


def why_not(spec: PatternSpec, patterns: int | tuple[int, ...], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, docs: Docs | None = None) -> str | None:
    """Why FA4 cannot take this call (one sentence), or None when it can. The pattern is asked first, then
    the inputs, then the device and the package, so every reason but the last two shows on any machine.
    With `docs` (q, k, v [1, H, total, D]) the pattern must not read N: then its band at the longest
    document's length, clipped to each document, is the band of every document."""
    if not isinstance(patterns, int):
        return "its heads use different patterns"
    if spec.layouts[patterns] is not None or spec.selectors[patterns] is not None \
            or spec.token_selection(patterns) is not None or spec.permute is not None:
        return "the pattern has a token layout, a selector or a permutation"
    if docs is not None and not spec.predicates[patterns].n_free:
        return "with packed documents FA4 needs a pattern that does not read N"
    if _spec_band(spec, patterns, q.shape[2] if docs is None else docs.longest) is None:
        return "the pattern is not a band of offsets around the diagonal at this length"
    if q.dtype not in (torch.bfloat16, torch.float16) or not q.dtype == k.dtype == v.dtype:
        return "FA4 takes bfloat16 or float16 q, k, v"
    d, dv = q.shape[-1], v.shape[-1]
    if not (8 <= d <= 256 and 8 <= dv <= 256 and d % 8 == 0 and dv % 8 == 0):
        return "FA4 takes head dims 8 to 256, multiples of 8"
    if q.device.type != "cuda" or _INTERPRET:
        return "FA4 runs on CUDA GPUs only"
    major = _capability(q.device.index)[0]
    if major not in (9, 10) or (major == 10 and not (max(d, dv) <= 128 or d == dv == 256)):
        return "FA4's kernels here are for sm90 (and sm100 at head dims up to 128, or 256)"
    if _function(docs is not None) is None:
        return "flash-attn-4 is not installed (pip install 'patterndsl[fa4]')"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, b: Band,
              docs: Docs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) by FA4 on [B, H, N, D] tensors (with `docs`, [1, H, total, D]): its [B, N, H, D] (or
    [total, H, D]) views, with its own autograd. The output is a view in our layout of FA4's contiguous
    result; the lse is [B, H, N] ([1, H, total])."""
    fn = _function(docs is not None)
    assert fn is not None  # why_not said it imports
    if docs is None:
        o, lse = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                    return_lse=True, **b.keywords())
        return o.transpose(1, 2), lse
    cu, longest = docs.cu_seqlens.to(torch.int32), docs.longest
    o, lse = fn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=cu,
                cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, softmax_scale=scale,
                return_lse=True, **b.keywords())
    return o.transpose(0, 1)[None], lse[None]


def chosen(spec: PatternSpec, patterns: int | tuple[int, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float, ours: Callable[[], object], docs: Docs | None = None) -> Band | None:
    """The band to run on FA4, or None for the Triton kernels: the `fa4` option where set (True: wherever FA4
    can take the call), else the tuner's pick between the two forwards (`ours()` launches ours) where
    tuning is on; fixed tiles and torch.compile keep ours. An FA4 call that fails at its first launch is
    reported once and the Triton kernels take the shape. `docs`: packed documents (q, k, v [1, H, total,
    D]), on FA4 only under fa4=True: the tuner does not offer FA4's varlen kernels until the GPU suite has
    compared them with ours."""
    if torch.compiler.is_compiling() or q.device.type != "cuda":  # first: dynamo cannot trace the options' read
        return None
    if _function(docs is not None) is None:  # first: most installs have no FA4
        return None
    opts = current_options()
    if opts.fa4 is False or opts.tiles is not None:
        return None
    if opts.fa4 is None and (docs is not None or not isinstance(patterns, int) or not _may_tune(spec, q, {patterns})):
        return None  # packed documents: FA4's varlen kernels only where asked for (fa4=True)
    if why_not(spec, patterns, q, k, v, docs) is not None:
        return None
    assert isinstance(patterns, int)
    n = q.shape[2] if docs is None else docs.longest
    b = _spec_band(spec, patterns, n)
    assert b is not None
    if not _launches(q, k, v, scale, b, docs):
        return None
    if opts.fa4:
        return b

    def run(cfg: tuple[int, ...]) -> object:
        with torch.no_grad():
            return attention(q, k, v, scale, b, docs) if cfg[0] else ours()

    fields = ("fa4", q.shape[-1], q.dtype, v.shape[-1], q.device.index, _pow2(n),
              (b.left, b.right, q.shape[1], k.shape[1], _version()))
    return b if _tuned(spec, fields, lambda: [(0,), (1,)], run, (0,))[0] else None


_PROBED: dict[tuple[Any, ...], str | None] = {}  # per shape: None where FA4 ran, else its error


def _launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, b: Band, docs: Docs | None) -> bool:
    """FA4 ran this shape once without an error (compiling it); a failure is reported once."""
    key = (q.shape, k.shape, v.shape, q.dtype, q.device, b, None if docs is None else docs.longest)
    if key not in _PROBED:
        try:
            with torch.no_grad():
                attention(q, k, v, scale, b, docs)
            _PROBED[key] = None
        except Exception as e:  # noqa: BLE001 (FA4 is an optional peer: its failure leaves ours in charge)
            _PROBED[key] = error = f"{type(e).__name__}: {e}"
            warnings.warn(f"FlashAttention-4 failed at {tuple(q.shape)} ({error[:200]}); the Triton "
                          "kernels run this shape", RuntimeWarning, stacklevel=3)
    return _PROBED[key] is None
