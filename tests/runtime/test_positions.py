"""Attention at given positions (runtime/positions.py): any subset of query rows against any subset of key
rows, in any order, with the pattern seen at the rows' own positions; partial results over disjoint key
sets merge by log-sum-exp into the single call's. Against the brute-force masked softmax, float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import attention_reference, compiled, grad_tolerance, reference_grads, spy_launches
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import reference_mask
from reference_varlen import doc_mask
from strategies import document_splits, expressions

import patterndsl as P
from patterndsl import ir
from patterndsl.runtime import forward, tables
from patterndsl.runtime.positions import Positions, Spans, attention_at, attention_at_backward, merge, run_positions
from patterndsl.source import PatternError

SOURCES = ["causal & window(4) | global(-1:)", "heads {\n 0:1 => causal\n 1:2 => window(2, dilation=2) | cols(5:7)\n}"]


def _mask(src: str, n: int, docs: list[int] | None) -> np.ndarray:
    body = P.loads(f"pattern p = {src}\n").patterns[0].body
    return reference_mask(body, n) if docs is None else doc_mask(body, docs)


@settings(max_examples=10)
@given(st.sampled_from(SOURCES), st.integers(3, 30), st.integers(0, 2**31), st.booleans())
def test_subsets_in_any_order_and_merge(src: str, n: int, seed: int, packed: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    docs = None
    cu = None
    if packed:
        cut = sorted(torch.randperm(n - 1, generator=g)[:2].add(1).tolist())
        docs = [cut[0], cut[1] - cut[0], n - cut[1]]
        cu = torch.tensor([0, cut[0], cut[1], n])
    q, k, v, do = (torch.randn(1, 2, n, 8, dtype=torch.float64, generator=g) for _ in range(4))
    mask = _mask(src, n, docs)
    want, want_lse = attention_reference(q, k, v, mask, 8**-0.5)
    spec = compiled(src).spec
    rows = torch.randperm(n, generator=g)[: max(1, n // 2)]
    keys = torch.randperm(n, generator=g)
    split = int(torch.randint(0, n + 1, (1,), generator=g))
    parts = []
    for part in (keys[:split], keys[split:]):
        at = Positions.of(rows, part, n, cu)
        parts.append(attention_at(spec, q[:, :, rows], k[:, :, part], v[:, :, part], at))
    out, lse = merge(parts)
    torch.testing.assert_close(out, want[:, :, rows], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse[:, :, rows], atol=1e-5, rtol=1e-5)
    # the gradients of the rows' outputs: summed over the key sets for dq, per key set for dk, dv
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref, _ = attention_reference(*ref, mask, 8**-0.5)
    (o_ref[:, :, rows] * do[:, :, rows]).sum().backward()
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for part in (keys[:split], keys[split:]):
        at = Positions.of(rows, part, n, cu)
        gq, gk, gv = attention_at_backward(spec, do[:, :, rows], q[:, :, rows], k[:, :, part], v[:, :, part], out,
                                           lse, at)
        dq[:, :, rows] += gq
        dk[:, :, part] += gk
        dv[:, :, part] += gv
    for got, r in zip((dq, dk, dv), ref, strict=True):
        torch.testing.assert_close(got, r.grad, atol=1e-5, rtol=1e-5)


runs_lists = st.lists(st.tuples(st.integers(0, 40), st.integers(-2, 9)).map(lambda t: (t[0], t[0] + t[1])), max_size=6)


@settings(max_examples=60)
@given(runs_lists, runs_lists, st.integers(1, 60))
def test_runs_expand_to_their_positions(q_runs: list[tuple[int, int]], k_runs: list[tuple[int, int]], n: int) -> None:
    """run_positions (runs as pairs or as an array [m, 2]) and the Spans' rows that go through it: each
    run's tokens in turn, brute force (a run that stops before it starts holds none)."""
    def brute(runs: list[tuple[int, int]]) -> list[int]:
        return [p for a, b in runs for p in range(a, b)]

    for runs in (q_runs, k_runs):
        for given_as in (runs, tuple(runs), np.array(runs, dtype=np.int64).reshape(-1, 2)):
            got = run_positions(given_as)
            assert got.dtype == np.int64 and got.tolist() == brute(runs)
    at = Spans(tuple(q_runs), tuple(k_runs), n).positions("cpu")
    assert at.q.tolist() == brute(q_runs) and at.k.tolist() == brute(k_runs)
    assert at.q.dtype == at.k.dtype == torch.int64


def test_a_query_with_no_key_gets_zeros() -> None:
    spec = compiled(SOURCES[0]).spec
    q, k, v = (torch.randn(1, 1, 5, 8, dtype=torch.float64) for _ in range(3))
    out, lse = attention_at(spec, q[:, :, :2], k[:, :, 2:4], v[:, :, 2:4], Positions.of(torch.arange(2),
                            torch.arange(2, 4), 5))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    merged, merged_lse = merge([(out, lse), (out, lse)])
    assert torch.equal(merged, out) and torch.isinf(merged_lse).all()



# --- the kernels (TRITON_INTERPRET=1): buffers holding runs of the sequence (`Spans`) ------------------------


Runs = tuple[tuple[int, int], ...]


def _runs(n: int, g: torch.Generator) -> list[tuple[int, int]]:
    """[0, n) cut at up to four random points into runs, in a random order."""
    count = int(torch.randint(0, 5, (1,), generator=g))
    edges = [0, *sorted(set(torch.randint(1, n, (count,), generator=g).tolist())), n] if n > 1 else [0, n]
    runs = list(zip(edges[:-1], edges[1:], strict=True))
    return [runs[i] for i in torch.randperm(len(runs), generator=g).tolist()]


def _rows(runs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs] or [torch.zeros(0, dtype=torch.int64)])


def check_spans(src: str, lengths: list[int], h: int, hkv: int, seed: int) -> None:
    """Some runs of the queries against the keys cut into two sets of runs (all in random orders): the
    kernels (float32) and the PyTorch path at positions (float64) equal the brute-force reference, forward
    and gradients (of the output and of the log-sum-exp), after merging the two key sets; the float32
    calls launch the kernels (a pattern's token layout too: the segments keep the token order)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    docs = None if len(lengths) == 1 else tuple(np.cumsum([0, *lengths]).tolist())
    q, do = (torch.randn(1, h, n, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(1, hkv, n, 8, generator=g) for _ in range(2))
    q_runs = _runs(n, g)[: int(torch.randint(1, 4, (1,), generator=g))]
    k_runs = _runs(n, g)
    cut = int(torch.randint(0, len(k_runs) + 1, (1,), generator=g))
    key_sets = [tuple(k_runs[:cut]), tuple(k_runs[cut:])]
    rows = _rows(q_runs)
    picked = torch.zeros(1, h, n)
    picked[:, :, rows] = 1.0  # the loss reads the runs' rows only
    dlse = torch.randn(1, h, n, generator=g) * picked
    want = reference_grads(q, k, v, _mask(src, n, None if docs is None else lengths), 8**-0.5, do * picked[..., None], dlse)
    attn = compiled(src)
    launches: list[bool] = []
    with pytest.MonkeyPatch.context() as mp:
        spy_launches(mp, forward, "_attn_fwd", launches, lambda kw: kw.get("QSEG") is not None)
        for dtype, tol in ((torch.float32, 2e-4), (torch.float64, 1e-6)):
            qr, kk, vv, dd = (t.to(dtype) for t in (q[:, :, rows], k, v, do[:, :, rows]))
            sets = [(_rows(list(ks)), Spans(tuple(q_runs), ks, n, docs)) for ks in key_sets]
            out, lse = merge([attention_at(attn.spec, qr, kk[:, :, j], vv[:, :, j], at) for j, at in sets])
            torch.testing.assert_close(out.double(), want[0][:, :, rows], atol=tol, rtol=tol)
            assert torch.equal(torch.isinf(lse), torch.isinf(want[1][:, :, rows])), src
            torch.testing.assert_close(lse.double().nan_to_num(0, 0, 0), want[1][:, :, rows].nan_to_num(0, 0, 0),
                                       atol=tol, rtol=tol)
            grads = [torch.zeros_like(t, dtype=dtype) for t in (q, k, v)]
            for j, at in sets:
                gq, gk, gv = attention_at_backward(attn.spec, dd, qr, kk[:, :, j], vv[:, :, j], out, lse, at,
                                                   dlse[:, :, rows])
                grads[0][:, :, rows] += gq
                grads[1][:, :, j] += gk
                grads[2][:, :, j] += gv
            for name, got, ref in zip(("dq", "dk", "dv"), grads, want[2:], strict=True):
                err = float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))
                assert err <= 10 * grad_tolerance(dtype), (src, dtype, name, err)
    assert launches and all(launches), (src, launches)


@pytest.mark.interpreter
def test_kernels_at_spans_packed_documents_gqa() -> None:
    check_spans(SOURCES[1], [20, 1, 0, 26], 2, 1, 3)  # heads { }: a key head's group mixes predicates


@pytest.mark.slow
@pytest.mark.interpreter
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(src=expressions(max_leaves=3), lengths=document_splits, seed=st.integers(0, 2**31), gqa=st.booleans())
def test_kernels_at_spans_random_patterns(src: str, lengths: list[int], seed: int, gqa: bool) -> None:
    body = P.pattern(src)
    assume(not any(ir.is_dynamic(x) for x in ir.walk(body)) and sum(lengths) > 0)
    try:
        _mask(src, sum(lengths), None if len(lengths) == 1 else lengths)
        compiled(src)
    except (PatternError, ValueError, ZeroDivisionError):  # invalid at these lengths, or refused by the compiler
        assume(False)
    check_spans(src, lengths, 2, 1 if gqa else 2, seed)


@settings(max_examples=30)
@given(lengths=document_splits, block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**31))
def test_segments_cut_runs_at_documents_and_blocks(lengths: list[int], block: int, seed: int) -> None:
    """Read row by row, the segments hold the runs' tokens in order; each lies in one block of one document
    and says that document's length."""
    n = sum(lengths)
    assume(n > 0)
    g = torch.Generator().manual_seed(seed)
    runs = tuple(_runs(n, g))
    cu = np.cumsum([0, *lengths])
    seg = tables.segments(runs, n, tuple(cu.tolist()), block)
    shift, pos, size, length, doc, blk = seg.T
    assert (size > 0).all() and (size <= block).all() and (pos // block == blk).all()
    assert ((pos + size - 1) // block == blk).all() and (pos + size <= length).all()
    assert (length == cu[doc + 1] - cu[doc]).all()
    rows = [r for s in seg for r in range(s[0] + s[1], s[0] + s[1] + s[2])]
    assert rows == list(range(n))  # the buffer's rows, each once, in order
    tokens = [cu[d] + p + i for s, d, p in zip(seg, doc, pos, strict=True) for i in range(s[2])]
    assert tokens == _rows(list(runs)).tolist()


@pytest.mark.parametrize("src", SOURCES)
def test_span_tables_of_the_whole_sequence_are_its_block_tables(src: str) -> None:
    """One run of the whole sequence: the segments are its blocks and meet exactly as the block tables say,
    FULL and PARTIAL alike (one tile builder), listed heaviest query block first."""
    spec = compiled(src).spec
    n = 45

    def listed(off: torch.Tensor, idx: torch.Tensor, block: list[int]) -> set[tuple[int, int]]:
        return {(block[r], int(c)) for r in range(off.numel() - 1) for c in idx[off[r]:off[r + 1]].tolist()}

    for pat in range(spec.patterns):
        rows, cols, *got = tables.span_tables(spec, pat, ((0, n),), ((0, n),), n, None, 16, 8, "cpu")
        want = tables.block_tables(spec, n, 16, 8, "cpu", pat, layout=False)
        assert cols[:, 1].tolist() == list(range(0, n, 8)) and (rows[:, 0] == 0).all()
        qblock = (rows[:, 1] // 16).tolist()
        for a in (0, 2):
            assert listed(got[a], got[a + 1], qblock) == listed(want[a], want[a + 1], list(range(len(qblock))))
        counts = (got[0][1:] - got[0][:-1]) + (got[2][1:] - got[2][:-1])
        assert counts.tolist() == sorted(counts.tolist(), reverse=True)


def check_span_tables(src: str, lengths: list[int], q_runs: Runs, k_runs: Runs, bm: int, bn: int,
                      transpose: bool) -> None:
    """Against the brute-force mask: two segments meet (are listed) where some query of one may attend to
    some key of the other, never across documents, and FULL only where every pair is allowed and the key
    segment is a whole block."""
    n = sum(lengths)
    cu = tuple(np.cumsum([0, *lengths]).tolist())
    spec = compiled(src).spec
    mask = _mask(src, n, lengths)
    q_seg, k_seg = tables.segments(q_runs, n, cu, bm), tables.segments(k_runs, n, cu, bn)

    def tokens(seg: np.ndarray) -> list[int]:
        return [cu[int(seg[4])] + int(seg[1]) + x for x in range(int(seg[2]))]

    def index(segs: np.ndarray, kernel_rows: list[list[int]]) -> list[int]:  # kernel order -> segment
        at = {(int(s[0]), int(s[1])): t for t, s in enumerate(segs)}
        return [at[(r[0], r[1])] for r in kernel_rows]

    for pat in range(spec.patterns):
        m = mask[pat] if mask.ndim == 3 else mask
        got = tables.span_tables(spec, pat, q_runs, k_runs, n, cu, bm, bn, "cpu", transpose)
        rows, cols, f_off, f_idx, p_off, p_idx = (t.tolist() for t in got)
        qi, ki = (index(q_seg, cols), index(k_seg, rows)) if transpose else (index(q_seg, rows), index(k_seg, cols))
        listed: dict[tuple[int, int], str] = {}
        for off, idx, kind in ((f_off, f_idx, "full"), (p_off, p_idx, "partial")):
            for r in range(len(off) - 1):
                for c in idx[off[r]:off[r + 1]]:
                    pair = (qi[c], ki[r]) if transpose else (qi[r], ki[c])  # (query segment, key segment)
                    assert pair not in listed
                    listed[pair] = kind
        for s, qs in enumerate(q_seg):
            for t, ks in enumerate(k_seg):
                block = m[np.ix_(tokens(qs), tokens(ks))]
                kind = listed.get((s, t))
                assert kind is not None or not block.any(), (s, t)
                assert kind != "full" or (block.all() and ks[2] == bn), (s, t)
                assert kind is None or qs[4] == ks[4], (s, t)


@pytest.mark.slow
@settings(max_examples=12)
@given(src=st.sampled_from(SOURCES), lengths=document_splits, seed=st.integers(0, 2**31),
       blocks=st.sampled_from([(16, 8), (8, 16), (4, 4)]), transpose=st.booleans())
def test_span_tables_list_the_segments_that_meet(src: str, lengths: list[int], seed: int, blocks: tuple[int, int],
                                                 transpose: bool) -> None:
    n = sum(lengths)
    assume(n > 0)
    g = torch.Generator().manual_seed(seed)
    q_runs, k_runs = (tuple(_runs(n, g)[:int(torch.randint(1, 3, (1,), generator=g))]) for _ in range(2))
    check_span_tables(src, lengths, q_runs, k_runs, *blocks, transpose)


def test_span_tables_never_meet_across_documents() -> None:
    """A long document's queries list key blocks past any the later, shorter documents hold: they must not
    alias those documents' blocks."""
    check_span_tables(SOURCES[0], [40, 8, 8, 8], ((0, 40),), ((40, 64),), 4, 4, False)
