"""The decode kernels on the GPU: against a float64 brute-force reference (bf16, fp16; contiguous and paged
caches, GQA, Dv != Dqk), and a decode step captured in a CUDA graph that replays with new lengths.

Run with `pytest -m gpu tests/gpu/test_gpu_decode.py`; skipped without CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import attention_reference, cuda_graph, reference_grads
from reference import allowed

import patterndsl as P

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

CASES = ["causal & (window(255) | sink(4))", "causal", "causal & window(64, dilation=3)"]
TOL = {"bfloat16": 3e-2, "float16": 5e-3}


def _rows_mask(src: str, rows: range, n: int) -> np.ndarray:
    body = P.loads(f"pattern p = {src}\n").get("p").body  # type: ignore[union-attr]
    return np.array([[allowed(body, i, j, n) for j in range(n)] for i in rows], dtype=bool).reshape(len(rows), n)


def _paged(kc: Any, vc: Any, page: int, seed: int) -> tuple[Any, Any, Any]:
    """A contiguous cache [B, Hkv, Nmax, D] as shuffled pages [pages, page, Hkv, D] and its page table."""
    B, Hkv, nmax, _ = kc.shape
    per = nmax // page
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * per, generator=g).to(kc.device)
    table = order.view(B, per).to(torch.int32)
    kp = torch.empty((B * per, page, Hkv, kc.shape[-1]), dtype=kc.dtype, device=kc.device)
    vp = torch.empty((B * per, page, Hkv, vc.shape[-1]), dtype=vc.dtype, device=vc.device)
    kp[order] = kc.view(B, Hkv, per, page, -1).permute(0, 2, 3, 1, 4).reshape(B * per, page, Hkv, -1)
    vp[order] = vc.view(B, Hkv, per, page, -1).permute(0, 2, 3, 1, 4).reshape(B * per, page, Hkv, -1)
    return kp, vp, table


def _sequence(kc: Any, vc: Any, table: Any, b: int, n: int) -> tuple[Any, Any]:
    """Sequence b's first n keys and values [Hkv, n, D] of a contiguous or paged cache."""
    if table is None:
        return kc[b, :, :n], vc[b, :, :n]
    page = kc.shape[1]
    pos = torch.arange(n, device=kc.device)
    pg = table[b].long()[pos // page]
    return kc[pg, pos % page].transpose(0, 1), vc[pg, pos % page].transpose(0, 1)


@pytest.mark.parametrize("src", CASES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("paged, tma", [(False, 0), (False, 1), (True, 0)])
def test_decode_matches_reference(src: str, dtype: str, paged: bool, tma: int) -> None:
    """Pointer loads (contiguous and paged caches) and TMA tiles (contiguous) against the reference."""
    attn = P.compile(f"pattern p = {src}\n")
    dt = getattr(torch, dtype)
    B, H, Hkv, D, Dv, nmax, Nq = 3, 8, 2, 192, 128, 2048, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g).to(dt)
    vc = torch.randn(B, Hkv, nmax, Dv, device="cuda", generator=g).to(dt)
    q = torch.randn(B, H, Nq, D, device="cuda", generator=g).to(dt)
    lengths = [5, 1000, 2047]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    table = None
    if paged:
        kc, vc, table = _paged(kc, vc, 16, 1)
    with attn.options(decode_tma=tma):
        got, lse = attn.decode(q, kc, vc, seqlens, page_table=table, return_lse=True)
    for b, n in enumerate(lengths):
        mask = _rows_mask(src, range(n - Nq, n), n)
        k, v = _sequence(kc, vc, table, b, n)
        want, want_lse = attention_reference(q[b:b + 1].cpu(), k[None].cpu(), v[None].cpu(), mask, D**-0.5)
        err = (got[b].double().cpu() - want[0]).abs().max().item()
        assert err < TOL[dtype] * max(1.0, want.abs().max().item()), f"b={b}: max |out - ref| = {err}"
        finite = torch.isfinite(want_lse[0])
        assert torch.equal(torch.isfinite(lse[b].cpu()), finite)


@pytest.mark.parametrize("src", CASES[:2])
def test_fewer_queries_gradients(src: str) -> None:
    attn = P.compile(f"pattern p = {src}\n")
    g = torch.Generator(device="cuda").manual_seed(0)
    Nq, Nk, D, Dv = 300, 1000, 64, 32
    q = torch.randn(1, 4, Nq, D, device="cuda", generator=g, dtype=torch.float16)
    k = torch.randn(1, 2, Nk, D, device="cuda", generator=g, dtype=torch.float16)
    v = torch.randn(1, 2, Nk, Dv, device="cuda", generator=g, dtype=torch.float16)
    do = torch.randn(1, 4, Nq, Dv, device="cuda", generator=g, dtype=torch.float16)
    mask = _rows_mask(src, range(Nk - Nq, Nk), Nk)
    want = reference_grads(q.cpu(), k.cpu(), v.cpu(), mask, D**-0.5, do.cpu())
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = attn(qg, kg, vg)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    assert (out.double().cpu() - want[0]).abs().max().item() < 5e-3
    for name, x, ref in zip("qkv", grads, want[2:], strict=True):
        err = ((x.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"d{name}: {err}"


@pytest.mark.parametrize("paged", [False, True])
def test_decode_step_replays_with_new_lengths(paged: bool) -> None:
    """Capture one step (append k_new, v_new at cache_seqlens, attend), then replay it with other lengths
    written into the same cache_seqlens tensor: each replay equals an eager step on a copy of the cache."""
    attn = P.compile("pattern p = causal & (window(1023) | sink(4))\n")
    B, H, Hkv, D, nmax = 4, 32, 8, 128, 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g, dtype=torch.bfloat16)
    vc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g, dtype=torch.bfloat16)
    table = None
    if paged:
        kc, vc, table = _paged(kc, vc, 64, 2)
    q = torch.randn(B, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    kn = torch.randn(B, Hkv, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    vn = torch.randn(B, Hkv, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    seqlens = torch.tensor([100, 2000, 5000, 8000], dtype=torch.int32, device="cuda")

    def step() -> Any:
        return attn.decode(q, kc, vc, seqlens, page_table=table, k_new=kn, v_new=vn)

    graph, out = cuda_graph(step)
    for lengths in ([7, 1023, 4096, 8190], [0, 1, 2, 3000]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        for t in (q, kn, vn):
            t.normal_()
        k0, v0 = kc.clone(), vc.clone()
        out.fill_(float("nan"))
        graph.replay()
        replayed = out.clone()
        kc.copy_(k0)
        vc.copy_(v0)
        want = step()
        assert torch.equal(replayed, want), f"lengths {lengths}: replay differs from an eager step"


# --- dynamic selectors at decode -----------------------------------------------------------------------------

SELECTOR_CASES = [  # (pattern, its static part P_0, the selected blocks' P_1, rule)
    ("causal & (window(255) | topk(8, block=64))", "causal & window(255)", "causal", "mean"),
    ("causal & topk(8, block=64, score=quest)", "none", "causal", "quest"),
]


def _ref_selection(rule: str, q: Any, k: Any, n: int, block: int, count: int) -> tuple[Any, Any]:
    """float64 per head: (picked key blocks [H, blocks] bool, whether the pick is clear of a near tie [H])
    for the step's rows (one query block: their mean query) against the causal candidates below n."""
    H, nq, _ = q.shape
    group = H // k.shape[0]
    qbar = q.double().mean(1)  # [H, D]
    nk = -(-n // block)
    keys = torch.nn.functional.pad(k[:, :n].double(), (0, 0, 0, nk * block - n))  # [Hkv, nk * block, D]
    here = (torch.arange(nk * block) < n).view(nk, block)
    blocks = keys.view(k.shape[0], nk, block, -1)
    if rule == "mean":
        kbar = blocks.sum(2) / here.sum(1)[None, :, None]
        s = torch.einsum("hd,hkd->hk", qbar, kbar.repeat_interleave(group, 0))
    else:
        hi = torch.where(here[None, :, :, None], blocks, float("-inf")).amax(2).repeat_interleave(group, 0)
        lo = torch.where(here[None, :, :, None], blocks, float("inf")).amin(2).repeat_interleave(group, 0)
        s = torch.maximum(qbar[:, None] * hi, qbar[:, None] * lo).sum(-1)
    top = torch.sort(s, -1, descending=True)
    picked = torch.zeros_like(s, dtype=torch.bool)
    picked.scatter_(1, top.indices[:, :count], True)
    if nk <= count:  # every candidate kept
        return picked, torch.ones(H, dtype=torch.bool)
    clear = (top.values[:, count - 1] - top.values[:, count]).abs() > 1e-2 * top.values.abs().amax(-1)
    return picked, clear


@pytest.mark.parametrize("src, static, selected, rule", SELECTOR_CASES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("nmax", [4096, 65536])
def test_decode_selectors_match_reference(src: str, static: str, selected: str, rule: str, paged: bool,
                                          nmax: int) -> None:
    """bf16 steps with a selector (k_new appended, the summaries updated): the returned selection equals a
    float64 selection by the rule (heads without a near tie), and the rows equal float64 attention over the
    static part plus the selected blocks. At 64k the mean rule's top-n splits 1024 key blocks over many
    programs and merges them in a launch of its own."""
    _selector_step_checked(src, static, selected, rule, paged, nmax, (3, 8, 2))


DECODE_VARIANTS = [{"decode_merge_chunk": 4}, {"decode_merge_chunk": 1}, {"decode_pipelined_picks": True},
                   {"decode_merge_chunk": 2, "decode_pipelined_picks": True, "decode_splits": 8},
                   {"decode_fold_merge": True}, {"decode_select_keys": 128},
                   {"decode_fold_merge": True, "decode_merge_chunk": 4, "decode_pipelined_picks": True,
                    "decode_select_keys": 128}]


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("shape", [(1, 32, 8), (3, 8, 2)])
def test_decode_variants_equal_default_and_reference(variant: dict[str, Any], paged: bool,
                                                     shape: tuple[int, int, int]) -> None:
    """The short-row kernel options (`Options.decode_merge_chunk`, `decode_pipelined_picks`, the
    interpreter cannot run the pipelined loop; `decode_fold_merge`, the split kernel merging the top-n and
    writing the selection; `decode_select_keys`, the top-n's scoring tile) on a selecting step at batch 1 (32 query and 8 KV heads)
    and 3: the selection and rows equal the float64 reference and the default kernel's step; dense causal
    decode (the split merge alone) equals the default's too."""
    src, static, selected, rule = SELECTOR_CASES[0]
    want, sel = _selector_step_checked(src, static, selected, rule, paged, 16384, shape)
    got, got_sel = _selector_step_checked(src, static, selected, rule, paged, 16384, shape, variant)
    assert torch.equal(got_sel[0], sel[0])
    assert (got.float() - want.float()).abs().max().item() < 2e-2
    attn = P.compile("pattern p = causal\n")
    B, H, Hkv = shape
    g = torch.Generator(device="cuda").manual_seed(2)
    kc, vc = (torch.randn(B, Hkv, 16384, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(B, H, 1, 128, device="cuda", generator=g).to(torch.bfloat16)
    seqlens = torch.tensor([16384 - 7 * b for b in range(B)], dtype=torch.int32, device="cuda")
    table = None
    if paged:
        kc, vc, table = _paged(kc, vc, 64, 4)
    with attn.options(decode_splits=variant.get("decode_splits", 16)):
        base, base_lse = attn.decode(q, kc, vc, seqlens, page_table=table, return_lse=True)
    with attn.options(**{"decode_splits": 16, **variant}):
        o, lse = attn.decode(q, kc, vc, seqlens, page_table=table, return_lse=True)
    assert (o.float() - base.float()).abs().max().item() < 1e-2
    assert torch.allclose(lse, base_lse, atol=1e-4, rtol=1e-4)


def _selector_step_checked(src: str, static: str, selected: str, rule: str, paged: bool, nmax: int,
                           shape: tuple[int, int, int], opts: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """A bf16 selecting step (batch, heads, KV heads = shape; kernel options `opts`) checked against the
    float64 selection by the rule and float64 attention over what it allows: (rows, selection)."""
    from patterndsl.cache import KeySummaries

    attn = P.compile(f"pattern p = {src}\n")
    B, H, Hkv = shape
    D, nq = 128, 1
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(B, H, nq, D, device="cuda", generator=g).to(torch.bfloat16)
    kn, vn = kc[:, :, :1].clone().normal_(generator=g), vc[:, :, :1].clone().normal_(generator=g)
    lengths = [70, nmax * 3 // 8 - 36, nmax - 1][-B:]
    seqlens = torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device="cuda")
    table = None
    if paged:
        kc, vc, table = _paged(kc, vc, 64, 3)
    summaries = KeySummaries.build(kc, seqlens, 64, page_table=table)
    with attn.options(**(opts or {})):
        got, sel = attn.decode(q, kc, vc, seqlens, page_table=table, k_new=kn, v_new=vn, summaries=summaries,
                               return_selected=True)
    for b, n in enumerate(lengths):
        k, v = _sequence(kc, vc, table, b, n)
        picked, clear = _ref_selection(rule, q[b].cpu(), k.cpu(), n, 64, 8)
        mine = torch.zeros_like(picked)
        for h in range(H):
            ids = sel[0][b, h, 0].cpu()
            mine[h, ids[ids >= 0].long()] = True
            if clear[h]:
                assert torch.equal(mine[h], picked[h]), f"b={b} h={h}: selection differs from the float64 rule"
        rows = range(n - nq, n)
        p0, p1 = _rows_mask(static, rows, n), _rows_mask(selected, rows, n)
        chosen = mine[:, torch.arange(n) // 64].numpy()[:, None, :]  # [H, 1, n]
        mask = np.where(chosen, p1[None], p0[None])
        want, _ = attention_reference(q[b:b + 1].cpu(), k[None].cpu(), v[None].cpu(), mask, D**-0.5)
        err = (got[b].double().cpu() - want[0]).abs().max().item()
        assert err < 3e-2 * max(1.0, want.abs().max().item()), f"b={b}: max |out - ref| = {err}"
    return got, sel


def test_decode_selector_step_replays_with_new_lengths() -> None:
    """A selector step (append, summaries update, scoring, selection, attention) captured in a CUDA graph
    replays with new lengths and equals an eager step on a copy of the cache and summaries."""
    from patterndsl.cache import KeySummaries

    attn = P.compile("pattern p = causal & (window(511) | topk(16, block=64))\n")
    B, H, Hkv, D, nmax = 2, 32, 8, 128, 16384
    g = torch.Generator(device="cuda").manual_seed(1)
    kc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g, dtype=torch.bfloat16)
    vc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g, dtype=torch.bfloat16)
    q = torch.randn(B, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    kn, vn = kc[:, :, :1].clone(), vc[:, :, :1].clone()
    seqlens = torch.tensor([3000, 9000], dtype=torch.int32, device="cuda")
    s = KeySummaries.build(kc, torch.full_like(seqlens, nmax), 64)

    def step() -> Any:
        return attn.decode(q, kc, vc, seqlens, k_new=kn, v_new=vn, summaries=s)

    graph, out = cuda_graph(step)
    for lengths in ([100, 16000], [5000, 64]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        for t in (q, kn, vn):
            t.normal_()
        saved = [t.clone() for t in (kc, vc, s.lo, s.hi, s.mean)]
        out.fill_(float("nan"))
        graph.replay()
        replayed = out.clone()
        for t, x in zip((kc, vc, s.lo, s.hi, s.mean), saved, strict=True):
            t.copy_(x)
        assert torch.equal(replayed, step()), f"lengths {lengths}: replay differs from an eager step"


@pytest.mark.autotune
@pytest.mark.parametrize("src", ["causal", "causal & (window(511) | topk(4, block=64))"])
@pytest.mark.parametrize("paged", [False, True])
def test_tuned_splits_equal_the_heuristic(src: str, paged: bool, monkeypatch: Any,
                                          tmp_path: Any) -> None:
    """The first step of a shape times its split counts (launching the step several times, k_new appended
    each time at the same positions); its output, log-sum-exp and cache equal those of the heuristic's step
    (autotuning off); the first tuned step adds one tuning record and a second reuses the pick."""
    from patterndsl.cache import KeySummaries
    from patterndsl.runtime import tuning

    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    attn = P.compile(f"pattern p = {src}\n")
    B, H, Hkv, D, nmax = 2, 8, 2, 128, 8192
    g = torch.Generator(device="cuda").manual_seed(3)
    kc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(B, Hkv, nmax, D, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(B, H, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    kn = torch.randn(B, Hkv, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    vn = torch.randn(B, Hkv, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    seqlens = torch.tensor([4000, 8191], dtype=torch.int32, device="cuda")
    table = None
    if paged:
        kc, vc, table = _paged(kc, vc, 64, 2)
    outs = []
    for tune in (False, True, True):
        k, v = kc.clone(), vc.clone()
        extra = {}
        if attn.spec.selectors[0] is not None:
            extra["summaries"] = KeySummaries.build(k, seqlens, 64, page_table=table)
        before = len(tuning.records())
        with attn.options(autotune=tune):
            o, lse = attn.decode(q, k, v, seqlens, page_table=table, k_new=kn, v_new=vn, return_lse=True, **extra)
        outs.append((o, lse, k, v, len(tuning.records()) - before))
    for o, lse, k, v, _ in outs[1:]:
        assert torch.equal(o, outs[0][0]) or (o.float() - outs[0][0].float()).abs().max().item() < 2e-2
        assert torch.allclose(lse, outs[0][1], atol=1e-3, rtol=1e-3)
        assert torch.equal(k, outs[0][2]) and torch.equal(v, outs[0][3])
    assert outs[1][4] == 1 and outs[2][4] == 0  # the first tuned step timed its candidates, the second reused them
