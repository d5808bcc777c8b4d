"""Gradients of generated modules against float64 autograd through a dense masked softmax.

The Triton backward kernels run in the CPU interpreter (`TRITON_INTERPRET=1`, fp32 / fp16; bf16 only on
the GPU, see tests/gpu/test_gpu_backward.py); float64 takes the chunked PyTorch path. Output and gradient
buffers are poisoned (NaN) before each run: a no-grad forward into NaN-filled `out=` / `lse=` and
`attn.backward(...)` into NaN-filled `dq=` / `dk=` / `dv=`; autograd's path (the custom op) must give
exactly those gradients, checked on a representative subset. The reference shares nothing with the kernels but the mask:
softmax over allowed keys (masked logits at the most negative float64, exact zeros after exp), rows with
no allowed key multiplied by zero, so its gradients there are exactly zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import (
    MODEL,
    check_grads,
    has_selector,
    layout_n,
    library_cases,
    poisoned,
    poisoned_grads,
    reference_grads,
    spy_launches,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as P
from patterndsl import ir
from patterndsl.mask import dense_mask

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))
STREAM_SRC = "causal & (window(20) | sink(4))"
STREAM = f"pattern p = {STREAM_SRC}\n"


# sparse_transformer:strided_heads takes about 20 s in the interpreter, longnet_heads and moa about 2 s (the
# other library patterns a second or less): slow tier; the other heads patterns (fixed_heads, ...) keep heads in
# the fast tier, and examples/model:moa is patterns/moa:moa
@pytest.mark.parametrize("path, name", library_cases(slow=("patterns/sparse_transformer:strided_heads",
                                                           "patterns/longnet:longnet_heads", "examples/model:moa")))
def test_library_pattern_gradients(path: Path, name: str) -> None:
    body = P.load(path).get(name).body  # type: ignore[union-attr]
    if has_selector(body):
        pytest.skip("dynamic selectors: their gradients are checked in tests/runtime/test_selectors.py")
    heads = body.count if isinstance(body, ir.Heads) else 1
    n = layout_n(body) or (32 if heads > 4 else 45)
    if n > 150 or heads > 16:
        pytest.skip(f"N = {n}, {heads} heads: too large for the interpreter (tests/gpu/test_gpu_backward.py)")
    attn = P.compile(path, name, **SMALL)
    check_grads(attn, dense_mask(body, n, heads if isinstance(body, ir.Heads) else None), h=heads)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dtypes_and_ragged_n(dtype: str) -> None:
    # N = 45: the last query and key blocks are ragged in both tile shapes (16 and 32)
    attn = P.compile(STREAM, block_m=16, block_n=16, bwd_config=(16, 32, 32, 16, 4, 1))
    check_grads(attn, P.dense_mask(STREAM_SRC, 45), dtype=getattr(torch, dtype), d=32, autograd=True)


@pytest.mark.parametrize("tma", [True, False])
def test_tma_and_pointer_loads_give_the_reference_gradients(tma: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # descriptors zero-fill rows past N = 45 and columns past D = 24 (padded to 32); eight-number bwd_config:
    # separate warps/stages for dK/dV and dQ
    from patterndsl.runtime import backward

    attn = P.compile(STREAM, block_m=16, block_n=16, bwd_config=(16, 32, 32, 16, 4, 1, 2, 2))
    made: list[Any] = []
    real = backward._descriptor
    monkeypatch.setattr(backward, "_descriptor", lambda *args: made.append(real(*args)) or made[-1])
    with attn.options(bwd_tma=tma, tma_mode=0):  # the forward without descriptors: those made are the backward's
        check_grads(attn, P.dense_mask(STREAM_SRC, 45), b=2, h=4, hkv=2, d=24)
    assert len(made) == (4 if tma else 0)  # 4 a backward: Q and dO for dK/dV, K and V for dQ


@pytest.mark.parametrize("fuse_pre", [True, False], ids=["fused delta", "pre-pass"])
@pytest.mark.parametrize("tma", [True, pytest.param(False, marks=pytest.mark.slow)])  # pointers: test_tma_and_pointer_loads
@pytest.mark.parametrize("case", ["ragged", "mixed heads", "empty rows", "layout"])
def test_backward_delta_paths_give_the_reference_gradients(fuse_pre: bool, tma: bool, case: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """bwd_fuse_pre (the default: the dQ kernel computes delta and lse2 for the dK/dV kernel, no pre-pass
    launch) and the pre-pass it replaces, on ragged N with GQA and an lse gradient, a group mixing predicates
    (accumulated launches), rows without keys and a token layout."""
    kw: dict[str, Any] = dict(b=2, h=4, hkv=2, with_lse=True)
    if case == "mixed heads":
        text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:4 => sink(7) | window(0)\n}\n"
        attn, mask = P.compile(text, **SMALL), dense_mask(P.loads(text).patterns[0].body, 37, 4)
        kw = dict(h=4, hkv=2, with_lse=True)
    elif case == "layout":
        text = "layout g = grid(5, 7)\npattern p = neighborhood(g, kernel=3)\n"
        attn, mask = P.compile(text, **SMALL), dense_mask(P.loads(text).patterns[0].body, 35)
    else:
        src = STREAM_SRC if case == "ragged" else "where(q >= 21) & causal & window(9)"
        attn, mask = P.compile(f"pattern p = {src}\n", **SMALL), P.dense_mask(src, 45)
    from patterndsl.runtime import backward

    launched: list[tuple[str, Any]] = []
    for name in ("_attn_bwd_pre", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        spy_launches(monkeypatch, backward, name, launched, lambda kw, name=name: (name, kw.get("PRE")))
    with attn.options(bwd_tma=tma, bwd_fuse_pre=fuse_pre):
        check_grads(attn, mask, d=24, **kw)
    assert {n for n, _ in launched} >= {"_attn_bwd_dq", "_attn_bwd_dkdv"}
    assert any(n == "_attn_bwd_pre" for n, _ in launched) != fuse_pre
    for name, pre in launched:
        if name != "_attn_bwd_pre":
            assert bool(pre) == (fuse_pre and name == "_attn_bwd_dq")


@pytest.mark.parametrize("h, hkv", [(4, 2), pytest.param(4, 1, marks=pytest.mark.slow)])
def test_gqa_and_mqa_gradients_sum_over_the_group(h: int, hkv: int) -> None:
    check_grads(P.compile(STREAM, **SMALL), P.dense_mask(STREAM_SRC, 40), b=2, h=h, hkv=hkv, autograd=True)


def test_heads_pattern_whose_group_mixes_predicates() -> None:
    text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:4 => sink(7) | window(0)\n}\n"
    body = P.loads(text).patterns[0].body
    # kv head 0 serves heads 0 (first predicate) and 1 (second): two launches add into dK / dV
    check_grads(P.compile(text, **SMALL), dense_mask(body, 37, 4), h=4, hkv=2, autograd=True)


def test_empty_rows_get_zero_gradients_and_no_nan() -> None:
    src = "where(q >= 21) & causal & window(9)"
    attn = P.compile(f"pattern p = {src}\n", **SMALL)
    dq, dk, dv = check_grads(attn, P.dense_mask(src, 50), scale=0.3)
    assert torch.equal(dq[:, :, :21], torch.zeros_like(dq[:, :, :21]))
    assert dk.abs().sum() > 0  # keys before 21 still get gradients from rows >= 21


def test_log_sum_exp_gradient_flows() -> None:
    check_grads(P.compile(STREAM, **SMALL), P.dense_mask(STREAM_SRC, 33), with_lse=True, autograd=True)


@pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")
def test_cpu_path_gradients_float64_and_gradcheck() -> None:
    attn = P.compile(STREAM, **SMALL)
    check_grads(attn, P.dense_mask(STREAM_SRC, 60), h=4, hkv=2, dtype=torch.float64, with_lse=True, autograd=True)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: attn.attention(a, b, c), (q, k, v))


@pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")
def test_torch_compile_fullgraph_trains_through_the_custom_op() -> None:
    attn = P.compile(STREAM, **SMALL)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48, dtype=torch.float64)

        def forward(self, x: Any) -> Any:
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            return attn.attention(q, k, v).transpose(1, 2).reshape(x.shape).square().sum()

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    eager = torch.autograd.grad(model(x), model.qkv.weight)[0]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    got = torch.autograd.grad(compiled(x), model.qkv.weight)[0]
    assert (got - eager).abs().max().item() < 1e-12


@pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")
def test_eager_autograd_skips_the_custom_op_and_matches_it() -> None:
    """Outside torch.compile a call runs the custom op's functions without the dispatcher (its checks
    cost ~45 us a call); the gradients are the custom op's, also when only the log-sum-exp is used (dO is
    None) or only the output (dlse is None)."""
    attn = P.compile(STREAM, **SMALL)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    from patterndsl.runtime import autograd

    op = getattr(torch.ops, autograd.NAMESPACE).forward  # one op for every pattern: the pattern its last argument
    via_op = [torch.autograd.grad(op(q, k, v, 0.3, -1, attn.spec.key)[i].square().sum(), (q, k, v)) for i in (0, 1)]
    from torch.profiler import profile

    with profile() as prof:  # every dispatch through the runtime's ops is an event named after their namespace
        for i in (0, 1):
            eager = torch.autograd.grad(attn.attention_lse(q, k, v, scale=0.3)[i].square().sum(), (q, k, v))
            for a, b in zip(eager, via_op[i], strict=True):
                assert (a - b).abs().max().item() < 1e-12
        op(q, k, v, 0.3, -1, attn.spec.key)  # ... as this call shows
    ops = [e.name for e in prof.events() if f"{autograd.NAMESPACE}::" in e.name]
    assert ops and all("forward" in name for name in ops) and len(ops) == len(set(ops))


def test_no_grad_and_grad_paths_agree() -> None:
    attn = P.compile(STREAM, **SMALL)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with torch.no_grad():
        a = attn.attention(q, k, v)
    b = attn.attention(q.requires_grad_(), k, v)
    assert b.requires_grad and torch.equal(a, b.detach())


def test_transposed_tables_list_the_same_tiles() -> None:
    from patterndsl.blocks import block_tables
    from patterndsl.runtime import tables as T

    spec = P.compile("pattern p = causal & (window(30) | sink(4))\n").spec
    for n in (1, 77, 203):
        ft_off, ft_idx, pt_off, pt_idx = T.block_tables_t(spec, n, 32, 16, torch.device("cpu"))
        f_off, f_idx, p_off, p_idx = T.block_tables(spec, n, 32, 16, torch.device("cpu"))
        ref = block_tables(P.pattern("causal & (window(30) | sink(4))"), n, 32, 16)

        def tiles(off: Any, idx: Any, swap: bool = False) -> set[tuple[int, int]]:
            out = {(r, int(c)) for r in range(off.numel() - 1) for c in idx[int(off[r]) : int(off[r + 1])]}
            return {(c, r) for r, c in out} if swap else out

        assert tiles(ft_off, ft_idx, swap=True) == tiles(f_off, f_idx)
        assert tiles(pt_off, pt_idx, swap=True) == tiles(p_off, p_idx)
        ref_t = tiles(ref.full_t.offsets, ref.full_t.indices, True) | tiles(ref.partial_t.offsets, ref.partial_t.indices, True)
        assert tiles(ft_off, ft_idx, True) | tiles(pt_off, pt_idx, True) == ref_t


def test_ops_tell_patterns_apart_and_bad_bwd_config_is_refused() -> None:
    """The custom ops are shared by every pattern: the pattern's key, their last argument, differs between two
    compilations of one source with different tiles, and each key finds its own spec."""
    from patterndsl.runtime import autograd

    a = P.compile(STREAM, **SMALL)
    b = P.compile(STREAM, block_m=16, block_n=16, bwd_config=(16, 32, 32, 16, 4, 1))
    assert a.spec.key != b.spec.key and a.spec.key.startswith("p-")
    assert autograd._spec(a.spec.key) is a.spec and autograd._spec(b.spec.key) is b.spec
    with pytest.raises(ValueError, match="powers of two"):
        P.compile(STREAM, bwd_config=(24, 16, 16, 16, 4, 1))
    with pytest.raises(ValueError, match="six positive integers"):
        P.compile(STREAM, bwd_config=(16, 16, 16, 16))
    with pytest.raises(ValueError, match="warp counts must be powers of two"):
        P.compile(STREAM, bwd_config=(16, 16, 16, 16, 4, 1, 3, 1))
    from patterndsl.runtime.backward import _bwd_config

    assert _bwd_config(P.compile(STREAM, bwd_config=(16, 32, 32, 16, 4, 1)).spec, 16) == (16, 32, 32, 16, 4, 1, 4, 1)


def test_model_module_gradients_per_layer() -> None:
    model = P.loads(MODEL).get("m")
    attn = P.compile(MODEL, **SMALL)
    for layer in (1, 3):  # one predicate for all heads; a heads { } layer whose kv group mixes two
        body = model.schedule[layer]  # type: ignore[union-attr]
        mask = dense_mask(body, 29, 2 if isinstance(body, ir.Heads) else None)
        check_grads(attn, mask, h=2, hkv=1, layer=layer, autograd=True)



@pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")
def test_custom_op_passes_opcheck() -> None:
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch (dynamic)."""
    attn = P.compile(STREAM, **SMALL)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    from patterndsl.runtime import autograd

    op = getattr(torch.ops, autograd.NAMESPACE).forward
    result = torch.library.opcheck(op.default, (q, k, v, 0.3, -1, attn.spec.key))
    assert set(result.values()) == {"SUCCESS"}, result


def test_broadcast_output_gradient_takes_pointer_loads() -> None:
    # an expanded dO (strides 0) is not given to a TMA descriptor; the gradients are the same
    from patterndsl.runtime.common import _tma_mode

    attn = P.compile(STREAM, **SMALL)
    assert _tma_mode((torch.randn(1, 2, 40, 16),), 16, 1) == 1
    assert _tma_mode((torch.randn(16).expand(1, 2, 40, 16),), 16, 1) == 0
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    do = torch.randn(16).expand(1, 2, 40, 16)
    got = torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do)
    out, lse = poisoned(attn, q.detach(), k.detach(), v.detach())
    again = poisoned_grads(attn, do, q, k, v, out, lse)
    want = reference_grads(q, k, v, P.dense_mask(STREAM_SRC, 40), 16**-0.5, do)[2:]
    for name, x, y, ref in zip(("dq", "dk", "dv"), got, again, want, strict=True):
        assert ((x.double() - ref).norm() / ref.norm()).item() < 1e-4, name
        assert not torch.isnan(y).any() and ((y.double() - ref).norm() / ref.norm()).item() < 1e-4, name


@pytest.mark.parametrize("case", ["sinks gqa", "mixed heads", "layout"])
def test_split_dkdv_rows_give_the_reference_gradients(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bwd_split=3` cuts every key block's dK/dV work over 3 tile iterations (its query blocks times the
    group's query heads) into pieces that several programs add into a float32 workspace, which the merge
    kernel writes out: a sink's blocks with four query heads per KV head, a group mixing predicates (the
    merge adds each launch's share) and a token layout (the merge writes its physical rows' tokens)."""
    from patterndsl.runtime import backward

    merged: list[Any] = []
    spy_launches(monkeypatch, backward, "_attn_bwd_dkdv_merge", merged, lambda kw: kw["ACCUM"])
    if case == "mixed heads":
        text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:4 => sink(7) | window(0)\n}\n"
        attn, mask, kw = P.compile(text, **SMALL), dense_mask(P.loads(text).patterns[0].body, 37, 4), dict(h=4, hkv=2)
    elif case == "layout":
        text = "layout g = grid(5, 7)\npattern p = neighborhood(g, kernel=3)\n"
        attn, mask, kw = P.compile(text, **SMALL), dense_mask(P.loads(text).patterns[0].body, 35), dict(h=4, hkv=2)
    else:
        attn, mask, kw = P.compile(STREAM, **SMALL), P.dense_mask(STREAM_SRC, 61), dict(b=2, h=4, hkv=1)
    with attn.options(bwd_split=3):
        check_grads(attn, mask, with_lse=True, **kw)
    assert merged and all(merged) == (case == "mixed heads")


def test_split_plan_bounds_the_heaviest_program() -> None:
    """Automatic splitting at NSA's shape (N = 65536, 16 query heads per KV head, 64 x 64 tiles): the sink's key
    block, read by all 1024 query blocks of 16 heads (16384 tile iterations, the mean row 48), is cut into
    pieces of four times the mean or, past 64 pieces, a 64th of the row; causal attention (the first key
    block twice the mean) and `bwd_split=0` split nothing."""
    from patterndsl.runtime.backward import _static_split

    cpu = torch.device("cpu")
    spec = P.compile("pattern p = causal & (window(63) | sink(64))\n").spec
    split = _static_split(spec, 0, 65536, 64, 64, 1024, cpu, 1, (16,) * 4)
    assert split is not None and split.rows.numel() == 4
    slots = split.slots.view(4, 1024)
    assert slots[:, 0].tolist() == [0, 1, 2, 3] and (slots[:, 1:] < 0).all()
    assert split.rows.tolist() == [0, 1024, 2048, 3072]  # each slot's row: the launch has no idle pieces
    assert (split.chunk, split.chunks) == (4 * 48, 64)  # 16384 / 64 = 256 tile iterations in the heaviest program
    assert _static_split(P.compile("pattern p = causal\n").spec, 0, 65536, 64, 64, 1024, cpu, 1, (16,) * 4) is None
    with P.compile("pattern p = causal & (window(63) | sink(64))\n").options(bwd_split=0):
        assert _static_split(spec, 0, 65536, 64, 64, 1024, cpu, 1, (16,) * 4) is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=40), st.integers(1, 12), st.integers(1, 50))
def test_slot_rows_invert_the_slots(work: list[int], chunk: int, cap: int) -> None:
    """Each workspace slot names the row that holds it (the split launch's pieces find their rows so), and
    the slots no row took name none."""
    from patterndsl.runtime.backward import _slot_rows, _slots

    slots = _slots(torch.tensor(work), chunk, cap)
    rows = _slot_rows(slots, cap)
    assert rows.shape == (cap,)
    for r, s in enumerate(slots.tolist()):
        if s >= 0:
            assert rows[s] == r
    assert int((rows >= 0).sum()) == int((slots >= 0).sum())


def test_a_dynamic_split_without_room_for_a_heavy_row_is_none() -> None:
    """Tables whose entries cannot give a row more than `chunk` tile iterations split nothing: the launch
    takes no workspace and no merge (rather than a split whose every piece exits)."""
    from patterndsl.runtime.backward import _dynamic_split

    nqt = nkt = 8
    f_off, p_off = torch.zeros(nkt + 1, dtype=torch.int32), torch.tensor([0, 3, *[3] * (nkt - 1)], dtype=torch.int32)
    tables = (f_off, torch.zeros(0, dtype=torch.int32), p_off, torch.arange(3, dtype=torch.int32))
    args = (1, 1, nqt, nkt, torch.tensor([0], dtype=torch.int32), (1,), torch.tensor([0]))
    with P.compile("pattern p = causal\n").options(bwd_split=3):
        assert _dynamic_split(tables, *args) is None  # 3 entries: no row above 3 tile iterations
    with P.compile("pattern p = causal\n").options(bwd_split=2):
        split = _dynamic_split(tables, *args)
        assert split is not None and split.rows.tolist() == [0]
