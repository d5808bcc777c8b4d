"""Dynamic selectors (`topk`, `threshold`, `score=given`) in compiled patterns, against LANGUAGE.md read
literally (`reference.dynamic_mask`: sets node by node, float64, ties to the lower block index).

Inputs are small integers so that block means and scores are exact in float32 too: scores tie often, and
the kernel's selection must equal the float64 one block for block. Attention outputs are compared with a
float64 masked softmax over the reference's mask, outputs poisoned (NaN) before each run (`out=` and
`lse=` filled with NaN; through autograd, `poisoned`). The Triton kernels run in the CPU interpreter
(conftest.py); float64 inputs take the runtime's PyTorch path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import reference as R
from helpers import LIBRARY

import patterndsl as P
from patterndsl import ir
from patterndsl.cli import main as patc
from patterndsl.source import PatternError

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from patterndsl.runtime import autograd, cpu, selection  # noqa: E402 (they import torch)

SMALL = dict(block_m=16, block_n=16)

CASES = {
    "nsa": "causal & (window(15) | topk(2, block=16) | sink(16))",
    "plain_topk": "topk(3, block=16)",
    "threshold": "causal & threshold(0.7, block=32)",
    "given": "causal & topk(2, block=32, score=given)",
    "context_in_union": "(causal & topk(1, block=16)) | window(3)",
    "nested_context": "causal & (window(8) | (where(k >= 16) & topk(2, block=16)))",
}


# several selectors in one pattern, combined by the set algebra (NOSA's shape first)
MULTI = {
    "nosa": "causal & (window(15) | topk(2, block=16) | topk(1, block=16, score=given))",
    "difference": "causal & (topk(3, block=16) - topk(1, block=16, score=given))",
    "cases": "(causal & topk(2, block=16)) | (window(20) & threshold(0.5, block=16))",
    "complement": "causal & ~topk(2, block=32)",
}


def _module(src: str, **kw: Any) -> Any:
    return P.compile(f"pattern p = {src}\n", **(kw or SMALL))


def _nan(shape: Any, dtype: Any, device: Any = "cpu") -> Any:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def _run(m: Any, q: Any, k: Any, v: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`m.attention_lse` (no grad) into `out=` and `lse=` filled with NaN: an element the kernels leave
    unwritten stays NaN. The results must be those very tensors."""
    out, lse = _nan(q.shape, q.dtype), _nan(q.shape[:3], torch.float32)
    with torch.no_grad():
        got, got_lse = m.attention_lse(q, k, v, out=out, lse=lse, **kwargs)
    assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr(), "results not written in place"
    return got, got_lse


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Inside the block the autograd path (the functions `patterndsl.runtime.autograd` calls; a selector's
    backward has no public entry with `dq=`) writes into NaN-filled tensors: out and lse of the forward,
    dq, dk, dv of the backward, so an element the kernels leave unwritten shows as NaN (where dK, dV are
    summed over head patterns the runtime zeroes them first, as it does its own)."""
    fwd, bwd = autograd._forward, autograd._backward

    def forward(spec: Any, q: Any, *args: Any, **kwargs: Any) -> Any:
        return fwd(spec, q, *args, out=_nan(q.shape, q.dtype, q.device),
                   lse=_nan(q.shape[:3], torch.float32, q.device), **kwargs)  # fmt: skip

    def backward(spec: Any, do: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        grads = tuple(_nan(t.shape, t.dtype, t.device) for t in (q, k, v))
        return bwd(spec, do, q, k, v, *args, grads=grads, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autograd, "_forward", forward)
        mp.setattr(autograd, "_backward", backward)
        yield


def _inputs(n: int, h: int = 4, hkv: int = 2, b: int = 2, d: int = 16, seed: int = 0, dtype: Any = None) -> Any:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (b, h, n, d), generator=g).float()
    k = torch.randint(-2, 3, (b, hkv, n, d), generator=g).float()
    v = torch.randn(b, hkv, n, d, generator=g)
    return tuple(x.to(dtype) if dtype is not None else x for x in (q, k, v))


def _given(src: str, q: Any, blk: int, seed: int = 1) -> Any:
    if "given" not in src:
        return None
    nb = -(-q.shape[2] // blk)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (q.shape[0], q.shape[1], nb, nb), generator=g).float()


def _dense(q: Any, k: Any, v: Any, mask: np.ndarray, scale: float) -> tuple[Any, Any]:
    group = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~torch.from_numpy(mask), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    return p @ v.double().repeat_interleave(group, 1), lse


def _block(src: str) -> int:
    sel = next(x for x in ir.walk(P.pattern(src)) if isinstance(x, ir.TopK | ir.Threshold))
    return sel.block


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "nsa" else n  # nsa: about 10 s
                                  for n in sorted(CASES)])
def test_selection_and_attention_match_the_literal_reference(name: str) -> None:
    src = CASES[name]
    n = 100  # ragged last block of 4 tokens: its mean stays exact
    q, k, v = _inputs(n) if name == "nsa" else _inputs(n, h=2, hkv=1, b=1)  # GQA and batch once
    scores = _given(src, q, _block(src))
    mask, picked = R.dynamic_mask(P.pattern(src), q.numpy(), k.numpy(), None if scores is None else scores.numpy())
    m = _module(src)
    assert np.array_equal(m.selected_blocks(q, k, scores=scores).numpy(), picked)
    out, lse = _run(m, q, k, v, scores=scores)
    want, want_lse = _dense(q, k, v, mask, 16**-0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.double() - want).abs().max().item() < 2e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))


@pytest.mark.parametrize("name", ["nsa", "threshold", "given"])
def test_pytorch_path_float64_matches_the_reference(name: str) -> None:
    src = CASES[name]
    q, k, v = (x.double() for x in _inputs(96, seed=3))
    scores = _given(src, q, _block(src))
    mask, picked = R.dynamic_mask(P.pattern(src), q.numpy(), k.numpy(), None if scores is None else scores.numpy())
    m = _module(src)
    with pytest.warns(UserWarning, match="CPU tensors"):
        cpu._warned_cpu.clear()  # the warning is given once a process
        out, lse = _run(m, q, k, v, scores=scores)
    assert np.array_equal(m.selected_blocks(q, k, scores=scores).numpy(), picked)
    want, want_lse = _dense(q, k, v, mask, 16**-0.5)
    assert (out - want).abs().max().item() < 1e-12


def test_ties_go_to_the_lower_block_and_never_outside_the_context() -> None:
    # every key block scores exactly the same (k = 0 and k = -0 halves): the first blocks are kept
    q, k, v = _inputs(64, h=2, hkv=1, b=1)
    k = torch.zeros_like(k)
    k[..., 1::2, :] = -0.0
    m = _module("causal & topk(2, block=16)")
    got = m.selected_blocks(q, k)[0, 0]
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, want)


@pytest.mark.slow  # 7-9 s in the interpreter
def test_topk_keeps_min_of_n_and_candidates_per_query_block() -> None:
    q, k, _ = _inputs(128, seed=5)
    m = _module("causal & topk(3, block=16)")
    got = m.selected_blocks(q, k)
    counts = got.sum(-1)
    expect = torch.clamp(torch.arange(1, 9), max=3)
    assert torch.equal(counts, expect.expand_as(counts))
    assert not torch.triu(got, 1).any()  # a later key block is never a causal candidate


def test_threshold_of_one_keeps_every_candidate() -> None:
    q, k, v = _inputs(64, seed=2)
    m = _module("causal & threshold(1.0, block=16)")
    got = m.selected_blocks(q, k)
    assert torch.equal(got, torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand_as(got))


def test_heads_mix_static_and_dynamic_patterns() -> None:
    src = "heads {\n  0:1 => causal & window(7)\n  1:2 => causal & (sink(16) | topk(1, block=16))\n}"
    m = P.compile(f"pattern p = {src}\n", **SMALL)
    q, k, v = _inputs(80, h=2, hkv=1, b=1, seed=4)
    body = P.loads(f"pattern p = {src}\n").patterns[0].body
    assert isinstance(body, ir.Heads)
    m0 = np.array([[j <= i and i - j <= 7 for j in range(80)] for i in range(80)])
    m1, _ = R.dynamic_mask(body.ranges[1].pattern, q[:, 1:].numpy(), k.numpy())
    mask = np.stack([np.broadcast_to(m0, (1, 80, 80)), m1[:, 0]], 1)
    out, _ = _run(m, q, k, v)
    want, _ = _dense(q, k, v, mask, 16**-0.5)
    assert (out.double() - want).abs().max().item() < 2e-5
    picked = m.selected_blocks(q, k)
    assert not picked[:, 0].any() and picked[:, 1].sum() == 5


@pytest.mark.slow  # 7-9 s in the interpreter
def test_half_precision_inputs_run_and_match() -> None:
    src = CASES["nsa"]
    q, k, v = _inputs(64, dtype=torch.float16, seed=7)
    mask, picked = R.dynamic_mask(P.pattern(src), q.float().numpy(), k.float().numpy())
    m = _module(src)
    assert np.array_equal(m.selected_blocks(q, k).numpy(), picked)
    out, _ = _run(m, q, k, v)
    want, _ = _dense(q, k, v, mask, 16**-0.5)
    assert (out.double() - want).abs().max().item() < 5e-3


def test_scores_misuse_is_one_clear_sentence() -> None:
    q, k, v = _inputs(64)
    given = _module("causal & topk(2, block=16, score=given)")
    with pytest.raises(ValueError, match=r"score=given: pass scores="):
        given.attention(q, k, v)
    with pytest.raises(
        ValueError, match=r"scores must be \[batch, heads, ceil\(N/16\), ceil\(N/16\)\] = \[2, 4, 4, 4\]"
    ):
        given.attention(q, k, v, scores=torch.zeros(2, 4, 4, 3))
    with pytest.raises(TypeError, match="scores must be floating point"):
        given.attention(q, k, v, scores=torch.zeros(2, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="takes no scores"):
        _module("causal & topk(2, block=16)").attention(q, k, v, scores=torch.zeros(2, 4, 4, 4))


@pytest.mark.parametrize("fuse_pre", [False, True])
@pytest.mark.parametrize("name, dtype", [pytest.param("nsa", "float32", marks=pytest.mark.slow),  # 4-8 s each
                                         pytest.param("threshold", "float32", marks=pytest.mark.slow),
                                         ("given", "float64")])
def test_gradients_flow_to_q_k_v_through_the_picked_blocks(name: str, dtype: str, fuse_pre: bool) -> None:
    """Gradients of out and lse against float64 autograd over the reference mask (the selection fixed); also
    with the dQ kernel computing delta and lse2 itself (bwd_fuse_pre)."""
    src = CASES[name]
    q, k, v = (x.to(getattr(torch, dtype)) for x in _inputs(80, seed=9))
    v = torch.randn_like(v)
    scores = _given(src, q, _block(src))
    mask, _ = R.dynamic_mask(
        P.pattern(src), q.double().numpy(), k.double().numpy(), None if scores is None else scores.numpy()
    )
    m = _module(src)
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    with m.options(bwd_fuse_pre=fuse_pre), poisoned():
        out, lse = m.attention_lse(qs, ks, vs, scores=scores)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        ((out.double() * w_out).sum() + (torch.where(torch.isinf(lse), 0, lse).double() * w_lse).sum()).backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    want, want_lse = _dense(qd, kd, vd, mask, 16**-0.5)
    ((want * w_out).sum() + (torch.where(torch.isinf(want_lse), 0, want_lse) * w_lse).sum()).backward()
    tol = 1e-6 if dtype == "float64" else 2e-4  # lse is kept in float32
    for got, ref in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and ref is not None and not torch.isnan(got).any()
        assert (got.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


def _matches_reference(m: Any, src: str, q: Any, k: Any, v: Any, scores: Any) -> Any:
    """The selection equals the reference's block for block and the output (into NaN-filled buffers) its
    masked softmax: 1e-12 in float64 (the PyTorch path), 2e-5 in float32 (the interpreter). Returns the
    selection."""
    mask, picked = R.dynamic_mask(P.pattern(src), q.numpy(), k.numpy(), None if scores is None else scores.numpy())
    got = m.selected_blocks(q, k, scores=scores)
    assert np.array_equal(got.numpy(), picked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the CPU path's notice
        out, lse = _run(m, q, k, v, scores=scores)
    want, want_lse = _dense(q, k, v, mask, 16**-0.5)
    assert (out.double() - want).abs().max().item() < (1e-12 if q.dtype == torch.float64 else 2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    return got


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n == "nosa" else [pytest.mark.slow]) for n in MULTI]
)
def test_several_selectors_match_the_literal_reference(name: str) -> None:
    """Each selector picks among its own context; a block takes the pattern with the selectors that
    picked it full (the reference: sets node by node). Interpreter (float32) and PyTorch path (float64)."""
    src = MULTI[name]
    m = _module(src)
    for dtype in (torch.float32, torch.float64):
        q, k, v = (x.to(dtype) for x in _inputs(64, h=1, hkv=1, b=1, seed=13))
        _matches_reference(m, src, q, k, v, _given(src, q, _block(src)))


# scoring rules and selection shared by a KV head's query heads
RULES = {
    "max": "causal & topk(2, block=16, score=max)",
    "quest": "causal & (sink(16) | topk(2, block=16, score=quest))",
    "compressed_shared": "causal & (window(3) | topk(2, block=16, score=compressed, share=kv))",
    "given_shared": "causal & topk(2, block=16, score=given, share=kv)",
}


def _dtype_cases(table: dict[str, str], fast: tuple[str, ...], skip: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    """(name, dtype) cases of a table, float64 (the PyTorch path) and float32 (the interpreter), all slow
    but float64 of the names in `fast`."""
    return [pytest.param(n, d, marks=[] if d == "float64" and n in fast else [pytest.mark.slow])
            for n in sorted(table) for d in ("float64", "float32") if (n, d) not in skip]  # fmt: skip


@pytest.mark.parametrize(
    "name, dtype", _dtype_cases(RULES, ("quest", "given_shared"), skip=(("compressed_shared", "float32"),))
)
def test_scoring_rules_match_the_literal_reference(name: str, dtype: str) -> None:
    """Each rule's block scores as the reference computes them pair by pair, GQA (two query heads per KV
    head). float32 on integer inputs keeps max and quest exact; compressed (a softmax) runs in float64."""
    src = RULES[name]
    m = _module(src)
    q, k, v = (x.to(getattr(torch, dtype)) for x in _inputs(80, h=4, hkv=2, b=1, seed=23))
    got = _matches_reference(m, src, q, k, v, _given(src, q, 16))
    if "shared" in name:  # the two query heads of a KV head pick alike
        assert torch.equal(got[:, 0::2], got[:, 1::2])


def test_unknown_scoring_rules_are_refused_plainly() -> None:
    with pytest.raises(PatternError, match="topk has no scoring rule 'avg': mean, max, quest, compressed or given"):
        P.compile("pattern p = causal & topk(2, block=16, score=avg)\n")
    with pytest.raises(PatternError, match="topk's share can only be 'kv'"):
        P.compile("pattern p = causal & topk(2, block=16, share=q)\n")


# key blocks of their own size (HiP: many small key blocks per query block)
SHAPES = {
    "hip": "causal & (window(3) | topk(3, block=(32, 16)))",
    "wide_keys": "causal & (topk(1, block=(16, 32)) | topk(2, block=(16, 32), score=given))",
}


@pytest.mark.parametrize("name, dtype", _dtype_cases(SHAPES, ("hip",)))
def test_non_square_blocks_match_the_literal_reference(name: str, dtype: str) -> None:
    """block=(bq, bk): query blocks of bq tokens pick key blocks of bk; forward and gradients."""
    src = SHAPES[name]
    m = _module(src)
    q, k, v = (x.to(getattr(torch, dtype)) for x in _inputs(80, h=2, hkv=1, b=1, seed=29))
    sel = next(x for x in ir.walk(P.pattern(src)) if isinstance(x, ir.TopK))
    scores = None
    if "given" in src:
        g = torch.Generator().manual_seed(2)
        scores = torch.randint(0, 3, (1, 2, -(-80 // sel.block), -(-80 // (sel.key_block or sel.block))), generator=g)
        scores = scores.to(q.dtype)
    mask, picked = R.dynamic_mask(P.pattern(src), q.numpy(), k.numpy(), None if scores is None else scores.numpy())
    assert np.array_equal(m.selected_blocks(q, k, scores=scores).numpy(), picked)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the CPU path's notice
        out = m.attention(qs, ks, vs, scores=scores)
    (out.double() * w).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    want, _ = _dense(qd, kd, vd, mask, 16**-0.5)
    (want * w).sum().backward()
    tol = 1e-6 if dtype == "float64" else 2e-4  # lse is kept in float32
    assert (out.double() - want).abs().max().item() < tol
    for got, ref in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and ref is not None
        assert (got.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


# budgets: a share of each query block's candidates, a count that grows with N
BUDGETS = {
    "fraction": "causal & (window(3) | topk(0.3, block=16))",
    "fraction_given": "topk(0.5, block=16, score=given)",
    "count_of_n": "causal & topk(N // 40, block=16)",
}


@pytest.mark.parametrize("name, dtype", _dtype_cases(BUDGETS, ("fraction",)))
def test_budgets_match_the_literal_reference(name: str, dtype: str) -> None:
    """topk(p, ...) keeps ceil(p * c) of c candidates (p the decimal written: 0.3 of 10 is 3); topk(f(N), ...)
    keeps f(N) at that N. float64: the PyTorch path; float32: the interpreter's kernels."""
    src = BUDGETS[name]
    m = _module(src)
    for n in (96, 160):  # 6 and 10 blocks: shares that round up and one that is exact; N // 40 = 2, then 4
        q, k, v = (x.to(getattr(torch, dtype)) for x in _inputs(n, h=1, hkv=1, b=1, seed=19))
        _matches_reference(m, src, q, k, v, _given(src, q, 16))


def test_budget_misuse_is_refused_plainly() -> None:
    with pytest.raises(PatternError, match=r"topk's fraction must be in \(0, 1\], got 1.5"):
        P.compile("pattern p = causal & topk(1.5, block=16)\n")
    q = torch.zeros(1, 1, 100, 16)
    with pytest.raises(ValueError, match="topk's count must be at least 1, got 0 at N = 100"):
        _module("causal & topk(N // 4096, block=16)").attention(q, q, q)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nosa", "cases"])
def test_gradients_of_several_selectors(name: str) -> None:
    """Backward over the merged picks, the selection cases' predicates dispatched in the kernels ("cases")."""
    src = MULTI[name]
    q, k, v = _inputs(80, h=2, hkv=1, b=1, seed=17)
    scores = _given(src, q, _block(src))
    mask, _ = R.dynamic_mask(P.pattern(src), q.numpy(), k.numpy(), None if scores is None else scores.numpy())
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    with poisoned():
        (_module(src).attention(qs, ks, vs, scores=scores).double() * w).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    (_dense(qd, kd, vd, mask, 16**-0.5)[0] * w).sum().backward()
    for got, ref in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and ref is not None
        assert (got.double() - ref).abs().max().item() < 2e-4 * max(1.0, ref.abs().max().item())


def test_uncompilable_selectors_are_refused_plainly(tmp_path: Any) -> None:
    with pytest.raises(PatternError, match="multiple of 16 to compile.*got 8"):
        P.compile("pattern p = causal & topk(2, block=8)\n")
    text = "pattern p = causal & (topk(2, block=16) | threshold(0.5, block=32))\n"
    with pytest.raises(PatternError, match="share one block size to compile: block=32 here, block=16 in the first"):
        P.compile(text)
    (tmp_path / "p.pat").write_text(text)
    assert patc(["check", str(tmp_path / "p.pat")]) == 2  # check refuses what compile refuses
    many = " | ".join(f"topk({n}, block=16)" for n in range(1, 8))
    with pytest.raises(PatternError, match="at most 6 selectors, this one 7"):
        P.compile(f"pattern p = {many}\n")


@pytest.mark.parametrize(
    "file, name",
    [
        pytest.param("nsa.pat", "nsa", marks=pytest.mark.slow),  # about 5 s; CASES["nsa"] is its shape, fast tier
        pytest.param("seer.pat", "seer_local", marks=pytest.mark.slow),  # about 8 s
        pytest.param("flexprefill.pat", "prefill", marks=pytest.mark.slow), ("xattention.pat", "xattention"),
        pytest.param("nosa.pat", "nosa", marks=pytest.mark.slow),  # MULTI["nosa"] is its shape, fast tier
        pytest.param("sparsed.pat", "sparsed", marks=pytest.mark.slow),  # BUDGETS["fraction"], fast tier
        pytest.param("nsa.pat", "nsa_shared", marks=pytest.mark.slow),  # RULES["compressed_shared"], fast tier
        pytest.param("infllm_v2.pat", "infllm_v2", marks=pytest.mark.slow),
        pytest.param("quest.pat", "quest_pages", marks=pytest.mark.slow),  # RULES["quest"], fast tier
        pytest.param("hip.pat", "hip", marks=pytest.mark.slow),  # SHAPES["hip"], fast tier
    ],  # fmt: skip
)
def test_library_selector_patterns_match_the_reference(file: str, name: str) -> None:
    path = LIBRARY / file
    pat = P.load(path).get(name).body  # type: ignore[union-attr]
    assert isinstance(pat, ir.Pattern.__args__)  # type: ignore[attr-defined]
    sel = next(x for x in ir.walk(pat) if isinstance(x, ir.TopK | ir.Threshold))
    n = 2 * sel.block + 16  # a ragged last block of 16 tokens
    q, k, v = _inputs(n, h=2, hkv=1, b=1, seed=11)
    given = any(isinstance(x, ir.TopK) and x.given for x in ir.walk(pat))
    scores = _given("given" if given else "", q, sel.block)
    mask, picked = R.dynamic_mask(pat, q.numpy(), k.numpy(), None if scores is None else scores.numpy())
    m = P.compile(path, name, **SMALL)
    assert np.array_equal(m.selected_blocks(q, k, scores=scores).numpy(), picked)
    want, _ = _dense(q, k, v, mask, 16**-0.5)
    assert (m.attention(q, k, v, scores=scores).double() - want).abs().max().item() < 2e-5


COMPRESSED = {
    "shared": "causal & (window(3) | topk(2, block=16, score=compressed, share=kv))",
    "per_head": "causal & (sink(16) | topk(3, block=16, score=compressed))",
    "scattered": "where(k < q // 2 or k > q + 40) & topk(3, block=16, score=compressed, share=kv)",
    "fraction": "causal & (window(3) | topk(0.4, block=16, score=compressed))",  # picked by `_pick`
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "shared" else [pytest.mark.slow]) for n in COMPRESSED])
def test_compressed_scores_off_the_torch_path_pick_as_the_reference(name: str) -> None:
    """The compressed rule's scoring kernel (float32, the interpreter; one selection per KV head with
    share=kv, a context whose candidates are not one run of blocks in "scattered") picks the float64
    reference's blocks on normal inputs (no near ties), and the heads of a KV head pick alike."""
    src = COMPRESSED[name]
    g = torch.Generator().manual_seed(31)
    q, k = torch.randn(1, 4, 88, 16, generator=g), torch.randn(1, 2, 88, 16, generator=g)
    _, picked = R.dynamic_mask(P.pattern(src), q.double().numpy(), k.double().numpy(), None)
    got = _module(src).selected_blocks(q, k)
    assert np.array_equal(got.numpy(), picked)
    if "share=kv" in src:
        assert torch.equal(got[:, 0::2], got[:, 1::2])


@pytest.mark.slow  # 7-9 s in the interpreter
def test_split_dkdv_rows_of_a_shared_selection_give_the_reference_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bwd_split=3`: the dK/dV rows of a selector's per-(batch, head) tables with more than 3 tile iterations
    (their query blocks times the KV head's four query heads; which rows, the device decides) run in pieces
    adding into a float32 workspace; gradients against float64 autograd over the reference mask."""
    from helpers import spy_launches

    from patterndsl.runtime import backward

    src = "causal & (window(15) | topk(2, block=16, share=kv) | sink(16))"
    merged: list[Any] = []
    spy_launches(monkeypatch, backward, "_attn_bwd_dkdv_merge", merged, lambda kw: kw["BLOCK_N"])
    q, k, v = _inputs(80, h=4, hkv=1, b=2, seed=5)
    v = torch.randn_like(v)
    mask, _ = R.dynamic_mask(P.pattern(src), q.double().numpy(), k.double().numpy())
    m = _module(src)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    with m.options(bwd_split=3), poisoned():
        (m.attention(qs, ks, vs).double() * w).sum().backward()
    assert merged
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    (_dense(qd, kd, vd, mask, 16**-0.5)[0] * w).sum().backward()
    for got, ref in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and ref is not None and not torch.isnan(got).any()
        assert (got.double() - ref).abs().max().item() < 2e-4 * max(1.0, ref.abs().max().item())


# the context's candidates as one run of key blocks per query block (ranges) or as bytes (`_spans`)
SCORED = {"ranges": "causal & (sink(16) | topk(3, block=16, score=compressed{}))",
          "bytes": "where(k < q // 2 or k > q + 40) & topk(3, block=16, score=compressed{})"}  # fmt: skip


@pytest.mark.interpreter
@pytest.mark.parametrize(("context", "share", "heads", "dtype"), [
    pytest.param("ranges", True, [0, 1, 2, 3], "float32", marks=pytest.mark.slow),  # consecutive heads (no table)
    ("ranges", True, [0, 2, 3], "float32"),  # one KV head's two heads, the other's one
    pytest.param("bytes", True, [1], "float32", marks=pytest.mark.slow),  # a KV head no head reads: zeros
    pytest.param("ranges", False, [0, 1, 3], "float32", marks=pytest.mark.slow),
    ("bytes", False, [0, 1, 2, 3], "float16"),
])  # fmt: skip
def test_compressed_score_sums_equal_the_float64_path(context: str, share: bool, heads: list[int], dtype: str) -> None:
    """The scoring kernels' sums on tiles of 16 rows and 16 key blocks (several tiles of packed query heads,
    several runs of key blocks per query block, a ragged last block) against the float64 PyTorch path's
    (held to the literal reference above), NaN off the candidates: float32 within 1e-5, float16 (16-bit
    mean keys and products, float32 sums) within 2e-2."""
    m = _module(SCORED[context].format(", share=kv" if share else ""))
    rule = m.spec.selectors[0].all[0]
    g = torch.Generator().manual_seed(37)
    q, k = (torch.randn(1, h, 270, 16, generator=g).to(getattr(torch, dtype)) for h in (4, 2))
    hs, nb = torch.tensor(heads, dtype=torch.int32), -(-270 // 16)
    with m.options(compressed_lse_tiles=(16, 16, 4, 1), compressed_sum_tiles=(16, 16, 4, 1)):
        got = selection._rule_scores(m.spec, rule, q, k, None, hs, 2, 0, nb)
    want = selection._rule_scores(m.spec, rule, q.double(), k.double(), None, hs, 2, 0, nb)
    assert got.shape == want.shape and torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert (got.double()[ok] - want[ok]).abs().max() < (1e-5 if dtype == "float32" else 2e-2)
