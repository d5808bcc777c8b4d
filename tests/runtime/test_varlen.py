"""Packed documents (`cu_seqlens`, LANGUAGE.md "Packed sequences") in Triton's CPU interpreter.

The reference is block-diagonal and independent of the library: per document `[s, e)` the brute-force mask
of `tests/reference.py` at N = e - s, nothing across documents, softmax in float64. Outputs are poisoned
(NaN: `out=` and `lse=` filled with NaN) before each run. Document splits are drawn by hypothesis (length-0 and length-1 documents,
documents shorter than a window or a block). A document at which a pattern cannot run (a layout of
another size, an argument out of range at that N) must give one clear error naming the document.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import VARLEN_PATTERNS, compiled, cu_of
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from reference import reference_mask
from reference_varlen import doc_mask, packed_tables
from strategies import document_splits, expressions

import patterndsl as P
from patterndsl import ir
from patterndsl.source import PatternError

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from patterndsl import tiling  # noqa: E402
from patterndsl.runtime import backward, cpu, forward, tables, varlen  # noqa: E402 (they import torch)
from patterndsl.runtime.spec import PatternSpec  # noqa: E402

SMALL = dict(block_m=16, block_n=16)
def run(m: Any, q: Any, k: Any, v: Any, lse_shape: tuple[int, ...], **kwargs: Any) -> tuple[Any, Any]:
    """`m.attention_lse` (no grad) into `out=` and `lse=` filled with NaN: an element the kernels leave
    unwritten stays NaN. The results must be those very tensors."""
    out = torch.full(tuple(q.shape), float("nan"), dtype=q.dtype)
    lse = torch.full(lse_shape, float("nan"), dtype=torch.float32)
    with torch.no_grad():
        got, got_lse = m.attention_lse(q, k, v, out=out, lse=lse, **kwargs)
    assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr(), "results not written in place"
    return got, got_lse


def reference(q: Any, k: Any, v: Any, mask: np.ndarray, scale: float) -> tuple[Any, Any]:
    """q, k, v [total, H, D]; float64 masked softmax -> ([total, H, D], lse [H, total])."""
    group = q.shape[1] // k.shape[1]
    qq = q.double().transpose(0, 1)
    kk = k.double().transpose(0, 1).repeat_interleave(group, 0)
    vv = v.double().transpose(0, 1).repeat_interleave(group, 0)
    s = (qq @ kk.transpose(-1, -2) * scale).masked_fill(~torch.from_numpy(mask), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return (p @ vv).transpose(0, 1), lse


def check(m: Any, body: ir.Body, lengths: list[int], h: int = 2, hkv: int | None = None, d: int = 16,
          dtype: Any = torch.float32, seed: int = 0, four_d: bool = False) -> None:  # fmt: skip
    total = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, h, d, generator=g).to(dtype)
    k, v = (torch.randn(total, hkv or h, d, generator=g).to(dtype) for _ in range(2))
    cu = cu_of(lengths)
    if four_d:
        out4, lse4 = run(m, *(t.transpose(0, 1)[None] for t in (q, k, v)), (1, h, total), cu_seqlens=cu)
        assert out4.shape == (1, h, total, d) and lse4.shape == (1, h, total)
        out, lse = out4[0].transpose(0, 1), lse4[0]
    else:
        out, lse = run(m, q, k, v, (h, total), cu_seqlens=cu, max_seqlen=max(lengths))
    want, want_lse = reference(q, k, v, doc_mask(body, lengths), d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (h, total)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN) elements"
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.float64: 1e-12}[dtype]
    err = (out.double() - want).abs().max().item() if total else 0.0
    assert err < tol * max(1.0, want.abs().max().item() if total else 1.0), f"max |out - ref| = {err}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key: lse -inf; others finite"
    if finite.any():
        assert (lse.double()[finite] - want_lse[finite]).abs().max().item() < 1e-3


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("bigbird", "quarter") else n
                                  for n in sorted(VARLEN_PATTERNS)])  # those two: 3-5 s each
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=document_splits)
def test_random_document_splits_match_block_diagonal_reference(name: str, lengths: list[int]) -> None:
    src = VARLEN_PATTERNS[name]
    check(compiled(src), P.pattern(src), lengths)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(src=expressions(max_leaves=3), lengths=document_splits)
@example(src="window(1, 1, dilation=2) | global(-1)", lengths=[1, 0])  # empty documents took a neighbour's tiles
@example(src="window(1, dilation=2) | global(-1)", lengths=[0, 17])
def test_random_patterns_on_random_splits(src: str, lengths: list[int]) -> None:
    """Hypothesis-drawn patterns: a document at which the pattern is invalid must be a clear error."""
    body = P.pattern(src)
    assume(not any(ir.is_dynamic(x) for x in ir.walk(body)))
    bad = []
    for d, n in enumerate(lengths):
        try:
            reference_mask(body, n) if n else None
            P.dense_mask(body, n) if n else None
        except (PatternError, ValueError, ZeroDivisionError):
            bad.append(d)
    try:
        m = P.compile(f"pattern p = {src}\n", **SMALL)
    except PatternError as e:  # the one documented refusal: random(r) with r depending on N
        assert "random(r, ...) compiles only when r is a number" in str(e)
        assume(False)
        return
    if bad:
        q = torch.randn(sum(lengths), 1, 16)
        with pytest.raises(ValueError, match=r"document \d+ \(tokens \d+:\d+\)"):
            m.attention(q, q, q, cu_seqlens=cu_of(lengths))
        return
    check(m, body, lengths, h=1)


def test_length_one_and_short_documents() -> None:
    """Length-1 documents see themselves; documents shorter than the window or a block keep their meaning."""
    for name in ("swa_sink", "power"):
        src = VARLEN_PATTERNS[name]
        check(compiled(src), P.pattern(src), [1, 1, 3, 1, 17, 2, 1])
    m = compiled("causal & (window(5) | sink(2))")
    q = torch.randn(4, 1, 16)
    out, _ = run(m, q, q, q, (1, 4), cu_seqlens=cu_of([1, 1, 1, 1]))
    assert torch.allclose(out, q, atol=1e-6), "a length-1 document attends only to itself"


def test_gqa_heads_patterns_layouts_and_four_d_input() -> None:
    src = VARLEN_PATTERNS["swa_sink"]
    check(compiled(src), P.pattern(src), [20, 33, 7], h=4, hkv=1)
    check(compiled(src), P.pattern(src), [20, 33, 7], h=4, hkv=2, four_d=True)
    text = "pattern m = heads {\n  0:1 => causal & window(3)\n  1:3 => sink(2) | window(0)\n}\n"
    body = P.loads(text).patterns[0].body
    m = P.compile(text, **SMALL)
    check(m, body, [9, 1, 30], h=3)
    grid = "layout g = grid(3, 5)\npattern p = neighborhood(g, kernel=3) | where(g, abs(qc1 - kc1) == 4)\n"
    body = P.loads(grid).patterns[0].body
    gm = P.compile(grid, **SMALL)
    check(gm, body, [15, 15, 15])


def test_float16_and_cpu_reference_path() -> None:
    src = VARLEN_PATTERNS["longformer"]
    check(compiled(src), P.pattern(src), [25, 4, 40], dtype=torch.float16)
    m = compiled(src)
    cpu._warned_cpu.clear()  # the warning is given once a process
    with pytest.warns(UserWarning, match="not the fast"):
        check(m, P.pattern(src), [25, 0, 4, 40], dtype=torch.float64)  # float64 takes the PyTorch path


_MASKS: dict[tuple[str, int], np.ndarray] = {}


@pytest.mark.parametrize("src", ["causal & (window(21) | stride(16))", "window(21) | stride(16)"])
@pytest.mark.parametrize("free", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.one_of(st.just(1), st.integers(0, 3), st.integers(1, 140)), min_size=1, max_size=9),
    tiles=st.sampled_from([(16, 16), (32, 16), (16, 32), (64, 32)]),
)
def test_tables_are_sound_and_full_tiles_exact(src: str, free: bool, transpose: bool, lengths: list[int],
                                               tiles: tuple[int, int]) -> None:  # fmt: skip
    """Against the brute-force mask of each document: every allowed pair lies in a listed tile; FULL tiles
    are entirely allowed and their keys inside their document; each row's blocks ascend, FULL and PARTIAL
    apart; per query block (or, transposed, per key block) the tiles come heaviest first. Both builders:
    the shared N-free table (free) and each tile classified at its own N. Without causal, a document's
    ragged last key block is entirely allowed: it must be listed PARTIAL."""
    m = compiled(src)
    assert m.spec.n_free == (True,)
    bm, bn = tiles
    with pytest.MonkeyPatch.context() as mp:  # (not the fixture: hypothesis runs the test many times)
        mp.setattr(PatternSpec, "n_free", property(lambda self: (free,)))  # False: classified per document
        built = varlen._varlen_tables(m.spec, cu_of(lengths), lengths, bm, bn, transpose=transpose)
    assert all(x.dtype == torch.int32 and x.is_contiguous() for x in built)
    tiles_, f_off, f_idx, p_off, p_idx = built
    row_block = bn if transpose else bm
    rows = [tuple(t) for t in tiles_.view(-1, 2).tolist()]
    assert sorted(rows) == sorted((d, b) for d, n in enumerate(lengths) for b in range(-(-n // row_block)))
    for off, idx in ((f_off, f_idx), (p_off, p_idx)):
        assert off.numel() == len(rows) + 1 and off[0] == 0 and off[-1] == idx.numel()
        assert (off[1:] >= off[:-1]).all()
    work = []
    for r, (d, b) in enumerate(rows):
        n = lengths[d]
        if (src, n) not in _MASKS:
            _MASKS[src, n] = reference_mask(P.pattern(src), n)
        mask = _MASKS[src, n]
        full = f_idx[f_off[r] : f_off[r + 1]].tolist()
        part = p_idx[p_off[r] : p_off[r + 1]].tolist()
        assert full == sorted(set(full)) and part == sorted(set(part)) and not set(full) & set(part), (d, b)
        if transpose:
            cols = mask[:, b * bn : (b + 1) * bn]
            needed = {i // bm for i in np.nonzero(cols.any(1))[0]}
            assert all(cols[x * bm : (x + 1) * bm].all() and (b + 1) * bn <= n for x in full), (d, b)
        else:
            rows_ = mask[b * bm : (b + 1) * bm]
            needed = {j // bn for j in np.nonzero(rows_.any(0))[0]}
            assert all(rows_[:, x * bn : (x + 1) * bn].all() and (x + 1) * bn <= n for x in full), (d, b)
        assert needed <= set(full) | set(part), (d, b)
        assert all(x < -(-n // (bm if transpose else bn)) for x in full + part)
        work.append(len(full) + len(part))
    assert work == sorted(work, reverse=True), "tiles are ordered heaviest first"


@pytest.mark.parametrize("fuse_pre", [True, False])
def test_fifty_calls_with_random_lengths_need_one_specialisation(fuse_pre: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton compiles one kernel per specialisation key; the keys of 50 forward+backward calls with
    random documents (computed by Triton's own binder) must be one per kernel. The same binder without
    do_not_specialize tells them apart, so the check can fail. The delta pre-pass runs only without
    bwd_fuse_pre (the dQ kernel computes delta by default). Each kernel is recorded where the runtime
    launches it from (the module that imports it by name)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    m = P.compile("pattern p = causal & (window(5) | sink(2))\n", **SMALL)
    where = {"_attn_fwd": forward, "_attn_bwd_dq": backward, "_attn_bwd_dkdv": backward, "_vl_rows": varlen,
             "_vl_scan": varlen, "_vl_gather": varlen, "_attn_bwd_pre": backward}
    names = [x for x in where if x != "_attn_bwd_pre" or not fuse_pre]
    launches: dict[str, list[tuple[Any, Any]]] = {x: [] for x in names}

    class Recorder:  # records the launch instead of running it (the key is all that matters here)
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: Any) -> Any:
            return lambda *a, **kw: launches[self.name].append((a, kw))

    binders = {}
    for x in names:
        real = getattr(where[x], x)
        for label, kw in (("ours", real.kwargs), ("specialised", {**real.kwargs, "do_not_specialize": []})):
            jf = JITFunction(real.fn, **kw)
            binders[x, label] = create_function_from_signature(jf.signature, jf.params, BaseBackend)
    rng = np.random.default_rng(0)
    for x in names:  # (monkeypatch puts the runtime's kernels back after the test)
        monkeypatch.setattr(where[x], x, Recorder(x))
    try:
        with m.options(bwd_fuse_pre=fuse_pre):
            for _ in range(50):
                lengths = rng.integers(1, 300, rng.integers(1, 9)).tolist()
                q = torch.randn(sum(lengths), 2, 16, requires_grad=True)
                m.attention(q, q, q, cu_seqlens=cu_of(lengths)).sum().backward()
    finally:
        varlen._VARLEN.clear()  # the garbage tables of recorded launches
    for x in names:
        assert len(launches[x]) == (150 if x.startswith("_vl_") else 50), x  # tables: forward, dQ, dK/dV
        keys: dict[str, set[str]] = {"ours": set(), "specialised": set()}
        for a, kw in launches[x]:
            for label in keys:
                _, sig, opts = binders[x, label](*a, **kw)
                keys[label].add(repr(sig) + repr(sorted(opts.items())))
        assert len(keys["ours"]) == 1, (x, keys["ours"])
        assert len(keys["specialised"]) > 1, x


def test_bad_calls_raise_one_clear_error() -> None:
    m = compiled(VARLEN_PATTERNS["swa_sink"])
    q = torch.randn(10, 2, 16)
    cu = cu_of([4, 6])
    with pytest.raises(ValueError, match="start at 0 and end at the packed length 10"):
        m.attention(q, q, q, cu_seqlens=cu_of([4, 5]))
    with pytest.raises(ValueError, match="must not decrease"):
        m.attention(q, q, q, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D int32 or int64"):
        m.attention(q, q, q, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="1-D int32 or int64"):
        m.attention(q, q, q, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="max_seqlen = 5 but document 1 holds 6 tokens"):
        m.attention(q, q, q, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="only meaningful with cu_seqlens"):
        m.attention(q[None], q[None], q[None], max_seqlen=5)
    with pytest.raises(ValueError, match=r"must all be \[total, heads, head_dim\]"):
        m.attention(q, q[None], q, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"got q of shape \(2, 2, 10, 16\)"):
        m.attention(torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16), cu_seqlens=cu)
    with pytest.raises(ValueError, match="kv heads"):
        m.attention(q, q[:, :1].expand(10, 3, 16).contiguous(), q[:, :1].expand(10, 3, 16).contiguous(), cu_seqlens=cu)
    grid = P.compile("layout g = grid(2, 3)\npattern p = neighborhood(g, kernel=2)\n", **SMALL)
    with pytest.raises(
        ValueError, match=r"document 1 \(tokens 6:10\): layout 'g' = grid\(2, 3\) holds 6 tokens but N = 4"
    ):
        grid.attention(q, q, q, cu_seqlens=cu_of([6, 4]))
    win = P.compile("pattern p = window(N // 4 - 1)\n", **SMALL)
    with pytest.raises(ValueError, match=r"document 0 \(tokens 0:3\): window's size .* at N = 3"):
        win.attention(q, q, q, cu_seqlens=cu_of([3, 7]))


def test_tables_are_shared_by_calls_with_the_same_documents() -> None:
    """Layers of one step (same cu_seqlens) share a build; other documents get their own tables."""
    sp = compiled(VARLEN_PATTERNS["swa_sink"]).spec
    varlen._VARLEN.clear()
    a = varlen.varlen_tables(sp, cu_of([5, 30]), [5, 30], 16, 16)
    assert varlen.varlen_tables(sp, cu_of([5, 30]), [5, 30], 16, 16) is a
    b = varlen.varlen_tables(sp, cu_of([30, 5]), [30, 5], 16, 16)
    assert b is not a and not torch.equal(a[0], b[0])
    other = compiled(VARLEN_PATTERNS["power"]).spec  # another pattern, the same documents: its own tables
    c = varlen.varlen_tables(other, cu_of([5, 30]), [5, 30], 16, 16)
    assert c is not a and varlen.varlen_tables(other, cu_of([5, 30]), [5, 30], 16, 16) is c
    for _ in range(40):
        varlen.varlen_tables(sp, cu_of([7, 1]), [7, 1], 16, 16, transpose=True)
        varlen.varlen_tables(sp, cu_of(list(range(1, 30))), list(range(1, 30)), 16, 16)
    assert len(varlen._VARLEN) <= 17


def test_n_free_build_reads_no_device_value_and_launches_a_handful_of_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a host sync costs more than the whole build (perf-notes, varlen v1): the per-call N-free
    build must read no device value. On the meta device every such read (item, tolist, nonzero, boolean
    masks, repeat_interleave without its size) raises, so the build running there (the shared table's
    device part moved to meta) shows it; the same call on the CPU gives the shapes meta reports. Triton
    cannot launch on meta: its three table kernels are recorders there, which check that every argument is
    a meta tensor or a Python int. Counted per call with the templates warm: the torch ops that produce
    device tensors, views aside (the descriptor's copy, the buffer, the sort), and the launches."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class DeviceOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []  # new device tensors
            self.writes: list[str] = []  # every op with a device result, views and in-place ones too

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            on_meta = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_flatten(out)[0])
            if on_meta:
                self.writes.append(func.__name__.split(".")[0])
            if on_meta and not any(r.alias_info for r in func._schema.returns):
                self.names.append(func.__name__.split(".")[0])
            return out

    launches: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> None:
                assert all(type(x) is int and x > 0 for x in grid), grid
                for x in (*args, *kwargs.values()):
                    assert type(x) is int or (isinstance(x, torch.Tensor) and x.device.type == "meta"), type(x)
                launches.append(self.name)

            return launch

    sp = compiled("causal & window(100)").spec
    lengths = [1, 300, 0, 77, 16, 129, 1]
    kernels = ("_vl_rows", "_vl_scan", "_vl_gather")
    cases = (((32, 16), False), ((16, 64), True))
    wants = [varlen._varlen_tables(sp, cu_of(lengths), lengths, *tiles, transpose=transpose)
             for tiles, transpose in cases]
    for x in kernels:  # (monkeypatch puts the runtime's kernels back)
        monkeypatch.setattr(varlen, x, Recorder(x))
    for (tiles, transpose), want in zip(cases, wants, strict=True):
        sides, src, _ = varlen._free_source(sp, 0, 512, *tiles, "cpu")
        monkeypatch.setitem(varlen._FREE, (sp.key, 0, 512, *tiles, "meta"), (sides, src.to("meta"), ({}, {})))
        threads = torch.get_num_threads()
        with DeviceOps() as cold:
            varlen._free_tables(sp, 0, 512, lengths, *tiles, transpose, torch.device("meta"))  # templates made
        launches.clear()
        with DeviceOps() as ops:
            got = varlen._free_tables(sp, 0, 512, lengths, *tiles, transpose, torch.device("meta"))
        assert torch.get_num_threads() == threads, "the host part's single thread is given back"
        assert [x.device.type for x in got] == ["meta"] * 5
        assert [x.shape for x in got] == [x.shape for x in want]
        assert "copy_" in cold.writes and "copy_" not in ops.writes, (cold.writes, ops.writes)  # new templates
        assert sorted(ops.names) == ["_to_copy", "empty", "sort"], ops.names
        assert launches == list(kernels), launches


def test_n_free_tables_match_a_brute_force_assembly_bit_for_bit() -> None:
    """The device builder (templates kept across calls, a sort and three kernels) against the plain Python
    assembly of tests/reference_varlen.py from the same shared table: random splits with empty, length-1
    and block-edge documents, all empty, both orientations, five tile shapes, templates cold and warm."""
    rng = np.random.default_rng(11)
    shapes = [(16, 16), (32, 16), (16, 32), (64, 32), (16, 64)]
    for src in ("causal & (window(21) | stride(16))", "window(21) | stride(16)"):
        sp = compiled(src).spec
        assert sp.n_free[0]
        for case in range(14):
            sizes = [0, 1, 2, 15, 16, 17, 31, 32, 33, int(rng.integers(1, 300)), int(rng.integers(1, 300))]
            lengths = [int(x) for x in rng.choice(sizes, int(rng.integers(1, 10)))] if case else [0, 0]
            bm, bn = shapes[case % len(shapes)]
            top = max(1 << (max(lengths, default=1) - 1).bit_length(), bm, bn) if max(lengths) else max(bm, bn)
            shared = tables.block_tables(sp, top, bm, bn, "cpu", layout=False)
            for transpose in (False, True):
                got = varlen._varlen_tables(sp, cu_of(lengths), lengths, bm, bn, transpose=transpose)
                want = packed_tables(shared, lengths, bm, bn, transpose)
                assert all(x.dtype == torch.int32 and x.is_contiguous() for x in got)
                for name, x, y in zip(("tiles", "f_off", "f_idx", "p_off", "p_idx"), got, want, strict=True):
                    assert torch.equal(x, y), (src, lengths, bm, bn, transpose, name)


def test_per_document_classifier_reads_the_device_once_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Predicates that read N classify every document at its own N, in rounds of the quad tree (then of
    splitting PARTIAL tiles, `tiling.refine`): each round may read the device once (its outcomes' sizes,
    `partition`), never once per boolean mask. Counted by dispatch: boolean-mask indexing, nonzero, item,
    bincount; the rounds by spies on `classify` and the partitions where varlen.py and tiling.py call them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.masks = self.scalars = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = func.__name__.split(".")[0]
            if name == "index" and any(x is not None and x.dtype == torch.bool for x in args[1]):
                self.masks += 1
            self.scalars += name in ("nonzero", "_local_scalar_dense", "bincount")
            return func(*args, **(kwargs or {}))

    sp = compiled(VARLEN_PATTERNS["quarter"]).spec
    assert not sp.n_free[0]
    lengths = [1, 300, 0, 77, 16, 129, 1, 64]
    calls = {"classify": 0, "_partition": 0}

    def counted(x: str, real: Any) -> Any:
        def f(*a: Any, **kw: Any) -> Any:
            calls[x] += 1
            return real(*a, **kw)

        return f

    monkeypatch.setattr(varlen, "_partition", counted("_partition", varlen._partition))
    for x, key in zip(("classify", "partition"), calls, strict=True):
        monkeypatch.setattr(tiling, x, counted(key, getattr(tiling, x)))
    with Reads() as reads:
        built = varlen._varlen_tables(sp, cu_of(lengths), lengths, 16, 16)
    assert built[0].numel() == 2 * sum(-(-n // 16) for n in lengths)
    assert reads.masks == 0 and reads.scalars <= 2, (reads.masks, reads.scalars)
    assert 1 <= calls["_partition"] <= calls["classify"] + 1, calls


def test_row_templates_are_bounded_and_give_the_same_tables() -> None:
    """Per-document row templates (kept across calls, keyed by a document's block counts) stay under their
    row budget, and tables built with a warm, a cleared or an evicting template cache are identical."""
    sp = compiled("causal & (window(21) | stride(16))").spec
    rng = np.random.default_rng(7)
    splits = [rng.integers(0, 200, rng.integers(1, 9)).tolist() for _ in range(30)]
    splits = [s for s in splits if sum(s)]
    warm = [varlen._varlen_tables(sp, cu_of(s), s, 16, 32, transpose=t) for s in splits for t in (False, True)]
    mine = [entry for key, entry in varlen._FREE.items() if key[0] == sp.key]  # (the cache serves every pattern)
    assert mine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(varlen, "_TEMPLATE_ROWS", 24)
        for entry in mine:
            entry[2][0].clear()
            entry[2][1].clear()
        small = [varlen._varlen_tables(sp, cu_of(s), s, 16, 32, transpose=t) for s in splits for t in (False, True)]
        most = max(sum(-(-n // 16) for n in s) for s in splits)
        stores = [store for key, entry in varlen._FREE.items() if key[0] == sp.key for store in entry[2] if store]
        assert len(stores) >= 2
        for store in stores:
            rows = sum(k for _, k, _, _ in store["shape"].values())
            assert rows == store["rows"] <= min(24 + most, store["t"].shape[0])
    for a, b in zip(warm, small, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
