"""`permute(B, segment=s, by=given)` at run time (patterndsl/runtime/permutation.py): outputs, log-sum-exp and
gradients in the caller's order equal a float64 reference built from the definition (B's mask in the
permuted order, read at the caller's pairs through the ranks), on random permutations, segments that do
not divide N, GQA, per-head orders, packed documents; the identity permutation is the pattern without
permute; PBS-Attn's two library patterns merged are PBS-Attn; misuse is one sentence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import (  # noqa: E402
    LIBRARY,
    attention_reference,
    cu_of,
    grad_tolerance,
    reference_grads,
    segment_permutation,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import dynamic_mask, permuted_mask, reference_mask  # noqa: E402

import patterndsl as P  # noqa: E402
from patterndsl.runtime.positions import merge  # noqa: E402

BODIES = (
    "causal & window(3)",
    "causal & (window(2) | sink(3))",
    "blockwise(5, causal - window(0)) | window(1)",
    "where(q // 4 == k // 4) | stride(3)",
)
_compiled: dict[str, Any] = {}


def _permuted(body: str, segment: int, **config: Any) -> Any:
    """The compiled `permute(body, segment=segment, by=given)` (16 x 16 tiles), cached."""
    key = f"{body}/{segment}/{sorted(config.items())}"
    if key not in _compiled:
        src = f"pattern p = permute({body}, segment={segment}, by=given)\n"
        _compiled[key] = P.compile(src, **(config or dict(block_m=16, block_n=16)))
    return _compiled[key]


def _qkv(b: int, h: int, hkv: int, n: int, d: int, dtype: Any, seed: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, x, n, d, generator=g).to(dtype) for x in (h, hkv, hkv, h))
    return q, k, v, do


def _check(attn: Any, mask: np.ndarray, q: Any, k: Any, v: Any, do: Any, perm: Any, tol: float) -> None:
    """Forward (into NaN-filled out=/lse=) and autograd gradients against `reference_grads` over `mask`."""
    want = reference_grads(q, k, v, mask, q.shape[-1] ** -0.5, do)
    out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
    with torch.no_grad():
        attn(q, k, v, permutation=perm, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten outputs"
    assert (out.double() - want[0]).abs().max().item() < tol
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want[1]))
    fin = torch.isfinite(lse)
    assert (lse.double()[fin] - want[1][fin]).abs().max().item() < max(tol, 1e-5) if fin.any() else True
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    got = torch.autograd.grad((attn(qg, kg, vg, permutation=perm) * do).sum(), (qg, kg, vg))
    for name, x, ref in zip(("dq", "dk", "dv"), got, want[2:], strict=True):
        err = ((x.double() - ref).norm() / ref.norm().clamp_min(1.0)).item()  # absolute where ref ~ 0 (N = 1)
        assert err < tol, f"|{name} - ref| / |ref| = {err}"


@settings(max_examples=8, deadline=None)
@given(body=st.sampled_from(BODIES), n=st.integers(1, 33), segment=st.sampled_from([1, 7, 16, 45]), seed=st.integers(0, 99),
       heads=st.sampled_from([(2, 2, "shared"), (4, 2, "per-head"), (4, 2, "per-kv-head"), (2, 1, "pair")]),
       batch=st.sampled_from([1, 2]))
def test_outputs_and_gradients_follow_the_definition(body: str, n: int, segment: int, seed: int,
                                                     heads: tuple[int, int, str], batch: int) -> None:
    # float64 on CPU tensors: the PyTorch path, exact; the permutation is shared, per batch element and per
    # query head or KV head, or a pair of orders (queries', keys')
    h, hkv, kind = heads
    q, k, v, do = _qkv(batch, h, hkv, n, 8, torch.float64, seed)
    inner = reference_mask(P.pattern(body), n)
    shape = {"per-head": (batch, h), "per-kv-head": (batch, hkv)}.get(kind, (batch,))
    perm = segment_permutation(shape, n, segment, seed)
    pk = segment_permutation(shape, n, segment, seed + 1) if kind == "pair" else perm

    def by_query_head(x: Any) -> np.ndarray:  # [batch, query heads or 1, N]: a group's heads share its order
        if kind == "per-kv-head":
            return x.numpy().repeat(h // hkv, axis=1)
        return x.numpy() if kind == "per-head" else x.numpy()[:, None]

    mask = permuted_mask(inner, by_query_head(perm), by_query_head(pk))
    given_perm = (perm, pk) if kind == "pair" else perm
    _check(_permuted(body, segment), mask, q, k, v, do, given_perm, grad_tolerance(torch.float64))


@pytest.mark.slow
@pytest.mark.interpreter
def test_the_kernels_follow_the_definition_gqa_per_head() -> None:
    # float32 through the Triton interpreter: N = 45 with segments of 16 (the last one shorter)
    body, n, seg = "causal & (window(2) | sink(3))", 45, 16
    q, k, v, do = _qkv(2, 4, 2, n, 16, torch.float32, 3)
    perm = segment_permutation((2, 4), n, seg, 7)
    mask = permuted_mask(reference_mask(P.pattern(body), n), perm.numpy(), perm.numpy())
    _check(_permuted(body, seg), mask, q, k, v, do, perm, 1e-4)


@pytest.mark.interpreter
def test_the_identity_permutation_is_the_pattern_without_permute() -> None:
    body, n = "causal & (window(5) | sink(2))", 40
    q, k, v, do = _qkv(1, 2, 2, n, 16, torch.float32, 1)
    plain = P.compile(f"pattern p = {body}\n", block_m=16, block_n=16)
    ident = torch.arange(n)[None]
    want, want_lse = plain(q, k, v, return_lse=True)
    got, got_lse = _permuted(body, 7)(q, k, v, permutation=ident, return_lse=True)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)


@pytest.mark.parametrize("dtype", [
    torch.float64,  # the PyTorch path
    pytest.param(torch.float32, marks=[pytest.mark.slow, pytest.mark.interpreter]),  # the packed-documents kernels
], ids=str)
def test_packed_documents_segment_each_document(dtype: Any) -> None:
    # segments start again at every document (lengths 13, 0, 20 with segments of 6)
    body, seg, lengths = "causal & window(3)", 6, [13, 0, 20]
    total = sum(lengths)
    cu = cu_of(lengths)
    starts = tuple(int(x) for x in cu[:-1])
    q, k, v, do = _qkv(1, 2, 1, total, 16, dtype, 4)
    perm = segment_permutation((1,), total, seg, 5, starts=starts)
    rank = torch.argsort(perm[0]).numpy()
    mask = np.zeros((total, total), dtype=bool)
    for a, e in zip(starts, [*starts[1:], total], strict=True):
        if e > a:  # the document's own pattern at its own length, over positions within the document
            inner = reference_mask(P.pattern(body), e - a)
            r = rank[a:e] - a
            mask[a:e, a:e] = inner[r[:, None], r[None, :]]
    want, want_lse = attention_reference(q, k, v, mask, 16**-0.5)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    attn = _permuted(body, seg)
    got, lse = attn(q, k, v, cu_seqlens=cu.long(), permutation=perm, return_lse=True)
    assert (got.double() - want).abs().max().item() < tol
    assert (lse.double() - want_lse).abs().max().item() < 1e-5
    packed = attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens=cu.long(),
                  permutation=perm)
    assert (packed.transpose(0, 1)[None].double() - want).abs().max().item() < tol


def test_pbs_library_patterns_merged_are_pbs_attn() -> None:
    # PBS-Attn: keys permuted within segments (queries in order), the selection over earlier segments in
    # the permuted order, the own segment causal in the caller's order; float64 on the PyTorch path
    defines = {"s": 32, "b": 16, "tau": 0.9}
    far = P.compile(LIBRARY / "pbs_attn.pat", "pbs", defines)
    near = P.compile(LIBRARY / "pbs_attn.pat", "pbs_diagonal", defines)
    n = 100
    q, k, v, do = _qkv(1, 2, 2, n, 8, torch.float64, 11)
    ident = torch.arange(n)[None]
    pk = segment_permutation((1,), n, 32, 12)
    inner = P.load(LIBRARY / "pbs_attn.pat", defines).get("pbs").body  # type: ignore[union-attr]
    kp = k[:, :, pk[0]]
    far_p, picked = dynamic_mask(inner, q.numpy(), kp.numpy())  # rows: queries in order; columns: permuted keys
    assert np.array_equal(far.selected_blocks(q, k, permutation=(ident, pk)).numpy(), picked)
    mask = permuted_mask(far_p, ident.numpy(), pk.numpy()) | reference_mask(P.pattern("causal & blockwise(32, window(0))"), n)
    want = reference_grads(q, k, v, mask, 8**-0.5, do)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = merge([far(qg, kg, vg, permutation=(ident, pk), return_lse=True), near(qg, kg, vg, return_lse=True)])
    assert (out.detach() - want[0]).abs().max().item() < 1e-6
    assert (lse.detach() - want[1]).abs().max().item() < 1e-5
    for x, ref in zip(torch.autograd.grad((out * do).sum(), (qg, kg, vg)), want[2:], strict=True):
        assert ((x - ref).norm() / ref.norm()).item() < grad_tolerance(torch.float64)


@pytest.mark.slow
@pytest.mark.interpreter
def test_a_permuted_selector_runs_in_the_kernels() -> None:
    # topk over blocks of permuted tokens, float32 through the interpreter, against the literal selection
    body, n, seg = "causal & (window(3) | topk(2, block=16))", 64, 32
    attn = _permuted(body, seg)
    q, k, v, do = _qkv(1, 2, 2, n, 16, torch.float32, 21)
    perm = segment_permutation((1,), n, seg, 22)
    inner, _ = dynamic_mask(P.pattern(body), q[:, :, perm[0]].numpy(), k[:, :, perm[0]].numpy())
    _check(attn, permuted_mask(inner, perm.numpy()[:, None], perm.numpy()[:, None]), q, k, v, do, perm, 1e-4)


# --- misuse -------------------------------------------------------------------------------------------------


def _misuse_inputs() -> tuple[Any, ...]:
    return _qkv(2, 2, 2, 10, 8, torch.float64, 0)[:3]


@pytest.mark.parametrize(
    "perm, message",
    [
        (None, "permutes tokens within segments of 4: pass permutation="),
        (torch.arange(10).float()[None], "must be an int32 or int64 tensor"),
        (torch.arange(10)[None, None, None], "must have shape [2 or 1, 10] or [2 or 1, 2 or 1, 10]"),
        (torch.arange(10).repeat(3, 1), "must have shape"),
        (torch.arange(10).flip(0)[None], "position 0 holds token 9, outside the segment 0:4"),
        (torch.tensor([[0, 0, 2, 3, 4, 5, 6, 7, 8, 9]]), "token 1 is not reached"),
        (torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 10]]), "position 9 holds token 10, outside the segment 8:10"),
        ((torch.arange(10)[None],), "one tensor or a pair"),
        ("0123", "must be a torch.Tensor"),
    ],
)
def test_a_wrong_permutation_is_one_sentence(perm: Any, message: str) -> None:
    q, k, v = _misuse_inputs()
    with pytest.raises((ValueError, TypeError)) as e:
        _permuted("causal", 4)(q, k, v, permutation=perm)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_async_checks_keep_the_result_and_still_refuse_a_wrong_permutation() -> None:
    """With async_checks the validity check is a device-side assertion (no host read): a valid order gives
    the same output, a wrong one still fails (on the CPU at once, on a GPU at the next synchronisation)."""
    q, k, v = _misuse_inputs()
    attn = _permuted("causal", 4)
    perm = torch.tensor([[1, 0, 3, 2, 4, 7, 6, 5, 9, 8]])
    with attn.options(async_checks=True):
        got = attn(q, k, v, permutation=perm)
        with pytest.raises(RuntimeError, match="onto itself"):
            attn(q, k, v, permutation=torch.tensor([[4, 0, 3, 2, 1, 7, 6, 5, 9, 8]]))
    assert torch.equal(got, attn(q, k, v, permutation=perm))


def test_calls_that_take_no_permutation_say_so() -> None:
    q, k, v = _misuse_inputs()
    attn = _permuted("causal", 4)
    with pytest.raises(ValueError, match="has no permute"):
        P.compile("pattern p = causal\n")(q, k, v, permutation=torch.arange(10)[None])
    with pytest.raises(ValueError, match="as many queries as keys"):
        attn(q[:, :, :5], k, v, permutation=torch.arange(10)[None])
    with pytest.raises(ValueError, match="decode\\(\\) does not take permuted patterns"):
        attn.decode(q[:, :, :1], k, v, torch.full((2,), 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="backward\\(\\) does not take permuted patterns"):
        attn.backward(q, q, k, v, q, q[..., 0])
    with pytest.raises(ValueError, match="out= and lse= take no gradients"):
        attn(q.requires_grad_(), k, v, permutation=torch.arange(10)[None], out=torch.empty_like(q))
