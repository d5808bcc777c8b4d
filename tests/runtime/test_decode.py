"""Decoding against a KV cache (`attn.decode`) and fewer queries than keys (`attn(q, k, v)`, Nq < Nk).

The reference is full attention at N = seqlen in float64, its last Nq rows, the mask read off LANGUAGE.md by
`reference.allowed` (nothing shared with the runtime's predicates or tables). Caches are poisoned: positions
past a sequence's length, and every page no query row can reach (pointed at a dummy page), hold NaN, so a
kernel that reads one shows. The float64 cases take the CPU path (hypothesis, cheap); float32 runs the Triton
kernels in the interpreter (a few small cases here, more under `slow`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from helpers import attention_reference, record_launches, reference_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import allowed
from strategies import decode_steps

import patterndsl as P
from patterndsl import ir

torch = pytest.importorskip("torch")

PATTERNS = [
    "causal & (window(5) | sink(2))",
    "causal",
    "causal & blockwise(4, hops(2) | window(1))",
    "causal & window(4, dilation=3)",  # a token layout: decoding keeps token order
    "window(3) | sink(1)",  # keys after the query, up to the sequence's end
    "causal & (window(4) | global(0:2))",  # its predicate clips the slice to N, yet rows do not depend on N
    "heads {\n    0:1 => causal & window(3)\n    1:2 => causal & sink(2)\n}",
]
_compiled: dict[str, Any] = {}


def _attn(src: str) -> Any:
    if src not in _compiled:
        _compiled[src] = P.compile(f"pattern p = {src}\n", block_m=16, block_n=16,
                                   bwd_config=(16, 16, 16, 16, 4, 1))
    return _compiled[src]


def _body(src: str) -> ir.Body:
    return P.loads(f"pattern p = {src}\n").get("p").body  # type: ignore[union-attr]


def _mask(body: ir.Body, heads: int, rows: range, n: int) -> np.ndarray:
    """[heads, rows, n]: `allowed` by brute force, per head."""
    per = [body.pattern_for(h) if isinstance(body, ir.Heads) else body for h in range(heads)]
    got = [[[allowed(p, i, j, n) for j in range(n)] for i in rows] for p in per]
    return np.array(got, dtype=bool).reshape(heads, len(rows), n)


def _reference(body: ir.Body, q: Any, ks: list[Any], vs: list[Any], scale: float) -> tuple[Any, Any]:
    """Per sequence b the last Nq rows of full attention over keys ks[b] [Hkv, L, D] (float64)."""
    H, Nq = q.shape[1], q.shape[2]
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        n = k.shape[1]
        mask = _mask(body, H, range(n - Nq, n), n) & (np.arange(n - Nq, n) >= 0)[None, :, None]
        o, lse = attention_reference(q[b:b + 1], k[None], v[None], mask, scale)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def _err(got: Any, want: Any) -> float:
    return (got.double() - want).abs().max().item() if want.numel() else 0.0


def _cache(body: ir.Body, H: int, Nq: int, ks: list[Any], vs: list[Any], capacity: int, page: int | None,
           seed: int, lengths: list[int]) -> tuple[Any, Any, Any]:
    """(k_cache, v_cache, page_table) holding ks[b], vs[b] [Hkv, L_b, D]; NaN past each length and in every
    page no query row of the step (at the final lengths) can reach (all pointed at page 0, NaN), other pages
    shuffled."""
    B, (Hkv, _, D), Dv = len(ks), ks[0].shape, vs[0].shape[-1]
    if page is None:
        kc = torch.full((B, Hkv, capacity, D), float("nan"), dtype=ks[0].dtype)
        vc = torch.full((B, Hkv, capacity, Dv), float("nan"), dtype=vs[0].dtype)
        for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
            kc[b, :, :k.shape[1]], vc[b, :, :v.shape[1]] = k, v
        return kc, vc, None
    pages = capacity // page
    rng = np.random.default_rng(seed)
    order = rng.permutation(B * pages) + 1  # page 0: the shared dummy
    kc = torch.full((B * pages + 1, page, Hkv, D), float("nan"), dtype=ks[0].dtype)
    vc = torch.full((B * pages + 1, page, Hkv, Dv), float("nan"), dtype=vs[0].dtype)
    table = torch.zeros((B, pages), dtype=torch.int32)
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        n, end = k.shape[1], lengths[b]
        reach = _mask(body, H, range(end - Nq, end), end).any((0, 1))
        for p in range(pages):
            if reach[p * page:(p + 1) * page].any():
                table[b, p] = int(order[b * pages + p])
                at = slice(p * page, max(p * page, min(n, (p + 1) * page)))
                kc[table[b, p], :at.stop - at.start] = k[:, at].transpose(0, 1)
                vc[table[b, p], :at.stop - at.start] = v[:, at].transpose(0, 1)
    return kc, vc, table


def _check_step(src: str, dtype: Any, lengths: list[int], Nq: int, n_new: int, hkv: int, group: int,
                page: int | None, seed: int, d: int = 8, dv: int = 8, **opts: Any) -> None:
    """A decode step (the last n_new tokens passed as k_new / v_new) against the reference, poisoned."""
    attn, body = _attn(src), _body(src)
    H = hkv * group if not isinstance(body, ir.Heads) else body.count
    hkv = hkv if H % hkv == 0 else 1
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(hkv, n, d, generator=g).to(dtype) for n in lengths]
    vs = [torch.randn(hkv, n, dv, generator=g).to(dtype) for n in lengths]
    q = torch.randn(len(lengths), H, Nq, d, generator=g).to(dtype)
    capacity = -(-max(max(lengths), Nq, 1) // (page or 1)) * (page or 1) + (page or 3)
    old = [n - n_new for n in lengths]
    kc, vc, table = _cache(body, H, Nq, [k[:, :n] for k, n in zip(ks, old, strict=True)],
                           [v[:, :n] for v, n in zip(vs, old, strict=True)], capacity, page, seed, lengths)
    if table is not None:  # the appended tokens' pages: real ones (the step writes them)
        for b, n in enumerate(lengths):
            for p in range(old[b] // page, -(-n // page)):
                if table[b, p] == 0:
                    table[b, p] = kc.shape[0]
                    kc = torch.cat([kc, torch.full_like(kc[:1], float("nan"))])
                    vc = torch.cat([vc, torch.full_like(vc[:1], float("nan"))])
    new = {}
    if n_new:
        new = dict(k_new=torch.stack([k[:, n - n_new:n] for k, n in zip(ks, lengths, strict=True)]),
                   v_new=torch.stack([v[:, n - n_new:n] for v, n in zip(vs, lengths, strict=True)]))
    seqlens = torch.tensor(old, dtype=torch.int32)
    out = torch.full((len(lengths), H, Nq, dv), float("nan"), dtype=dtype)
    lse = torch.full((len(lengths), H, Nq), float("nan"))
    with attn.options(**opts):
        got, got_lse = attn.decode(q, kc, vc, seqlens, page_table=table, return_lse=True, out=out, lse=lse, **new)
    assert got is out and got_lse is lse
    want, want_lse = _reference(body, q, ks, vs, d**-0.5)
    assert not torch.isnan(got).any() and not torch.isnan(got_lse).any(), "unwritten or poisoned elements read"
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert _err(got, want) < tol * 10
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got_lse), finite), "rows with no key: lse -inf, others finite"
    if finite.any():
        assert (got_lse.double()[finite] - want_lse[finite]).abs().max().item() < 1e-5


def _steps() -> st.SearchStrategy[dict[str, Any]]:
    return decode_steps(PATTERNS, 40, [None, 1, 3, 4, 8]).map(lambda c: {("Nq" if k == "nq" else k): v for k, v in c.items()})


@settings(max_examples=10)
@given(_steps())
def test_decode_rows_equal_full_attention_cpu(case: dict[str, Any]) -> None:
    """The CPU path (float64): contiguous and paged caches (shuffled pages, a NaN dummy for unreachable ones),
    appending k_new / v_new, GQA, per-head patterns."""
    _check_step(dtype=torch.float64, **case)


@pytest.mark.interpreter
@pytest.mark.parametrize("page", [pytest.param(None, marks=pytest.mark.slow), 4, 32])
def test_decode_kernel(page: int | None) -> None:
    """The Triton kernels: GQA packing, two queries straddling a query block, k_new appended, splits merged,
    Dv != Dqk, and (paged) unreachable pages pointing at a NaN dummy: pages smaller than a key tile (each
    key's page gathered) and pages holding whole tiles (one table entry per tile)."""
    _check_step("causal & (window(5) | sink(2))", torch.float32, [33], 2, 1, 2, 2, page, 0, dv=16,
                decode_block=16, decode_splits=2)


@pytest.mark.interpreter
@pytest.mark.parametrize("src", ["causal & (window(5) | sink(2))", "causal & window(9, dilation=2)"])
def test_decode_kernel_tma(src: str) -> None:
    """A contiguous cache's tiles through TMA descriptors (`decode_tma=1`): whole tiles, the cache NaN past
    each length, so a value row no query row attends to must be zeroed after its load; GQA, Dv != Dqk,
    k_new appended, splits merged."""
    _check_step(src, torch.float32, [33, 7], 2, 1, 2, 2, None, 4, dv=16, decode_block=16, decode_splits=2,
                decode_tma=1)


@pytest.mark.interpreter
@pytest.mark.slow
@settings(max_examples=15)
@given(_steps(), st.sampled_from([1, 2, 3]))
def test_decode_kernel_hypothesis(case: dict[str, Any], splits: int) -> None:
    _check_step(dtype=torch.float32, decode_block=16, decode_splits=splits, **case)


@pytest.mark.interpreter
@pytest.mark.parametrize("page", [None, 16])
def test_step_host_work_does_not_grow_with_the_cache(monkeypatch: Any, page: int | None) -> None:
    """A window + sinks step (k_new appended) does the same host work at a cache of 4k and of 32k positions:
    the same launches (one for the append and one for the split kernel, which merges) with the same grids, the same
    PyTorch ops allocating the same shapes. Nothing on the host or in a launch is sized by the context."""
    from patterndsl.runtime import decode_kernels

    attn = _attn("causal & (window(31) | sink(4))")
    g = torch.Generator().manual_seed(0)
    B, H, hkv, d = 2, 4, 2, 16
    q, kn, vn = (torch.randn(B, h, 1, d, generator=g) for h in (H, hkv, hkv))
    records = []
    for cap in (4096, 32768):
        if page is None:
            kc, vc, table = torch.zeros(B, hkv, cap, d), torch.zeros(B, hkv, cap, d), None
        else:
            kc, vc = torch.zeros(B * cap // page, page, hkv, d), torch.zeros(B * cap // page, page, hkv, d)
            table = torch.arange(B * cap // page, dtype=torch.int32).view(B, -1)
        seqlens = torch.full((B,), cap - 1, dtype=torch.int32)
        step = functools.partial(attn.decode, q, kc, vc, seqlens, page_table=table, k_new=kn, v_new=vn)
        step()  # the first call at a capacity builds its run tables (once)
        records.append(record_launches(monkeypatch, decode_kernels._decode_split, step))
    assert records[0] == records[1]
    assert [x[1][0] for x in records[0]] == ["_append_kv", "_decode_split"], records[0]


@pytest.mark.interpreter
def test_planned_steps_follow_options_and_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A static pattern's launch is built once per key (shapes, strides, options, lengths of the append):
    steps that change only an option, or only the lengths' values, each equal the reference, and a step
    seen before builds nothing (a stale launch would keep the old split count or read the old lengths)."""
    from patterndsl.runtime import plans

    monkeypatch.setattr(plans, "_PLANS", {})
    src = PATTERNS[0]
    for splits, lengths, direct in ((1, [37, 20], False), (3, [37, 20], False), (3, [20, 37], False),
                                    (1, [37, 20], False), (3, [37, 20], True), (3, [20, 37], True)):
        # direct_launch is part of the key; under the interpreter every plan launch takes JITFunction.run
        _check_step(src, torch.float32, lengths, 1, 1, 2, 2, None, 5, d=16, dv=16, decode_block=16,
                    decode_splits=splits, direct_launch=direct)
    assert sum(1 for key in plans._PLANS if isinstance(key, tuple) and key[0] == "decode") == 3


def test_decode_misuse_is_one_sentence() -> None:
    q, kc = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 16, 8)
    seqlens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"not decode-consistent \(window\(N // 4\) is sized with N") as info:
        _attn("window(N // 4) | global(-1:)").decode(q, kc, kc, seqlens)
    assert "\n" not in str(info.value)
    attn = _attn("causal")
    for args, says in [((q, kc, kc, seqlens.long()), "cache_seqlens must be an int32 tensor"),
                       ((q, kc[:, :1].expand(1, 3, 16, 8), kc, seqlens), "contiguous cache"),
                       ((q, kc, kc, seqlens, torch.zeros(1, 4)), "page_table must be an int32 tensor")]:
        with pytest.raises(ValueError, match=says):
            attn.decode(*args[:4], page_table=args[4] if len(args) > 4 else None)  # type: ignore[misc]
    with pytest.raises(ValueError, match="k_new and v_new come together"):
        attn.decode(q, kc, kc, seqlens, k_new=kc[:, :, :1])


def test_host_lengths_and_pages_out_of_range_are_one_sentence() -> None:
    """On the host's PyTorch path the lengths and the pages they reach are read (free there): a length past the cache, a
    negative one, or a page outside the cache is a sentence, not an IndexError from deep in a gather. Table
    entries past a sequence's length are never read, so any value may pad them."""
    attn = _attn("causal & (window(15) | sink(2))")
    q, kc = torch.randn(2, 2, 1, 8, dtype=torch.float64), torch.randn(2, 2, 16, 8, dtype=torch.float64)
    kn = torch.randn(2, 2, 2, 8, dtype=torch.float64)
    for lengths, new, says in [([3, 15], True, r"cache_seqlens\[1\] = 15 with 2 new tokens does not fit"),
                               ([-1, 0], False, r"cache_seqlens\[0\] = -1"),
                               ([100, 0], False, r"cache_seqlens\[0\] = 100")]:
        with pytest.raises(ValueError, match=says) as info:
            attn.decode(q, kc, kc, torch.tensor(lengths, dtype=torch.int32), **(dict(k_new=kn, v_new=kn) if new else {}))
        assert "\n" not in str(info.value)
    pages = torch.randn(4, 4, 2, 8, dtype=torch.float64)
    table = torch.tensor([[0, 1, -1, 9], [2, 7, 0, 0]], dtype=torch.int32)
    attn.decode(q, pages, pages, torch.tensor([8, 3], dtype=torch.int32), page_table=table)  # padding unread
    with pytest.raises(ValueError, match=r"page_table\[1\] names pages outside 0..3 among the 2 pages"):
        attn.decode(q, pages, pages, torch.tensor([8, 5], dtype=torch.int32), page_table=table)


@pytest.mark.parametrize("page", [None, 4])
def test_an_empty_sequence_of_the_batch_returns_zeros(page: int | None) -> None:
    """A free slot of a batch (cache_seqlens 0, nothing appended): its rows have no key, so zeros and a
    log-sum-exp of -inf, while the other sequences attend as usual."""
    attn = _attn("causal")
    q = torch.randn(2, 2, 1, 8, dtype=torch.float64)
    kc = torch.randn(2, 2, 16, 8, dtype=torch.float64) if page is None else torch.randn(8, 4, 2, 8, dtype=torch.float64)
    table = None if page is None else torch.arange(8, dtype=torch.int32).reshape(2, 4)
    out, lse = attn.decode(q, kc, kc, torch.tensor([0, 5], dtype=torch.int32), page_table=table, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    # the other sequence: its last query sees its 5 cached keys (float64 softmax by hand)
    keys = kc[1, :, :5] if page is None else kc[4:6].reshape(8, 2, 8)[:5].transpose(0, 1)
    s = (q[1] @ keys.transpose(-1, -2)) * 8**-0.5
    assert torch.allclose(lse[1].double(), torch.logsumexp(s, -1), atol=1e-5)  # lse is float32
    assert torch.allclose(out[1], torch.softmax(s, -1) @ keys, atol=1e-10)


# --- fewer queries than keys ---------------------------------------------------------------------------------


def _suffix_case(src: str, dtype: Any, Nq: int, Nk: int, d: int = 8, dv: int = 4, grad: bool = True,
                 **opts: Any) -> None:
    attn, body = _attn(src), _body(src)
    H = body.count if isinstance(body, ir.Heads) else 4
    g = torch.Generator().manual_seed(Nq * 100 + Nk)
    q = torch.randn(2, H, Nq, d, generator=g).to(dtype)
    k = torch.randn(2, H // 2, Nk, d, generator=g).to(dtype)
    v = torch.randn(2, H // 2, Nk, dv, generator=g).to(dtype)
    do = torch.randn(2, H, Nq, dv, generator=g).to(dtype)
    mask = _mask(body, H, range(Nk - Nq, Nk), Nk)
    if Nq:
        out, lse, *grads = reference_grads(q, k, v, mask, d**-0.5, do)
    else:  # SDPA's answer: empty outputs, zero gradients
        out, lse, grads = do.double(), do.double()[..., 0], [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
    tol = 1e-7 if dtype == torch.float64 else 2e-5
    qg, kg, vg = (t.clone().requires_grad_(grad) for t in (q, k, v))
    with attn.options(**opts):
        got, got_lse = attn(qg, kg, vg, return_lse=True)
    assert got.shape == (2, H, Nq, dv) and got_lse.shape == (2, H, Nq)
    assert _err(got, out) < tol * 10
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(got_lse), finite)
    if not grad:
        return
    for name, x, ref in zip("qkv", torch.autograd.grad((got * do).sum(), (qg, kg, vg)), grads, strict=True):
        err = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert x.shape == ref.shape and err < (1e-6 if dtype == torch.float64 else 1e-4), f"d{name}: {err}"


@pytest.mark.parametrize("src, Nq, Nk, grad", [(PATTERNS[0], 7, 40, True), (PATTERNS[2], 1, 19, True),
                                                (PATTERNS[5], 5, 21, True), (PATTERNS[1], 0, 5, True),
                                                (PATTERNS[1], 0, 0, True), ("window(N // 4) | global(-1:)", 3, 29, False)])
def test_fewer_queries_cpu(src: str, Nq: int, Nk: int, grad: bool) -> None:
    """float64 on the CPU path: forward and gradients (padded rows through the prefill path), without
    gradients (the decode path, an N-dependent pattern's tables at N = Nk), Dv != Dqk, empty inputs (empty
    outputs, zero gradients)."""
    _suffix_case(src, torch.float64, Nq, Nk, grad=grad)


@pytest.mark.interpreter
@pytest.mark.slow
def test_fewer_queries_kernel_gradients() -> None:
    """The Triton prefill kernels' forward and gradients on the padded rows."""
    _suffix_case("causal & (window(5) | sink(2))", torch.float32, 7, 40)


@pytest.mark.interpreter
@pytest.mark.slow
def test_fewer_queries_decode_kernel() -> None:
    """A no-grad call with few rows takes the decode kernel, for an N-dependent pattern too (its tables at
    N = Nk)."""
    _suffix_case("window(N // 4) | global(-1:)", torch.float32, 3, 29, grad=False, decode_block=16)


def _chunks_case(src: str, dtype: Any, lq: list[int], lk: list[int], d: int = 8, dv: int = 4) -> None:
    """Packed documents of lk keys each, whose last lq rows are the queries (chunked prefill), against the
    reference per document: outputs and gradients."""
    attn, body = _attn(src), _body(src)
    H = 4
    g = torch.Generator().manual_seed(sum(lq) + 7 * sum(lk))
    q = torch.randn(sum(lq), H, d, generator=g).to(dtype)
    k = torch.randn(sum(lk), H // 2, d, generator=g).to(dtype)
    v = torch.randn(sum(lk), H // 2, dv, generator=g).to(dtype)
    do = torch.randn(sum(lq), H, dv, generator=g).to(dtype)
    cu_q, cu_k = (torch.tensor(np.cumsum([0, *x]).tolist(), dtype=torch.int32) for x in (lq, lk))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    got, got_lse = attn(qg, kg, vg, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    grads = torch.autograd.grad((got * do).sum(), (qg, kg, vg))
    assert got.shape == (sum(lq), H, dv) and got_lse.shape == (H, sum(lq))
    for i, (nq, nk) in enumerate(zip(lq, lk, strict=True)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        if nq == 0:
            assert float(grads[1][ks].abs().sum()) == 0.0
            continue
        per = (t[None].transpose(1, 2) for t in (q[qs], k[ks], v[ks], do[qs]))
        qd, kd, vd, dod = per
        out, lse, *ref = reference_grads(qd, kd, vd, _mask(body, H, range(nk - nq, nk), nk), d**-0.5, dod)
        assert _err(got[qs].transpose(0, 1)[None], out) < 1e-9
        finite = torch.isfinite(lse[0])
        assert torch.equal(torch.isfinite(got_lse[:, qs]), finite)
        for name, x, r in zip("qkv", (grads[0][qs], grads[1][ks], grads[2][ks]), ref, strict=True):
            err = ((x.transpose(0, 1)[None].double() - r).norm() / r.norm().clamp_min(1e-30)).item()
            assert err < 1e-6, f"document {i}: d{name} {err}"


def test_chunked_prefill_cpu() -> None:
    """cu_seqlens_q / cu_seqlens_k: documents with fewer queries than keys, one with none, one empty."""
    _chunks_case("causal & (window(5) | sink(2))", torch.float64, [3, 0, 9, 0], [20, 6, 9, 0])


@pytest.mark.interpreter
@pytest.mark.slow
def test_chunked_prefill_kernels() -> None:
    """float32 through the packed-documents kernels against the float64 CPU path (checked above)."""
    attn = _attn("causal & (window(5) | sink(2))")
    q, k = torch.randn(12, 4, 8), torch.randn(29, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3, 12], dtype=torch.int32), torch.tensor([0, 20, 29], dtype=torch.int32)
    got = attn(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    want = attn(q.double(), k.double(), k.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_chunked_prefill_misuse() -> None:
    attn = _attn("causal")
    q, k = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="document 1 has 2 queries but 0 keys"):
        attn(torch.randn(6, 2, 8), k, k, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 6, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="come together"):
        attn(q, k, k, cu_seqlens_q=cu)


def test_fewer_queries_and_chunks_write_into_out_and_lse() -> None:
    """`out=` / `lse=` for fewer queries than keys and for chunked prefill: NaN-filled tensors come back
    filled with the results (every element written) and are the tensors returned; a wrong one is one
    sentence."""
    attn = _attn("causal & (window(5) | sink(2))")
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 11, 8, generator=g), torch.randn(1, 2, 11, 4, generator=g)
    cu_q, cu_k = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32)
    for args, kw in (((q, k, v), {}), ((q, k, v), {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k})):
        want, want_lse = attn(*args, return_lse=True, **kw)
        out, lse = torch.full_like(want, float("nan")), torch.full_like(want_lse, float("nan"))
        got, got_lse = attn(*args, return_lse=True, out=out, lse=lse, **kw)
        assert got is out and got_lse is lse
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        with pytest.raises(ValueError, match=r"out must be a tensor of shape \[1, 4, 3, 4\]"):
            attn(*args, out=torch.empty(1, 4, 3, 8), **kw)


@settings(max_examples=200, deadline=None)
@given(blocks=st.integers(1, 1 << 16), programs=st.integers(1, 4096), sms=st.integers(1, 256), per_sm=st.sampled_from([1, 2]))
def test_splits_spread_evenly_over_the_sms(blocks: int, programs: int, sms: int, per_sm: int) -> None:
    """A row's split count keeps the programs within `per_sm` per SM (none waits for a partial extra
    round), never gives a split fewer than four key blocks unless it is the only one, and is at least one."""
    from patterndsl.runtime import decode as D

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "_sm_count", lambda device, default: sms)
        s = D._splits(blocks, programs, torch.device("cpu"), per_sm)
    assert 1 <= s <= 256
    assert s == 1 or programs * s <= per_sm * sms
    assert s == 1 or blocks >= 4 * (s - 1) + 1


def test_counters_are_zeroed_when_a_launch_raises() -> None:
    """A launch that stops midway (the interpreter raising inside a program) leaves no arrival counter set:
    the next launch's last program must find all of them at zero."""
    from patterndsl.runtime.common import arrivals, counted

    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="midway"), counted(4, cpu) as counters:
        counters[:4] = 3
        raise RuntimeError("a program stopped midway")
    assert not arrivals(4, cpu).any()
