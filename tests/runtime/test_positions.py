"""Attention at given positions (runtime/positions.py): any subset of query rows against any subset of key
rows, in any order, with the pattern seen at the rows' own positions; partial results over disjoint key
sets merge by log-sum-exp into the single call's. Against the brute-force masked softmax, float64."""

from __future__ import annotations

import numpy as np
import torch
from helpers import attention_reference, compiled
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask
from reference_varlen import doc_mask

import patterndsl as P
from patterndsl.runtime.positions import Positions, attention_at, attention_at_backward, merge

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


def test_a_query_with_no_key_gets_zeros() -> None:
    spec = compiled(SOURCES[0]).spec
    q, k, v = (torch.randn(1, 1, 5, 8, dtype=torch.float64) for _ in range(3))
    out, lse = attention_at(spec, q[:, :, :2], k[:, :, 2:4], v[:, :, 2:4], Positions.of(torch.arange(2),
                            torch.arange(2, 4), 5))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    merged, merged_lse = merge([(out, lse), (out, lse)])
    assert torch.equal(merged, out) and torch.isinf(merged_lse).all()
