"""Token-level selectors (`vertical`, `slash`: MInference's vertical-slash pattern) against LANGUAGE.md's
definition read literally (`reference.dynamic_mask` with `reference.token_selection`: float64, ties to the
lower index). The PyTorch path runs float64 inputs; float32 ones run the Triton kernel in the CPU
interpreter (conftest.py), outputs poisoned (NaN) before each run so an unwritten element shows."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import reference as R
import strategies as S
from helpers import LIBRARY, attention_reference, poisoned, reference_grads
from hypothesis import given, settings

import patterndsl as P
from patterndsl.runtime import tokens

pytestmark = pytest.mark.interpreter

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

CASES = {
    "minference": "causal & (vertical(6, last=8) | slash(5, last=8) | window(3))",
    "vertical_only": "causal & (vertical(4, last=5) | sink(2))",
    "slash_minus_window": "causal & (slash(7) - window(1)) | sink(1)",
    "both_cases": "(causal & vertical(3, last=4)) | (window(20) & slash(4, last=4))",
}


def _inputs(n: int, dtype: Any, seed: int = 0, b: int = 1, h: int = 2, hkv: int = 1, d: int = 16) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, x, n, d, generator=g).to(dtype) for x in (h, hkv, hkv))


def _expected(src: str, q: Any, k: Any) -> np.ndarray:
    pattern = P.pattern(src)
    mask, _ = R.dynamic_mask(pattern, q.double().numpy(), k.double().numpy())
    return mask


KERNEL_FAST = ("minference", "vertical_only")  # the interpreter's cases in the fast tier; the others are slow


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, "float64") for name in CASES]
    + [pytest.param(name, "float32", marks=() if name in KERNEL_FAST else pytest.mark.slow) for name in CASES],
)
def test_forward_matches_definition(name: str, dtype: str) -> None:
    src = CASES[name]
    n = 70 if dtype == "float64" else 80  # ragged last tile; float32 runs the kernel (tile 64)
    q, k, v = _inputs(n, getattr(torch, dtype))
    attn = P.compile(f"pattern p = {src}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = poisoned(attn, q, k, v)
    mask = _expected(src, q, k)
    want, want_lse = attention_reference(q, k, v, mask, q.shape[-1] ** -0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = 1e-12 if dtype == "float64" else 2e-5
    assert (out.double() - want).abs().max().item() < tol
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)


def test_selection_is_the_definition() -> None:
    src = CASES["minference"]
    q, k, _ = _inputs(40, torch.float64, seed=3)
    attn = P.compile(f"pattern p = {src}\n")
    cols, offs = attn.selected_tokens(q, k)[0]
    pattern = P.pattern(src)
    causal = np.tril(np.ones((40, 40), dtype=bool))
    vert, slash = (x for x in _selectors(pattern))
    want_v = R.token_selection(vert, causal, q.numpy(), k.numpy())
    want_s = R.token_selection(slash, causal, q.numpy(), k.numpy())
    got_v = np.zeros_like(want_v)
    got_s = np.zeros_like(want_s)
    for h in range(2):
        got_v[0, h, cols[0, h].numpy()] = True
        got_s[0, h, offs[0, h].numpy()] = True
    assert (got_v == want_v).all() and (got_s == want_s).all()


def _selectors(p: Any) -> list[Any]:
    from patterndsl import ir

    return sorted(ir.token_selectors(p), key=lambda s: type(s).__name__ != "Vertical")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradients_match_definition(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: the backward reads the forward's tables, built once from the picks (the membership bytes,
    which the kernel's tables hold too)."""
    src = CASES["minference"]
    n = 70
    q, k, v = (t.requires_grad_() for t in _inputs(n, getattr(torch, dtype), seed=1, h=2, hkv=1))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    attn = P.compile(f"pattern p = {src}\n")
    built: list[int] = []
    membership = tokens.membership
    monkeypatch.setattr(tokens, "membership", lambda *a: built.append(1) or membership(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert len(built) == 1
    mask = _expected(src, q.detach(), k.detach())
    want = reference_grads(q, k, v, mask, q.shape[-1] ** -0.5, do)
    tol = 1e-6 if dtype == "float64" else 1e-4  # the log-sum-exp is float32 by contract
    for got, ref in zip(grads, want[2:], strict=True):
        assert (got.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


def test_library_pattern() -> None:
    """patterns/minference.pat's vertical-slash heads against the definition (float64, PyTorch path)."""
    attn = P.compile(LIBRARY / "minference.pat", "vertical_slash", {"v": 5, "s": 4, "last": 8, "w": 4})
    q, k, v = _inputs(48, torch.float64, seed=5, h=1, hkv=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, _ = poisoned(attn, q, k, v)
    prog = P.load(LIBRARY / "minference.pat", defines={"v": 5, "s": 4, "last": 8, "w": 4})
    mask, _ = R.dynamic_mask(prog.get("vertical_slash").body, q.numpy(), k.numpy())
    want, _ = attention_reference(q, k, v, mask, q.shape[-1] ** -0.5)
    assert (out - want).abs().max().item() < 1e-12


def test_unsupported_calls_say_so() -> None:
    attn = P.compile(f"pattern p = {CASES['minference']}\n")
    with pytest.raises(ValueError, match="vertical/slash"):
        attn.block_mask(64)
    q, k, v = _inputs(16, torch.float32)
    with attn.options(token_rows=96), pytest.raises(ValueError, match="token_rows must be 64 or 128, got 96"):
        attn(q, k, v)


@pytest.mark.slow  # the interpreter over 4 tiles x 2 heads: about 2 s
def test_kernel_walk_over_several_tiles() -> None:
    """N = 200 (four tiles, the last ragged): static tiles off the diagonals, diagonal tiles and gathered
    columns outside them all occur (one or two diagonals cannot touch every tile diagonal)."""
    src = "causal & (vertical(9, last=16) | slash(2, last=16) | window(5) | sink(3))"
    q, k, v = _inputs(200, torch.float32, seed=7, h=2, hkv=2)
    attn = P.compile(f"pattern p = {src}\n")
    out, lse = poisoned(attn, q, k, v)
    mask = _expected(src, q, k)
    want, _ = attention_reference(q, k, v, mask, q.shape[-1] ** -0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.double() - want).abs().max().item() < 2e-5


HEADS = """pattern p = heads {
    0:1 => causal & window(3)
    1:2 => causal & (vertical(3, last=6) | slash(2, last=6))
    2:4 => causal & (topk(1, block=16) | sink(2))
}
"""


@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_heads_mix_token_and_block_selectors(dtype: str) -> None:
    """Heads of a token-selector pattern beside static and topk heads, forward and gradients."""
    n = 48
    q, k, v = (t.requires_grad_() for t in _inputs(n, getattr(torch, dtype), seed=2, h=4, hkv=2))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(q.dtype)
    attn = P.compile(HEADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    body = P.loads(HEADS).get("p").body
    qd, kd = q.detach().double().numpy(), k.detach().double().numpy()
    masks = []
    for h in range(4):
        m, _ = R.dynamic_mask(body.pattern_for(h), qd[:, h:h + 1], kd[:, h // 2:h // 2 + 1])
        masks.append(m[0, 0])
    mask = np.stack(masks)
    want = reference_grads(q, k, v, mask, q.shape[-1] ** -0.5, do)
    tol = 1e-6 if dtype == "float64" else 1e-4
    assert (out.detach().double() - want[0]).abs().max().item() < tol
    for got, ref in zip(grads, want[2:], strict=True):
        assert (got.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


# --- the kernel's variants over arbitrary picks --------------------------------------------------------------

# the options the kernel's variants take (`Options.token_*`); the defaults are "rows64"
VARIANTS = {
    "rows64": {},
    "rows128": {"token_rows": 128},
    "bytes": {"token_bits": False},
    "rows128_first_kernel": {"token_rows": 128, "token_early_kv": False, "token_bits": False},
}
# a source and its mask given the picked columns V and offsets S, [i in V] and [i - j in S] per pair,
# read from the language's definition: allowed(i, j) = P_v(i, j), v = [j in V] + 2 [i - j in S]
PICKED = {
    "minference": ("causal & (vertical(6, last=8) | slash(5, last=8) | window(3) | sink(2))",
                   lambda i, j, v, s: (j <= i) & (v | s | (i - j <= 3) | (j < 2))),
    "both_cases": ("(causal & vertical(3, last=4)) | (window(20) & slash(4, last=4))",
                   lambda i, j, v, s: ((j <= i) & v) | ((abs(i - j) <= 20) & s)),
}


def _picked_mask(name: str, n: int, cols: list[list[int]], offs: list[list[int]]) -> np.ndarray:
    """[heads, n, n] by brute force over (i, j)."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    out = []
    for c, o in zip(cols, offs, strict=True):
        v = np.isin(j, c)
        s = (i - j >= 0) & np.isin(i - j, o)
        out.append(PICKED[name][1](i, j, v, s))
    return np.stack(out)


def _run_picks(name: str, n: int, cols: list[list[int]], offs: list[list[int]], variant: str,
               grad: bool) -> tuple[Any, ...]:
    """The kernel over the given picks (float32, the interpreter): (out, lse) and with `grad` (dq, dk, dv)
    of a random dO, all into NaN-filled buffers (dk, dv: zeros, the kernel adds to them)."""
    from patterndsl.runtime.options import options

    attn = P.compile(f"pattern p = {PICKED[name][0]}\n")
    q, k, v = _inputs(n, torch.float32, seed=n, h=2, hkv=1)
    heads = torch.arange(2)
    picks = tuple(torch.tensor(x, dtype=torch.int64).view(1, 2, -1) for x in (cols, offs))
    scale = q.shape[-1] ** -0.5
    out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"))
    with options(**VARIANTS[variant]):
        walk = tokens.token_walk(attn.spec, 0, q, picks)
        tokens.token_forward(attn.spec, 0, q, k, v, heads, walk, scale, 2, out, lse)
        if not grad:
            return out, lse
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
        dq = torch.full_like(q, float("nan"))
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        tokens.token_backward(attn.spec, 0, do, q, k, v, out, lse, heads, walk, scale, 2, dq, dk, dv)
    return out, lse, dq, dk, dv, do


def _check_picks(name: str, n: int, cols: list[list[int]], offs: list[list[int]], variant: str,
                 grad: bool) -> None:
    got = _run_picks(name, n, cols, offs, variant, grad)
    q, k, v = _inputs(n, torch.float64, seed=n, h=2, hkv=1)
    mask = _picked_mask(name, n, cols, offs)
    want, want_lse = attention_reference(q, k, v, mask, q.shape[-1] ** -0.5)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    assert (got[0].double() - want).abs().max().item() < 2e-5
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got[1]), fin)
    if fin.any():
        assert (got[1].double()[fin] - want_lse[fin]).abs().max().item() < 1e-4
    if grad:
        ref = reference_grads(q.float(), k.float(), v.float(), mask, q.shape[-1] ** -0.5, got[5])
        for g, r in zip(got[2:5], ref[2:], strict=True):
            assert (g.double() - r).abs().max().item() < 1e-4 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("variant", ["rows128", "bytes"])
def test_kernel_variants_fixed_picks(variant: str) -> None:
    """Two query tiles, a diagonal on each side of a tile diagonal's edge, a column in either tile: the
    variants other than the default (which the tests above run) forward and backward."""
    _check_picks("minference", 100, [[5, 40, 70, 99], [0, 63, 64, 80]], [[1, 63, 64, 90], [10, 20, 65, 99]],
                 variant, grad=True)


@pytest.mark.slow  # the interpreter, 4 variants x 6 examples x 2 sources: about 20 s
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(PICKED))
@settings(max_examples=6, deadline=None)
@given(picks=S.token_picks())
def test_kernel_variants_over_picks(name: str, variant: str, picks: tuple[int, list[list[int]], list[list[int]]]) -> None:
    """Every variant of the kernel over arbitrary columns and offsets, against the mask they mean; the
    backward on a third of the draws."""
    n, cols, offs = picks
    _check_picks(name, n, cols, offs, variant, grad=n % 3 == 0)


@settings(max_examples=50, deadline=None)
@given(picks=S.token_picks(max_n=400, heads=3))
def test_member_bits_are_the_membership(picks: tuple[int, list[list[int]], list[list[int]]]) -> None:
    """Bit b of word w of a row's column (offset) bits is set exactly where key (offset) 64 w + b is picked."""
    n, cols, offs = picks
    bits = tokens.member_bits(*(torch.tensor(x, dtype=torch.int64).view(3, -1) for x in (cols, offs)), n)
    assert bits.shape == (3, 2, -(-n // 64))
    d = torch.arange(bits.shape[2] * 64)
    got = (bits[:, :, d // 64] >> (d % 64)) & 1
    want = torch.tensor([[[x in p for x in range(bits.shape[2] * 64)] for p in pair] for pair in zip(cols, offs, strict=True)])
    assert torch.equal(got.bool(), want)
