"""Dynamic selectors at decode (`attn.decode` with topk / threshold) and the cache's key summaries.

The reference reads LANGUAGE.md's selector definition off `reference.dynamic_mask` with the step's rows as
the rows present (a query block at decode is the step's rows in it), in float64, then full attention over
the allowed pairs; nothing is shared with the runtime's scoring, budgets or tables. Caches are poisoned past
each length, pages are shuffled, and the summaries are kept incrementally across the step's append.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from helpers import attention_reference, record_launches
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dynamic_mask
from strategies import decode_steps

import patterndsl as P
from patterndsl import ir
from patterndsl.cache import KeySummaries

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from patterndsl.runtime.decode_kernels import _top_rows  # noqa: E402

PATTERNS = [
    "causal & (window(3) | topk(2, block=16))",
    "causal & topk(2, block=16, score=quest)",
    "causal & (sink(2) | topk(1, block=16, score=compressed, share=kv))",
    "causal & threshold(0.7, block=16)",
    "causal & (window(2) | topk(0.5, block=(16, 32)))",
    "causal & topk(2, block=16, score=given)",
    "causal & (topk(2, block=16) - topk(1, block=16, score=given))",
    "causal - topk(1, block=16)",
    "window(3) | topk(1, block=16)",  # keys after the row, up to the sequence's end
    "heads {\n    0:1 => causal & window(3)\n    1:2 => causal & topk(1, block=16, score=quest)\n}",
]
_compiled: dict[str, Any] = {}


@triton.jit
def _probe_top_rows(X, OUT, NP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):  # type: ignore[no-untyped-def]
    """`_top_rows` of a [ROWS, COLS] int32 tensor, written as int8 (one program)."""
    at = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    tl.store(OUT + at, _top_rows(tl.load(X + at), NP).to(tl.int8))


def _attn(src: str) -> Any:
    if src not in _compiled:
        _compiled[src] = P.compile(f"pattern p = {src}\n", block_m=16, block_n=16)
    return _compiled[src]


def _body(src: str) -> ir.Body:
    return P.loads(f"pattern p = {src}\n").get("p").body  # type: ignore[union-attr]


def _selector(body: ir.Body) -> ir.TopK | ir.Threshold:
    pats = [body.pattern_for(h) for h in range(body.count)] if isinstance(body, ir.Heads) else [body]
    return next(x for p in pats for x in ir.walk(p) if isinstance(x, ir.TopK | ir.Threshold))


def _reference(body: ir.Body, q: Any, k: Any, v: Any, n: int, given: Any, scale: float) -> tuple[Any, Any, Any]:
    """One sequence: (out [H, Nq, Dv], lse [H, Nq], picked blocks [H, query blocks, key blocks] of the
    step's rows' query blocks) over keys k, v [Hkv, n, D], the step's rows the last Nq."""
    H, nq, d = q.shape
    present = np.zeros(n, dtype=bool)
    present[max(n - nq, 0):] = True
    qf = np.zeros((1, H, n, d))
    qf[0, :, max(n - nq, 0):] = q.numpy()[:, max(nq - n, 0):]
    masks, picks = [], []
    kk = k.numpy()[None]
    gv = None if given is None else given[None]
    if not isinstance(body, ir.Heads):
        mask, some = dynamic_mask(body, qf, kk, gv, present)
        masks, picks = list(mask[0]), [None if some is None else some[:, h:h + 1] for h in range(H)]
    else:
        group = H // k.shape[0]
        for h in range(H):
            p = body.pattern_for(h)
            if not ir.is_dynamic(p):
                masks.append(_static(p, n))
                picks.append(None)
                continue
            mask, some = dynamic_mask(p, qf[:, h:h + 1], kk[:, h // group:h // group + 1],
                                      None if gv is None else gv[:, h:h + 1], present)
            masks.append(mask[0, 0])
            picks.append(some)
    rows = np.arange(n - nq, n)
    mask = np.stack([m[np.clip(rows, 0, None)] for m in masks]) & (rows >= 0)[None, :, None]
    o, lse = attention_reference(q[None], k[None], v[None], mask, scale)
    return o[0], lse[0], picks


def _static(p: ir.Pattern, n: int) -> np.ndarray:
    from reference import allowed

    return np.array([[allowed(p, i, j, n) for j in range(n)] for i in range(n)], dtype=bool).reshape(n, n)


def _cache(ks: list[Any], vs: list[Any], capacity: int, page: int | None, seed: int) -> tuple[Any, Any, Any]:
    """(k_cache, v_cache, page_table) holding ks[b], vs[b] [Hkv, L_b, D], NaN past each length, pages shuffled."""
    B, (hkv, _, d) = len(ks), ks[0].shape
    if page is None:
        kc = torch.full((B, hkv, capacity, d), float("nan"), dtype=ks[0].dtype)
        vc = kc.clone()
        for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
            kc[b, :, :k.shape[1]], vc[b, :, :v.shape[1]] = k, v
        return kc, vc, None
    pages = capacity // page
    order = np.random.default_rng(seed).permutation(B * pages)
    kc = torch.full((B * pages, page, hkv, d), float("nan"), dtype=ks[0].dtype)
    vc = kc.clone()
    table = torch.tensor(order.reshape(B, pages), dtype=torch.int32)
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        for p in range(-(-k.shape[1] // page)):
            at = slice(p * page, min(k.shape[1], (p + 1) * page))
            kc[table[b, p], :at.stop - at.start] = k[:, at].transpose(0, 1)
            vc[table[b, p], :at.stop - at.start] = v[:, at].transpose(0, 1)
    return kc, vc, table


def _check_step(src: str, dtype: Any, lengths: list[int], nq: int, n_new: int, hkv: int, group: int,
                page: int | None, seed: int, d: int = 8, **opts: Any) -> tuple[Any, Any]:
    """A decode step with selectors (the last n_new tokens appended, the summaries updated) against the
    reference: outputs, lse and, for one-selector patterns, the returned selection. Returns (out, lse)."""
    attn, body = _attn(src), _body(src)
    H = body.count if isinstance(body, ir.Heads) else hkv * group
    hkv = hkv if H % hkv == 0 else 1
    sel = _selector(body)
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(hkv, n, d, generator=g).to(dtype) for n in lengths]
    vs = [torch.randn(hkv, n, d, generator=g).to(dtype) for n in lengths]
    q = torch.randn(len(lengths), H, nq, d, generator=g).to(dtype)
    unit = page or 1
    capacity = -(-(max(lengths) + 3) // unit) * unit
    old = [n - n_new for n in lengths]
    kc, vc, table = _cache([k[:, :n] for k, n in zip(ks, old, strict=True)],
                           [v[:, :n] for v, n in zip(vs, old, strict=True)], capacity, page, seed)
    seqlens = torch.tensor(old, dtype=torch.int32)
    kw: dict[str, Any] = dict(page_table=table)
    if n_new:
        kw.update(k_new=torch.stack([k[:, n - n_new:n] for k, n in zip(ks, lengths, strict=True)]),
                  v_new=torch.stack([v[:, n - n_new:n] for v, n in zip(vs, lengths, strict=True)]))
    kblk = sel.key_block or sel.block
    qbs = (nq + sel.block - 2) // sel.block + 1
    scores = None
    if any(isinstance(x, ir.TopK) and x.given for x in ir.walk(body if not isinstance(body, ir.Heads) else body.pattern_for(0))):
        scores = torch.randn(len(lengths), H, qbs, -(-capacity // kblk), generator=g).to(dtype)
    summaries = KeySummaries.build(kc, seqlens, kblk, page_table=table)
    out = torch.full((len(lengths), H, nq, d), float("nan"), dtype=dtype)
    with attn.options(**opts):
        got, got_lse, picked = attn.decode(q, kc, vc, seqlens, summaries=summaries, scores=scores, out=out,
                                           return_lse=True, return_selected=True, **kw)
    assert got is out and not torch.isnan(got).any()
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for b, n in enumerate(lengths):
        given_full = None
        if scores is not None:  # the step's query blocks' rows of the caller's scores, at their blocks
            given_full = np.zeros((H, -(-n // sel.block), -(-n // kblk)))
            first = max(n - nq, 0) // sel.block
            for r in range(qbs):
                if first + r < given_full.shape[1]:
                    given_full[:, first + r] = scores[b, :, r, :given_full.shape[2]].double().numpy()
        want, want_lse, picks = _reference(body, q[b].double(), ks[b].double(), vs[b].double(), n, given_full,
                                           d**-0.5)
        assert (got[b].double() - want).abs().max().item() < tol, f"sequence {b}"
        assert torch.equal(torch.isfinite(got_lse[b]), torch.isfinite(want_lse))
        if len(picked) == 1:  # one selector: the selection itself, per head, query block of the step
            first = max(n - nq, 0) // sel.block
            for h, some in enumerate(picks):
                if some is None:
                    continue
                for r in range(qbs):
                    mine = {int(x) for x in picked[0][b, h, r] if x >= 0}
                    ref = set(np.nonzero(some[0, 0, first + r])[0].tolist()) if first + r < some.shape[2] else set()
                    assert mine == ref, f"sequence {b}, head {h}, query block {first + r}"
    return got, got_lse


@settings(max_examples=8, deadline=None)
@given(decode_steps(PATTERNS, 56, [None, 3, 4, 8]))
def test_decode_with_selectors_equals_reference_cpu(case: dict[str, Any]) -> None:
    """float64 on the CPU path: every scoring rule and budget, several selectors, share=kv, per-head
    patterns, contiguous and shuffled paged caches, GQA, k_new appended (summaries updated): decode rows and
    the selection equal the float64 reference with the step's rows as the query blocks."""
    _check_step(dtype=torch.float64, **case)


def test_whole_query_block_equals_prefill() -> None:
    """The step's rows are a whole query block: decode's selection is prefill's at N = seqlen (mean rule),
    so the decoded rows equal the last rows of the prefill call on the same q, k, v."""
    attn = _attn(PATTERNS[0])
    g = torch.Generator().manual_seed(1)
    n, d = 64, 8
    q, k, v = (torch.randn(2, h, n, d, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    want = attn(q, k, v)[:, :, -16:]
    cache = torch.zeros(2, 2, 80, d, dtype=torch.float64)
    kc, vc = cache.clone(), cache.clone()
    kc[:, :, :n - 16], vc[:, :, :n - 16] = k[:, :, :n - 16], v[:, :, :n - 16]
    seqlens = torch.full((2,), n - 16, dtype=torch.int32)
    s = KeySummaries.build(kc, seqlens, 16)
    got = attn.decode(q[:, :, -16:], kc, vc, seqlens, k_new=k[:, :, -16:], v_new=v[:, :, -16:], summaries=s)
    assert (got - want).abs().max().item() < 1e-12


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 12), st.sampled_from([None, 2, 4]), st.lists(st.integers(0, 7), min_size=1, max_size=5),
       st.integers(0, 2**16))
def test_incremental_summaries_equal_recomputed(block: int, page: int | None, appends: list[int], seed: int) -> None:
    """Summaries updated block by block on every append equal the ones built from scratch (contiguous and
    paged caches, appends that cross blocks or add nothing; float64: PyTorch), and the definition on the
    first block."""
    _check_summaries(block, page, appends, seed, "float64")


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("block, page", [(6, 4), (16, None)])
def test_incremental_summaries_kernel(block: int, page: int | None) -> None:
    """The same through the Triton summary kernel (float32, in the interpreter)."""
    _check_summaries(block, page, [5, 7, 0, 13], 7, "float32")


def _check_summaries(block: int, page: int | None, appends: list[int], seed: int, dtype: str) -> None:
    g = torch.Generator().manual_seed(seed)
    B, hkv, d, cap = 2, 2, 4, 40
    keys = torch.randn(B, hkv, cap, d, generator=g, dtype=getattr(torch, dtype))
    unit = page or 1
    table = None if page is None else torch.tensor(np.random.default_rng(seed).permutation(B * cap // unit)
                                                   .reshape(B, cap // unit), dtype=torch.int32)
    kc = torch.full((B, hkv, cap, d) if page is None else (B * cap // unit, unit, hkv, d), float("nan"), dtype=keys.dtype)
    seqlens = torch.zeros(B, dtype=torch.int32)
    s = KeySummaries.build(kc, seqlens, block, page_table=table)
    from patterndsl.runtime.decode import append

    for n in appends:
        n = min(n, cap - int(seqlens[0]))
        new = keys[:, :, int(seqlens[0]):int(seqlens[0]) + n]
        append(kc, kc, seqlens, table, new, new)
        s.update(kc, seqlens, n, page_table=table)
        seqlens += n
    fresh = KeySummaries.build(kc, seqlens, block, page_table=table)
    for name in ("lo", "hi", "mean"):
        assert torch.equal(getattr(s, name), getattr(fresh, name)), name
    full = keys[:, :, :int(seqlens[0])]
    if full.shape[2] >= block:  # against the definition: the first block's keys
        assert torch.allclose(s.mean[:, :, 0].double(), full[:, :, :block].double().mean(2), atol=1e-6)
        assert torch.equal(s.lo[:, :, 0], full[:, :, :block].amin(2).to(s.lo.dtype))
        assert torch.equal(s.hi[:, :, 0], full[:, :, :block].amax(2).to(s.hi.dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("page", [pytest.param(None, marks=pytest.mark.slow), 8])  # about 3 s each
def test_half_cache_summaries(page: int | None) -> None:
    """A bfloat16 cache keeps bfloat16 summaries: min and max exactly, the mean its float32 mean rounded
    (within a bfloat16 step; the summary kernel, appended to, equals a build from scratch); `dtype=torch.float32` keeps
    them unrounded. The fused top-n widens them: it picks what it picks from float32 summaries holding the
    same values, which is what the PyTorch rule over them picks (float64)."""
    from patterndsl.runtime.decode import append
    from patterndsl.runtime.decode_selection import _pick

    g = torch.Generator().manual_seed(2)
    B, H, hkv, d, cap, blk = 2, 4, 2, 16, 96, 16
    keys = torch.randn(B, hkv, cap, d, generator=g).to(torch.bfloat16)
    kc, vc, table = _cache(list(keys), list(keys), cap, page, 2)
    seqlens = torch.tensor([cap - 13, cap - 40], dtype=torch.int32)
    grown = KeySummaries.build(kc, seqlens - 5, blk, page_table=table)
    new = torch.stack([keys[b, :, n - 5:n] for b, n in enumerate(seqlens.tolist())])
    append(kc, vc, seqlens - 5, table, new, new)
    grown.update(kc, seqlens - 5, 5, page_table=table)
    s = KeySummaries.build(kc, seqlens, blk, page_table=table)
    wide = KeySummaries.build(kc, seqlens, blk, page_table=table, dtype=torch.float32)
    assert s.mean.dtype == torch.bfloat16 and wide.mean.dtype == torch.float32
    for name in ("lo", "hi", "mean"):
        assert torch.equal(getattr(grown, name), getattr(s, name)), name
    assert torch.equal(s.lo.float(), wide.lo) and torch.equal(s.hi.float(), wide.hi)
    assert ((s.mean.float() - wide.mean).abs() <= wide.mean.abs() * 2.0**-7).all()  # one bfloat16 step
    attn = _attn("causal & (window(3) | topk(2, block=16))")
    q = torch.randn(B, H, 1, d, generator=g).to(torch.bfloat16)
    same = KeySummaries(blk, s.lo.float(), s.hi.float(), s.mean.float())
    _, half = attn.decode(q, kc, vc, seqlens, page_table=table, summaries=s, return_selected=True)
    _, full = attn.decode(q, kc, vc, seqlens, page_table=table, summaries=same, return_selected=True)
    assert torch.equal(half[0], full[0])
    for b, n in enumerate(seqlens.tolist()):
        nk = -(-n // blk)
        score = torch.einsum("hd,hkd->hk", q[b, :, 0].double(), s.mean[b, :, :nk].double().repeat_interleave(H // hkv, 0))
        want = _pick(attn.spec.selectors[0].all[0], score, d**-0.5, 2)  # type: ignore[union-attr]
        for h in range(H):
            assert {int(x) for x in half[0][b, h, 0] if x >= 0} == {int(x) for x in want[h] if x >= 0}, (b, h)


def test_selected_reuse_and_misuse() -> None:
    """`selected=` takes what `return_selected=True` gave (an earlier layer's): the same outputs without
    scoring, on another pattern with the same selector too; misuse is one sentence."""
    attn = _attn(PATTERNS[0])
    g = torch.Generator().manual_seed(5)
    q, kc, vc = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 80, 8, generator=g), torch.randn(1, 2, 80, 8, generator=g)
    seqlens = torch.tensor([75], dtype=torch.int32)
    s = KeySummaries.build(kc, seqlens, 16)
    out, sel = attn.decode(q, kc, vc, seqlens, summaries=s, return_selected=True)
    again = attn.decode(q, kc, vc, seqlens, selected=sel)
    assert torch.equal(out, again)
    other = _attn("causal & (window(3) | topk(2, block=16, score=quest))")  # the layer below scored with quest
    assert torch.equal(other.decode(q, kc, vc, seqlens, selected=sel), out)
    for kw, says in [(dict(), "scores key blocks from their summaries"),
                     (dict(summaries=KeySummaries.build(kc, seqlens, 32)), "summaries must be of blocks of 16 keys"),
                     (dict(selected=(sel[0][..., :1, :, :],)), r"selected\[0\] must be an int32 tensor \[1, 4, 1, width\]"),
                     (dict(summaries=s, scores=torch.zeros(1)), "takes no scores")]:
        with pytest.raises(ValueError, match=says) as info:
            attn.decode(q, kc, vc, seqlens, **kw)
        assert "\n" not in str(info.value)
    for src, says in [("causal & topk(1, block=16, score=max)", "score=max reads every key"),
                      ("causal & topk(N // 8, block=16)", "a topk count that grows with N"),
                      ("causal & topk(1, block=16, score=given)", r"pass scores=\[batch, heads, 1, ceil\(capacity / 16\)\]")]:
        with pytest.raises(ValueError, match=says):
            _attn(src).decode(q, kc, vc, seqlens, summaries=s)
    with pytest.raises(ValueError, match="serves patterns with selectors"):
        _attn("causal").decode(q, kc, vc, seqlens, summaries=s)


@pytest.mark.interpreter
@pytest.mark.parametrize("src, page", [
    ("causal & window(40) & (window(5) | topk(2, block=16))", 16),
    pytest.param("causal & (topk(2, block=16, score=quest) - topk(1, block=16, score=given))", None,
                 marks=pytest.mark.slow),
    pytest.param("causal & (sink(2) | topk(0.4, block=(16, 32), score=compressed, share=kv))", 8,
                 marks=pytest.mark.slow),
    pytest.param("causal & (window(3) | threshold(0.6, block=16))", 4, marks=pytest.mark.slow),
])
def test_decode_kernel_with_selectors(src: str, page: int | None) -> None:
    """The Triton kernels (interpreter): candidates under a windowed context, the fused top-n, the
    selection tables, the static part's tiles and the selected ones split and merged, GQA packs whose
    heads pick different blocks, several selectors (cases), against the reference."""
    _check_step(src, torch.float32, [70] if page == 16 else [70, 41], 2, 1, 2, 2, page, 3, d=16, decode_block=16,
                decode_splits=3)


@pytest.mark.interpreter
@pytest.mark.parametrize("src, page, variant", [
    ("causal & (window(3) | topk(2, block=(16, 32)))", 16,
     dict(decode_merge_chunk=2, decode_pipelined_picks=True, decode_fold_merge=True, decode_select_keys=64)),
    pytest.param("causal & (topk(2, block=16, score=quest) - topk(1, block=16, score=given))", None,
                 dict(decode_merge_chunk=4), marks=pytest.mark.slow),
])
def test_decode_kernel_variants_equal_default(src: str, page: int | None, variant: dict[str, Any]) -> None:
    """The step's kernel options for short rows (`decode_merge_chunk`: the last split merges several splits'
    partials per load, here over five splits, so the last chunk is partial; `decode_pipelined_picks`: the
    interpreter walks the same while loop; `decode_fold_merge`: the split kernel merges the top-n's splits
    and writes the selection, key blocks of two tiles; `decode_select_keys`: one scoring tile wider than the
    cache's key blocks) equal the reference and the default kernel's step."""
    args = (src, torch.float32, [70, 41], 2, 1, 2, 2, page, 3)
    want, want_lse = _check_step(*args, d=16, decode_block=16, decode_splits=5)
    got, got_lse = _check_step(*args, d=16, decode_block=16, decode_splits=5, **variant)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(got_lse, want_lse, atol=1e-6, rtol=1e-5)


@pytest.mark.interpreter
def test_decode_kernel_with_selectors_tma() -> None:
    """The static part's tiles and the picked ones through TMA descriptors (a contiguous cache, NaN past each
    length), against the reference."""
    _check_step(PATTERNS[0], torch.float32, [70, 41], 2, 1, 2, 2, None, 5, d=16, decode_block=16, decode_splits=3,
                decode_tma=1)


@pytest.mark.interpreter
def test_selection_over_many_key_blocks() -> None:
    """A cache of 38 key blocks: the top-n's first stage splits them (two programs per pack, each keeping
    its best n), the second keeps the best n of the splits; the step's rows, and the two tokens it appends (written with their blocks'
    summaries, one program a block), straddle a block boundary; pages hold whole key tiles. Outputs and the
    selection equal the float64 reference."""
    _check_step(PATTERNS[0], torch.float32, [593], 2, 2, 2, 2, 32, 11, d=16, decode_block=16)


@pytest.mark.interpreter
def test_selection_step_launches_few_kernels(monkeypatch: Any) -> None:
    """A topk step (k_new appended, its block's summary updated, the summaries scored, the top n kept, the
    window and the picks attended) launches 4 kernels (the append with the summary update, the selection,
    its merge with the tables, the split with its merge), the same ones at a cache of 512 and of 2k
    positions (the top-n's splits grow with the key blocks, up to `decode_selection.SELECT_SPLITS`): no host sync, no launch
    per key block, no index tensors built on the host. With `decode_fold_merge`, 3: no merge launch."""
    from patterndsl.runtime import decode_kernels

    attn = _attn(PATTERNS[0])
    g = torch.Generator().manual_seed(0)
    B, H, hkv, d = 1, 4, 2, 16
    q, kn, vn = (torch.randn(B, h, 1, d, generator=g) for h in (H, hkv, hkv))
    logs = []
    for cap in (512, 2048):
        kc, vc = torch.randn(B, hkv, cap, d, generator=g), torch.randn(B, hkv, cap, d, generator=g)
        seqlens = torch.full((B,), cap - 1, dtype=torch.int32)
        means = torch.randn(B, hkv, cap // 16, d, generator=g)
        summaries = KeySummaries(16, means.clone(), means.clone(), means)  # (values: any; the launches count)
        step = functools.partial(attn.decode, q, kc, vc, seqlens, k_new=kn, v_new=vn, summaries=summaries)
        step()
        logs.append(record_launches(monkeypatch, decode_kernels._decode_split, step))
    kinds = [[(k, x[0]) for k, x in log] for log in logs]
    assert kinds[0] == kinds[1] and len(logs[0]) == 4, logs
    with attn.options(decode_fold_merge=True):  # the decode kernel merges the top-n's splits: no merge launch
        folded = [x[0] for _, x in record_launches(monkeypatch, decode_kernels._decode_split, step)]
    assert folded == [x[0] for _, x in logs[1] if x[0] != "_decode_topk_merge"] and len(folded) == 3, folded


@pytest.mark.interpreter
@pytest.mark.slow
def test_pick_tables_kernel_equals_pytorch() -> None:
    """The kernel's per-row cases and per-pack block lists (`_pick_tables`) equal the PyTorch build the
    CPU path and large selections use: picks with padding, duplicates across a pack's heads and query
    blocks, several selectors' case bits, a pack with a padded head slot."""
    from patterndsl.runtime import decode as dec
    from patterndsl.runtime import decode_selection as dsel

    spec = _attn("causal & (topk(3, block=16) - topk(2, block=16, score=given))").spec
    g = torch.Generator().manual_seed(4)
    B, H, qb, cap = 2, 6, 2, 16 * 9
    picks = [torch.randint(-1, 9, (B, H, qb, w), generator=g, dtype=torch.int32) for w in (3, 2)]
    picks = [torch.where(p >= 0, p, -1) for p in picks]
    for p in picks:  # a selector picks a block once per row
        for idx in np.ndindex(*p.shape[:3]):
            seen: set[int] = set()
            for w in range(p.shape[3]):
                if int(p[idx][w]) in seen:
                    p[idx][w] = -1
                seen.add(int(p[idx][w]))
    packs = torch.tensor([[0, 1, 2], [3, 4, -1], [5, -1, -1]], dtype=torch.int32)
    pick, slist, scount = dec._pick_tables(spec, 0, picks, packs, cap)
    want = dsel.dense(spec, 0, picks, cap)
    assert torch.equal(pick, want)
    lists, counts = dsel.pack_lists(want, packs, 3 * qb * 5)
    assert torch.equal(scount, counts)
    for b in range(B):
        for p in range(packs.shape[0]):
            got = sorted(int(x) for x in slist[b, p] if x >= 0)
            assert got == [int(x) for x in lists[b, p] if x >= 0]


def test_pattern_cache_keeps_summaries() -> None:
    """`PatternKVCache` of a pattern with a selector keeps its key summaries through appends and a page
    table that widens: they equal the ones built from its pages, and a decode step over them equals the
    float64 reference over the keys the pages hold."""
    from patterndsl.cache import PatternKVCache

    src = PATTERNS[0]
    cache = PatternKVCache(src, batch=2, kv_heads=2, head_dim=8, page_size=4, max_append=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    for t in (5, 8, 1, 8, 8, 8, 8, 8, 8, 8, 3):  # past the first table's 64 positions
        kv = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
        cache.append(kv, kv)
    assert cache.summaries is not None and cache.page_table.shape[1] * 4 > 64
    fresh = KeySummaries.build(cache.k_pages, cache.cache_seqlens, 16, page_table=cache.page_table)
    for name in ("lo", "hi", "mean"):
        assert torch.equal(getattr(cache.summaries, name), getattr(fresh, name)), name
    q = torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64)
    out = _attn(src).decode(q, cache.k_pages, cache.v_pages, cache.cache_seqlens, page_table=cache.page_table,
                            summaries=cache.summaries)
    n = cache.length
    phys = cache.page_table[:, torch.arange(n) // 4].long()  # every key, gathered in position order
    keys = cache.k_pages[phys, (torch.arange(n) % 4)[None, :]].permute(0, 2, 1, 3)
    for b in range(2):  # the float64 reference of the step over the keys the pages hold
        want = _reference(_body(src), q[b], keys[b], keys[b], n, None, 8**-0.5)[0]
        assert (out[b] - want).abs().max().item() < 1e-9, f"sequence {b}"


@pytest.mark.interpreter
@pytest.mark.slow
def test_decode_kernel_rows_in_two_query_blocks() -> None:
    """A step whose rows straddle a query block boundary: each block of rows selects for itself (the fused
    selection's second row, the kernel's per-row cases)."""
    _check_step("causal & (window(5) | topk(2, block=16))", torch.float32, [65, 49], 3, 1, 2, 2, None, 3, d=16,
                decode_block=16)


@pytest.mark.interpreter
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_radix_select_equals_sorting(data: Any) -> None:
    """The top-n's in-register selection (`decode_kernels._top_rows`) against a sort: per row the n largest
    keys, ties to the lower column, never a non-candidate (INT32_MIN), every candidate where a row has at
    most n; keys drawn from a few values (many ties), the extremes included."""
    rows, cols = data.draw(st.sampled_from([1, 4])), data.draw(st.sampled_from([8, 32]))
    n = data.draw(st.sampled_from([1, 2, 4, 8]))
    pool = [-2**31, -2**31 + 1, -7, -1, 0, 1, 5, 2**31 - 1]
    x = torch.tensor(data.draw(st.lists(st.sampled_from(pool), min_size=rows * cols, max_size=rows * cols)),
                     dtype=torch.int32).view(rows, cols)
    got = torch.zeros(rows, cols, dtype=torch.int8)
    _probe_top_rows[(1,)](x, got, NP=n, ROWS=rows, COLS=cols)
    want = torch.zeros(rows, cols, dtype=torch.int8)
    for r in range(rows):
        ranked = sorted((c for c in range(cols) if x[r, c] != -2**31), key=lambda c: (-int(x[r, c]), c))
        want[r, ranked[:n]] = 1
    assert torch.equal(got, want), (x, got, want)

