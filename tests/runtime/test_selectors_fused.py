"""The fused selection (`_topk_kernel`: scores and top-n in one launch) and the sync-free table merge
(`_merge_kernel`) of `patterndsl.runtime.selection` in the CPU interpreter, at sizes where rows span
several key tiles of the kernel.

- Selection against the float64 literal reading of LANGUAGE.md (`reference.selection`) on inputs whose
  block scores are exact in float32 and tie often (ties go to the lower block), and against the sorting
  path (`_block_scores` + `_pick`: int64 keys through torch.topk) on random floats.
- Tables against a brute-force merge of the static part's block tables (P0) with the picked blocks'
  tiles classified by P1's, row by row, including tiles smaller than the selector's block, static rows
  wider than one chunk of the kernel and more picks per row than one chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import reference as R

import patterndsl as P
from patterndsl.mask import dense_mask
from patterndsl.selectors import split

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from patterndsl.runtime import backward, selection, tables  # noqa: E402 (they import torch)
from patterndsl.runtime.common import _heads as _head_ids  # noqa: E402

SMALL = dict(block_m=16, block_n=16)


def _heads(h: int) -> Any:
    """Query heads 0 .. h - 1, all running pattern 0 (int32, as the runtime passes them)."""
    return _head_ids(0, 0, h, torch.device("cpu"))


def _spy_topk(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bool]]:
    """(BQ, BK, FILL) of every `_topk_kernel` launch from here on (the kernel still runs)."""
    seen: list[tuple[int, int, bool]] = []
    real = selection._topk_kernel

    class Spy:
        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                seen.append((kwargs["BQ"], kwargs["BK"], kwargs["FILL"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(selection, "_topk_kernel", Spy())
    return seen


@pytest.mark.parametrize(
    "src, n",
    [
        pytest.param(  # 140 blocks: 3 key tiles (about 6 s; the cases below span 2 key tiles in the fast tier)
            "causal & (window(15) | topk(5, block=16) | sink(16))", 16 * 140 - 5, marks=pytest.mark.slow
        ),
        pytest.param("topk(20, block=16)", 16 * 70, marks=pytest.mark.slow),  # no context, n not a power of two,
        # more than a tile's worth (the longest fast case: the two below keep the fused rule in the fast tier)
        ("causal & (window(8) | (where(k >= 40) & topk(2, block=16)))", 16 * 80),
        ("causal & (window(8) | (where(k % 64 < 16) & topk(3, block=16)))", 16 * 90),  # candidates not consecutive
    ],
)
def test_fused_topk_matches_the_float64_rule_ties_included(src: str, n: int) -> None:
    sp = split(P.pattern(src))
    g = torch.Generator().manual_seed(0)
    b, h, hkv, d = 1, 2, 1, 16
    q = torch.randint(-1, 2, (b, h, n, d), generator=g).float()  # block means k/16: scores exact, many ties
    k = torch.randint(-1, 2, (b, hkv, n, d), generator=g).float()
    k[..., : n // 2 : 3, :] = 0.0  # whole blocks of equal scores
    m = P.compile(f"pattern p = {src}\n", **SMALL)
    sel = selection._selection(m.spec, 0, q, k, None, _heads(h), h // hkv)
    assert sel.dtype == torch.int32 and sel.shape[-1] == 1 << (sp.selector.count - 1).bit_length()
    got = selection._sel_dense(sel, -(-n // sp.block)).view(b, h, -1, sel.shape[1]).numpy()
    want = R.selection(sp.selector, dense_mask(sp.context, n), q.numpy(), k.numpy())
    assert np.array_equal(got, want), f"{int((got != want).sum())} blocks differ"
    # each picked block once per row, padding -1 only where the row has fewer candidates
    s = sel.long()
    picked = (s >= 0).sum(-1)
    assert torch.equal(picked, torch.from_numpy(want.sum(-1)).view_as(picked))
    srt = torch.sort(torch.where(s < 0, -1 - torch.arange(s.shape[-1]), s), -1).values
    assert not (srt[..., 1:] == srt[..., :-1]).any()


@pytest.mark.parametrize(("rows", "fill", "keys"), [pytest.param(64, False, 64, marks=pytest.mark.slow), (16, False, 64),
                                                    pytest.param(64, True, 64, marks=pytest.mark.slow), pytest.param(64, True, 32, marks=pytest.mark.slow)])
def test_fused_topk_equals_the_sorting_path_on_random_scores(rows: int, fill: bool, keys: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Options topk_rows, topk_fill, topk_keys: every variant picks what the sorting path picks."""
    src = "causal & (window(15) | topk(7, block=16) | sink(16))"
    n, h, hkv, d = 16 * 100 - 7, 2, 1, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, h, n, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    m = P.compile(f"pattern p = {src}\n", **SMALL)
    heads = _heads(h)
    launches = _spy_topk(monkeypatch)
    with m.options(topk_rows=rows, topk_fill=fill, topk_keys=keys):
        fused = selection._selection(m.spec, 0, q, k, None, heads, h // hkv)
    assert launches == [(rows, keys, fill)]  # the variant asked for ran (top 8 columns fit a tile of keys)
    nb = -(-n // 16)
    scores = selection._block_scores(m.spec, m.spec.selectors[0], q, k, selection._pooled(q, k, 16), heads, h // hkv, 0, nb)
    sorting = selection._pick(m.spec.selectors[0], scores.reshape(-1, nb), 1.0).view(h, nb, -1)  # the int64-key path
    assert torch.equal(selection._sel_dense(fused, nb), selection._sel_dense(sorting, nb))


@pytest.mark.parametrize(("dtype", "fill"), [("float32", False), ("float16", False),
                                             pytest.param("float16", True, marks=pytest.mark.slow)])
def test_fused_given_scores_equal_the_sorting_path(dtype: str, fill: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """score=given through `_topk_kernel`: ties (few distinct values, -0.0 beside 0.0) to the lower block,
    NaN scores never picked, as `_ordered_keys` + torch.topk over the same scores."""
    src = "causal & (window(15) | topk(6, block=16, score=given))"
    n, h = 16 * 100 - 3, 2
    nb = -(-n // 16)
    g = torch.Generator().manual_seed(4)
    q, k = torch.zeros(1, h, n, 16), torch.zeros(1, 1, n, 16)
    scores = torch.randint(-1, 3, (1, h, nb, nb), generator=g).to(getattr(torch, dtype))
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, 0.0, -0.0).to(scores)
    scores[torch.rand(scores.shape, generator=g) < 0.05] = float("nan")
    m = P.compile(f"pattern p = {src}\n", **SMALL)
    launches = _spy_topk(monkeypatch)
    with m.options(topk_fill=fill):  # ties and NaN through the bitonic first tile too
        fused = selection._selection(m.spec, 0, q, k, scores, _heads(h), h)
    assert [x[2] for x in launches] == [fill]
    cand = selection._candidates(m.spec, m.spec.selectors[0].context, n, 16, "cpu")
    s = torch.where(cand, scores.float(), float("nan")).reshape(h * nb, nb)
    sorting = selection._pick(m.spec.selectors[0], s, 1.0).view(h, nb, -1)
    assert torch.equal(selection._sel_dense(fused, nb), selection._sel_dense(sorting, nb))
    assert int((fused >= 0).sum()) == int((sorting >= 0).sum()) > 0


def _brute_tables(m: Any, sel: Any, n: int, bm: int, bn: int, blk: int) -> dict[tuple[int, int], tuple[list, list]]:
    """Per (bh, query tile): sorted FULL and PARTIAL entries, from the two static parts' block tables."""
    p1 = m.spec.selectors[0].selected
    nqt, nkt = -(-n // bm), -(-n // bn)
    cls0: dict[tuple[int, int], int] = {}
    cls1: dict[tuple[int, int], int] = {}
    for pat, into in ((0, cls0), (p1, cls1)):
        f_off, f_idx, p_off, p_idx = (t.tolist() for t in tables.block_tables(m.spec, n, bm, bn, "cpu", pat))
        for qt in range(nqt):
            for t in range(f_off[qt], f_off[qt + 1]):
                into[qt, f_idx[t]] = 0
            for t in range(p_off[qt], p_off[qt + 1]):
                into[qt, p_idx[t]] = 1
    out = {}
    for bh in range(sel.shape[0]):
        for qt in range(nqt):
            picked = {int(x) for x in sel[bh, qt * bm // blk] if x >= 0}
            full, part = [], []
            for kt in range(nkt):
                if kt * bn // blk in picked:
                    c = cls1.get((qt, kt))
                    if c is not None:
                        (full if c == 0 else part).append(kt if c == 0 else kt + (1 << 30))
                elif (qt, kt) in cls0:
                    (full if cls0[qt, kt] == 0 else part).append(kt)
            out[bh, qt] = (sorted(full), sorted(part))
    return out


@pytest.mark.parametrize(
    "src, n, tiles, width",
    [
        ("causal & (window(15) | topk(3, block=16) | sink(16))", 16 * 40 - 3, (16, 16), 4),
        ("causal & (window(40) | topk(3, block=32) | sink(16))", 32 * 20 - 9, (16, 16), 3),  # 2 x 2 tiles a block
        ("causal & (window(300) | topk(3, block=16))", 16 * 40, (16, 16), 20),  # static rows of ~20 tiles
        ("(causal & topk(1, block=32)) | window(3)", 32 * 12 + 1, (32, 16), 17),  # picks beyond the context
    ],
)
def test_merged_tables_equal_a_brute_force_merge(src: str, n: int, tiles: tuple[int, int], width: int) -> None:
    m = P.compile(f"pattern p = {src}\n", **SMALL)
    blk = m.spec.selectors[0].block
    nb = -(-n // blk)
    bh = 3
    g = torch.Generator().manual_seed(2)
    # random distinct picks per row (any block, also ones outside the context), -1 padding in random places
    sel = torch.argsort(torch.rand(bh, nb, max(width, nb), generator=g), -1)[..., :width]
    sel = torch.where(torch.rand(bh, nb, width, generator=g) < 0.3, -1, sel).to(torch.int32)
    bm, bn = tiles
    want = _brute_tables(m, sel, n, bm, bn, blk)
    nqt = -(-n // bm)
    merged = selection._dynamic_tables(m.spec, 0, sel, 1, bh, n, bm, bn, "cpu")
    f_off, f_idx, p_off, p_idx = (t.tolist() for t in merged)
    assert len(f_off) == len(p_off) == bh * nqt + 1 and f_off[0] == p_off[0] == 0
    assert len(f_idx) >= f_off[-1] and len(p_idx) >= p_off[-1]  # sized by a bound, nothing read back
    for (b, qt), (full, part) in want.items():
        r = b * nqt + qt
        assert sorted(f_idx[f_off[r] : f_off[r + 1]]) == full, (b, qt)
        assert sorted(p_idx[p_off[r] : p_off[r + 1]]) == part, (b, qt)
    # the backward's tables by key tile: the same entries, transposed, ascending query tile per row
    nkt = -(-n // bn)
    tf_off, tf_idx, tp_off, tp_idx = (t.tolist() for t in backward._transpose_dynamic(merged, bh, nqt, nkt))
    for t_off, t_idx, which in ((tf_off, tf_idx, 0), (tp_off, tp_idx, 1)):
        assert len(t_off) == bh * nkt + 1 and t_off[0] == 0
        got = {(r // nkt, r % nkt, x) for r in range(bh * nkt) for x in t_idx[t_off[r] : t_off[r + 1]]}
        assert all(t_idx[t_off[r] : t_off[r + 1]] == sorted(t_idx[t_off[r] : t_off[r + 1]]) for r in range(bh * nkt))
        flag = 1 << 30
        expect = {(b, e & ~flag, qt + (e & flag)) for (b, qt), rows in want.items() for e in rows[which]}
        assert got == expect and t_off[-1] == len(expect)


def test_gradients_of_mixed_heads_with_a_dynamic_pattern_on_uneven_kv_groups() -> None:
    """heads { 0:1 static, 1:3 dynamic, 3:4 static } over 2 kv heads: each kv head's dK/dV reads the dynamic
    tables of its own query head (ranks 0 and 1 of the dynamic heads), against float64 autograd."""
    static, dyn = "causal & window(7)", "causal & (sink(16) | topk(1, block=16))"
    src = f"heads {{\n  0:1 => {static}\n  1:3 => {dyn}\n  3:4 => {static}\n}}"
    m = P.compile(f"pattern p = {src}\n", **SMALL)
    n = 64
    g = torch.Generator().manual_seed(6)
    q = torch.randint(-2, 3, (1, 4, n, 16), generator=g).float()
    k = torch.randint(-2, 3, (1, 2, n, 16), generator=g).float()
    v = torch.randn(1, 2, n, 16, generator=g)
    m0 = np.array([[j <= i and i - j <= 7 for j in range(n)] for i in range(n)])
    m1, _ = R.dynamic_mask(P.pattern(dyn), q[:, 1:3].numpy(), k.numpy())  # query heads 1, 2 read kv heads 0, 1
    mask = np.stack([m0, m1[0, 0], m1[0, 1], m0])[None]
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    w = torch.randn(q.shape, generator=g, dtype=torch.float64)
    (m.attention(qs, ks, vs).double() * w).sum().backward()
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    s = qd @ kd.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    p = torch.softmax(s.masked_fill(~torch.from_numpy(mask), float("-inf")), -1)
    ((p @ vd.repeat_interleave(2, 1)) * w).sum().backward()
    for got, ref in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert got is not None and ref is not None
        assert (got.double() - ref).abs().max().item() < 2e-4 * max(1.0, ref.abs().max().item())
