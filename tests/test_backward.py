"""Gradients of generated modules against float64 autograd through a dense masked softmax.

The Triton backward kernels run in the CPU interpreter (`TRITON_INTERPRET=1`, fp32 / fp16; bf16 only on
the GPU, see tests/test_gpu_backward.py); float64 takes the chunked PyTorch path. Output and gradient
buffers are poisoned (NaN) before each run. The reference shares nothing with the module but the mask:
softmax over allowed keys (masked logits at the most negative float64, exact zeros after exp), rows with
no allowed key multiplied by zero, so its gradients there are exactly zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from switches import spy_launches
from test_kernels import _layout_n, _library, _static_and_compilable

import patterndsl as P
from patterndsl import ir
from patterndsl.mask import dense_mask

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

SMALL = dict(block_m=16, block_n=16, bwd_config=(16, 16, 16, 16, 4, 1))
STREAM_SRC = "causal & (window(20) | sink(4))"
STREAM = f"pattern p = {STREAM_SRC}\n"


def reference_grads(q: Any, k: Any, v: Any, mask: np.ndarray, scale: float, do: Any, dlse: Any = None) -> tuple[Any, ...]:
    """(out, lse, dq, dk, dv) in float64; heads share the mask ([N, N]) or not ([H, N, N])."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    m = torch.from_numpy(np.ascontiguousarray(mask))
    s = (qd @ kd.repeat_interleave(group, 1).transpose(-1, -2) * scale).masked_fill(~m, torch.finfo(torch.float64).min)
    some = m.any(-1)
    p = torch.softmax(s, -1) * some[..., None]
    out = p @ vd.repeat_interleave(group, 1)
    lse = torch.logsumexp(s, -1)
    loss = (out * do.double()).sum()
    if dlse is not None:
        loss = loss + torch.where(some, lse * dlse.double(), 0.0).sum()
    grads = torch.autograd.grad(loss, (qd, kd, vd))
    return (out.detach(), torch.where(some, lse, float("-inf")).detach(), *grads)


def poison(module: Any) -> Any:
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    return module


TOL = {torch.float64: 1e-6,  # the log-sum-exp is float32 by contract (p recomputed from it)
       torch.float32: 1e-4, torch.float16: 1e-2}


def check_grads(module: Any, mask: np.ndarray, b: int = 1, h: int = 2, hkv: int | None = None, d: int = 16,
                dtype: Any = torch.float32, scale: float | None = None, with_lse: bool = False,
                seed: int = 0, layer: int | None = None) -> tuple[Any, ...]:  # fmt: skip
    n = mask.shape[-1]
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    q = torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype).requires_grad_()
    do = torch.randn(b, h, n, d, generator=g).to(dtype)
    dlse = torch.randn(b, h, n, generator=g) if with_lse else None
    out, lse = poison(module).attention_lse(q, k, v, scale=scale, layer=layer)
    loss = (out.float() * do.float()).sum()
    if with_lse:
        loss = loss + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    want = reference_grads(q, k, v, mask, d**-0.5 if scale is None else scale, do, dlse)
    for name, x, ref in zip(("dq", "dk", "dv"), got, want[2:], strict=True):
        assert x.dtype == dtype and x.shape == ref.shape, name
        assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or 0 * inf)"
        err = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < TOL[dtype], f"|{name} - ref| / |ref| = {err}"
    return got


@pytest.mark.parametrize("path, name", _library())
def test_library_pattern_gradients(path: Path, name: str) -> None:
    body = P.load(path).get(name).body  # type: ignore[union-attr]
    if _static_and_compilable(body) is not None:
        pytest.skip("dynamic selectors: their gradients are checked in tests/test_selectors.py")
    heads = body.count if isinstance(body, ir.Heads) else 1
    n = _layout_n(body) or (32 if heads > 4 else 45)
    if n > 150 or heads > 16:
        pytest.skip(f"N = {n}, {heads} heads: too large for the interpreter (tests/test_gpu_backward.py)")
    module = P.compile(path, name, **SMALL)
    check_grads(module, dense_mask(body, n, heads if isinstance(body, ir.Heads) else None), h=heads)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dtypes_and_ragged_n(dtype: str) -> None:
    # N = 45: the last query and key blocks are ragged in both tile shapes (16 and 32)
    module = P.compile(STREAM, block_m=16, block_n=16, bwd_config=(16, 32, 32, 16, 4, 1))
    check_grads(module, P.dense_mask(STREAM_SRC, 45), dtype=getattr(torch, dtype), d=32)


@pytest.mark.parametrize("tma", [True, False])
def test_tma_and_pointer_loads_give_the_reference_gradients(tma: bool) -> None:
    # descriptors zero-fill rows past N = 45 and columns past D = 24 (padded to 32); eight-number bwd_config:
    # separate warps/stages for dK/dV and dQ
    module = P.compile(STREAM, block_m=16, block_n=16, bwd_config=(16, 32, 32, 16, 4, 1, 2, 2))
    module.BWD_TMA, module.TMA_MODE = tma, 0  # the forward without descriptors: those made are the backward's
    made: list[Any] = []
    real = module._descriptor
    module._descriptor = lambda *args: made.append(real(*args)) or made[-1]
    check_grads(module, P.dense_mask(STREAM_SRC, 45), b=2, h=4, hkv=2, d=24)
    assert len(made) == (4 if tma else 0)


@pytest.mark.parametrize("fuse_pre", [True, False], ids=["fused delta", "pre-pass"])
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("case", ["ragged", "mixed heads", "empty rows", "layout"])
def test_backward_delta_paths_give_the_reference_gradients(fuse_pre: bool, tma: bool, case: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """BWD_FUSE_PRE (the default: the dQ kernel computes delta and lse2 for the dK/dV kernel, no pre-pass
    launch) and the pre-pass it replaces, on ragged N with GQA and an lse gradient, a group mixing predicates
    (accumulated launches), rows without keys and a token layout."""
    kw: dict[str, Any] = dict(b=2, h=4, hkv=2, with_lse=True)
    if case == "mixed heads":
        text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:4 => sink(7) | window(0)\n}\n"
        module, mask = P.compile(text, **SMALL), dense_mask(P.loads(text).patterns[0].body, 37, 4)
        kw = dict(h=4, hkv=2, with_lse=True)
    elif case == "layout":
        text = "layout g = grid(5, 7)\npattern p = neighborhood(g, kernel=3)\n"
        module, mask = P.compile(text, **SMALL), dense_mask(P.loads(text).patterns[0].body, 35)
    else:
        src = STREAM_SRC if case == "ragged" else "where(q >= 21) & causal & window(9)"
        module, mask = P.compile(f"pattern p = {src}\n", **SMALL), P.dense_mask(src, 45)
    monkeypatch.setattr(module, "BWD_TMA", tma)  # modules are cached per source: every change is undone
    monkeypatch.setattr(module, "BWD_FUSE_PRE", fuse_pre)
    launched: list[tuple[str, Any]] = []
    for name in ("_attn_bwd_pre", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        spy_launches(monkeypatch, module, name, launched, lambda kw, name=name: (name, kw.get("PRE")))
    check_grads(module, mask, d=24, **kw)
    assert any(n == "_attn_bwd_pre" for n, _ in launched) != fuse_pre
    for name, pre in launched:
        if name != "_attn_bwd_pre":
            assert bool(pre) == (fuse_pre and name == "_attn_bwd_dq")


@pytest.mark.parametrize("h, hkv", [(4, 2), (4, 1)])
def test_gqa_and_mqa_gradients_sum_over_the_group(h: int, hkv: int) -> None:
    check_grads(P.compile(STREAM, **SMALL), P.dense_mask(STREAM_SRC, 40), b=2, h=h, hkv=hkv)


def test_heads_pattern_whose_group_mixes_predicates() -> None:
    text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:4 => sink(7) | window(0)\n}\n"
    body = P.loads(text).patterns[0].body
    # kv head 0 serves heads 0 (first predicate) and 1 (second): two launches add into dK / dV
    check_grads(P.compile(text, **SMALL), dense_mask(body, 37, 4), h=4, hkv=2)


def test_empty_rows_get_zero_gradients_and_no_nan() -> None:
    src = "where(q >= 21) & causal & window(9)"
    module = P.compile(f"pattern p = {src}\n", **SMALL)
    dq, dk, dv = check_grads(module, P.dense_mask(src, 50), scale=0.3)
    assert torch.equal(dq[:, :, :21], torch.zeros_like(dq[:, :, :21]))
    assert dk.abs().sum() > 0  # keys before 21 still get gradients from rows >= 21


def test_log_sum_exp_gradient_flows() -> None:
    check_grads(P.compile(STREAM, **SMALL), P.dense_mask(STREAM_SRC, 33), with_lse=True)


def test_cpu_path_gradients_float64_and_gradcheck() -> None:
    module = P.compile(STREAM, **SMALL)
    module._warned_cpu.append(True)
    check_grads(module, P.dense_mask(STREAM_SRC, 60), h=4, hkv=2, dtype=torch.float64, with_lse=True)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: module.attention(a, b, c), (q, k, v))


def test_torch_compile_fullgraph_trains_through_the_custom_op() -> None:
    module = P.compile(STREAM, **SMALL)
    module._warned_cpu.append(True)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48, dtype=torch.float64)

        def forward(self, x: Any) -> Any:
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            return module.attention(q, k, v).transpose(1, 2).reshape(x.shape).square().sum()

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    eager = torch.autograd.grad(model(x), model.qkv.weight)[0]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    got = torch.autograd.grad(compiled(x), model.qkv.weight)[0]
    assert (got - eager).abs().max().item() < 1e-12


def test_eager_autograd_skips_the_custom_op_and_matches_it() -> None:
    """Outside torch.compile the module runs the custom op's functions without the dispatcher (its checks
    cost ~45 us a call); the gradients are the custom op's, also when only the log-sum-exp is used (dO is
    None) or only the output (dlse is None)."""
    module = P.compile(STREAM, **SMALL)
    module._warned_cpu.append(True)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    via_op = [torch.autograd.grad(module._attention_forward(q, k, v, 0.3, -1)[i].square().sum(), (q, k, v))
              for i in (0, 1)]  # fmt: skip
    from torch.profiler import profile

    with profile() as prof:  # every dispatch through the module's ops is an event named after its namespace
        for i in (0, 1):
            eager = torch.autograd.grad(module.attention_lse(q, k, v, scale=0.3)[i].square().sum(), (q, k, v))
            for a, b in zip(eager, via_op[i], strict=True):
                assert (a - b).abs().max().item() < 1e-12
        module._attention_forward(q, k, v, 0.3, -1)  # ... as this call shows
    ops = [e.name for e in prof.events() if module.OP_NAMESPACE in e.name]
    assert ops and all("forward" in name for name in ops) and len(ops) == len(set(ops))


def test_no_grad_and_grad_paths_agree() -> None:
    module = P.compile(STREAM, **SMALL)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with torch.no_grad():
        a = module.attention(q, k, v)
    b = module.attention(q.requires_grad_(), k, v)
    assert b.requires_grad and torch.equal(a, b.detach())


def test_transposed_tables_list_the_same_tiles() -> None:
    from patterndsl.blocks import block_tables

    module = P.compile("pattern p = causal & (window(30) | sink(4))\n")
    for n in (1, 77, 203):
        ft_off, ft_idx, pt_off, pt_idx = module.block_tables_t(n, 32, 16, torch.device("cpu"))
        f_off, f_idx, p_off, p_idx = module.block_tables(n, 32, 16, torch.device("cpu"))
        ref = block_tables(P.pattern("causal & (window(30) | sink(4))"), n, 32, 16)

        def tiles(off: Any, idx: Any, swap: bool = False) -> set[tuple[int, int]]:
            out = {(r, int(c)) for r in range(off.numel() - 1) for c in idx[int(off[r]) : int(off[r + 1])]}
            return {(c, r) for r, c in out} if swap else out

        assert tiles(ft_off, ft_idx, swap=True) == tiles(f_off, f_idx)
        assert tiles(pt_off, pt_idx, swap=True) == tiles(p_off, p_idx)
        ref_t = tiles(ref.full_t.offsets, ref.full_t.indices, True) | tiles(ref.partial_t.offsets, ref.partial_t.indices, True)
        assert tiles(ft_off, ft_idx, True) | tiles(pt_off, pt_idx, True) == ref_t


def test_op_namespace_is_per_module_and_bad_bwd_config_is_refused() -> None:
    a = P.compile(STREAM, **SMALL)
    b = P.compile(STREAM, block_m=16, block_n=16, bwd_config=(16, 32, 32, 16, 4, 1))
    assert a.OP_NAMESPACE != b.OP_NAMESPACE and a.OP_NAMESPACE.startswith("patterndsl_p_")
    with pytest.raises(ValueError, match="powers of two"):
        P.compile(STREAM, bwd_config=(24, 16, 16, 16, 4, 1))
    with pytest.raises(ValueError, match="six positive integers"):
        P.compile(STREAM, bwd_config=(16, 16, 16, 16))
    with pytest.raises(ValueError, match="warp counts must be powers of two"):
        P.compile(STREAM, bwd_config=(16, 16, 16, 16, 4, 1, 3, 1))
    assert P.compile(STREAM, bwd_config=(16, 32, 32, 16, 4, 1))._bwd_config(16) == (16, 32, 32, 16, 4, 1, 4, 1)


def test_model_module_gradients_per_layer() -> None:
    from test_kernels import MODEL

    model = P.loads(MODEL).get("m")
    module = P.compile(MODEL, **SMALL)
    for layer in (1, 3):  # one predicate for all heads; a heads { } layer whose kv group mixes two
        body = model.schedule[layer]  # type: ignore[union-attr]
        mask = dense_mask(body, 29, 2 if isinstance(body, ir.Heads) else None)
        check_grads(module, mask, h=2, hkv=1, layer=layer)



def test_custom_op_passes_opcheck() -> None:
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch (dynamic)."""
    module = P.compile(STREAM, **SMALL)
    module._warned_cpu.append(True)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    result = torch.library.opcheck(module._attention_forward.default, (q, k, v, 0.3, -1))
    assert set(result.values()) == {"SUCCESS"}, result


def test_broadcast_output_gradient_takes_pointer_loads() -> None:
    # an expanded dO (strides 0) is not given to a TMA descriptor; the gradients are the same
    module = P.compile(STREAM, **SMALL)
    assert module._tma_mode((torch.randn(1, 2, 40, 16),), 16, 1) == 1
    assert module._tma_mode((torch.randn(16).expand(1, 2, 40, 16),), 16, 1) == 0
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    do = torch.randn(16).expand(1, 2, 40, 16)
    got = torch.autograd.grad(poison(module).attention(q, k, v), (q, k, v), do)
    want = reference_grads(q, k, v, P.dense_mask(STREAM_SRC, 40), 16**-0.5, do)[2:]
    for name, x, ref in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert ((x.double() - ref).norm() / ref.norm()).item() < 1e-4, name
