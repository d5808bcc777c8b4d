"""The typed Python API: `compile` -> `Attention`, `BlockMask`, options as a context, outputs passed in,
`analyze` -> `Analysis`, `nn.PatternAttention`. CPU path (float64), no interpreter needed."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import patterndsl as P
from patterndsl.runtime.options import Options, current_options, options

torch = pytest.importorskip("torch")
warnings.filterwarnings("ignore", message=".*CPU tensors take a PyTorch reference path.*")

SRC = "pattern w = causal & (window(5) | sink(2))\n"


def _reference(q, k, v, mask):  # type: ignore[no-untyped-def]
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def _qkv(n: int = 33, h: int = 2, d: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


def test_compile_returns_an_attention_that_matches_the_reference() -> None:
    attn = P.compile(SRC)
    assert isinstance(attn, P.runtime.Attention) and attn.name == "w" and "window(5)" in attn.source
    q, k, v = _qkv()
    mask = torch.from_numpy(np.asarray(P.dense_mask("causal & (window(5) | sink(2))", 33)))
    out, lse = attn(q, k, v, return_lse=True)
    want, want_lse = _reference(q, k, v, mask)
    assert torch.allclose(out, want) and torch.allclose(lse.double(), want_lse, atol=1e-6)
    assert torch.equal(attn(q, k, v), out) and torch.equal(attn.attention_lse(q, k, v)[0], out)


def test_results_are_written_into_the_tensors_passed_in() -> None:
    attn = P.compile(SRC)
    q, k, v = _qkv()
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, 33), float("nan"), dtype=torch.float32)
    got, got_lse = attn(q, k, v, out=out, lse=lse, return_lse=True)
    assert got is out and got_lse is lse and not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out, attn(q, k, v))
    with pytest.raises(ValueError, match="out must be"):
        attn(q, k, v, out=torch.empty(1, 2, 32, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="no gradients"):
        attn(q.requires_grad_(), k, v, out=torch.empty_like(q))


def test_backward_writes_gradients_into_the_tensors_passed_in() -> None:
    attn = P.compile(SRC)
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, lse = attn(q, k, v, return_lse=True)
    do = torch.randn_like(out)
    (out * do).sum().backward()
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    got = attn.backward(do, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                        dq=grads[0], dk=grads[1], dv=grads[2])  # fmt: skip
    for g, want, mine in zip(got, (q.grad, k.grad, v.grad), grads, strict=True):
        assert g is mine and torch.allclose(g, want)


def test_options_hold_inside_the_block_only_and_unknown_names_are_refused() -> None:
    attn = P.compile(SRC)
    assert current_options() == Options()
    with attn.options(one_loop=True, tiles=(64, 32)):
        assert current_options().one_loop and current_options().tiles == (64, 32)
        with options(maxnreg=128):
            assert current_options().maxnreg == 128 and current_options().one_loop
        assert current_options().maxnreg == 0
    assert current_options() == Options()
    with pytest.raises(TypeError, match="unknown option"), attn.options(tile=(1, 2)):
        pass


@pytest.mark.parametrize("block_size", [(16, 16), (32, 16)])
def test_block_mask_lists_every_allowed_tile_and_is_reusable(block_size: tuple[int, int]) -> None:
    attn = P.compile(SRC)
    n = 70
    bm = attn.block_mask(n, block_size=block_size)
    dense = bm.to_dense()
    mask = np.asarray(P.dense_mask("causal & (window(5) | sink(2))", n))
    bq, bk = block_size
    for r in range(dense.shape[0]):
        for c in range(dense.shape[1]):
            tile = mask[r * bq:(r + 1) * bq, c * bk:(c + 1) * bk]
            assert (dense[r, c] > 0) == tile.any()
            if dense[r, c] == 2:
                assert tile.all()
    assert 0 < bm.sparsity() < 1
    q, k, v = _qkv(n)
    assert torch.equal(attn(q, k, v, block_mask=bm), attn(q, k, v))
    with pytest.raises(ValueError, match="built for N = 70"):
        attn(*_qkv(71), block_mask=bm)


def test_analyze_returns_the_figures_of_patc_analyze(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from patterndsl.cli import main

    path = tmp_path / "w.pat"
    path.write_text(SRC, encoding="utf-8")
    result = P.analyze(path, N=4096, heads=4)
    assert isinstance(result, P.Analysis) and result.name == "w" and result.n == 4096
    assert json.loads(result.to_json()) == json.loads(json.dumps(dict(result.figures)))
    from_pattern = P.analyze(P.pattern("causal & (window(5) | sink(2))"), N=4096, heads=4)
    assert from_pattern.figures["N"] == 4096 and from_pattern["causal"] == result["causal"]
    with pytest.raises(ValueError, match="N must be"):
        P.analyze(path, N=0)
    assert main(["analyze", str(path), "-N", "4096", "--heads", "4", "--json"]) == 0


def test_pattern_attention_module_trains() -> None:
    from patterndsl.nn import PatternAttention

    torch.manual_seed(0)
    layer = PatternAttention(SRC, dim=32, heads=4, kv_heads=2).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    layer(x).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with pytest.raises(ValueError, match="must divide"):
        PatternAttention(SRC, dim=30, heads=4)


def test_backward_runs_under_the_options_its_forward_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd may run the backward on another thread (CUDA), where a context variable set around the
    forward does not reach: the options are captured with the forward and restored for its backward."""
    from patterndsl.runtime import autograd

    seen: list[Options] = []
    real = autograd._backward
    monkeypatch.setattr(autograd, "_backward", lambda *a, **kw: seen.append(current_options()) or real(*a, **kw))
    attn = P.compile(SRC)
    q, k, v = (t.requires_grad_() for t in _qkv())
    with attn.options(bwd_tma=False, bwd_tiles=(16, 16, 16, 16, 4, 1)):
        out = attn(q, k, v)
    out.sum().backward()
    assert len(seen) == 1 and not seen[0].bwd_tma and seen[0].bwd_tiles == (16, 16, 16, 16, 4, 1)
    assert current_options() == Options()


def test_the_cpu_path_warning_names_the_callers_line() -> None:
    from patterndsl.runtime import cpu

    cpu._warned_cpu.clear()
    attn = P.compile("pattern cpu_warning = causal\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attn(*_qkv())
    assert [w.filename for w in seen] == [__file__]


@pytest.mark.parametrize(
    ("src", "heads"),
    [("causal & (window(40) | sink(8))", None), ("window(20) | global(0:9)", None),
     ("heads {\n    0:1 => causal & window(30)\n    1:2 => causal\n}", 2)],
)  # fmt: skip
def test_flex_block_mask_from_the_tables_equals_create_block_mask(src: str, heads: int | None) -> None:
    """The Flex BlockMask built from the analytic tables lists the same FULL and PARTIAL blocks per row as
    FlexAttention's own create_block_mask, which evaluates the mask_mod on every block."""
    from torch.nn.attention.flex_attention import create_block_mask

    attn = P.compile(f"pattern p = {src}\n")
    n, bs = 256, 32
    ours = attn.to_flex_block_mask(n, block_size=bs)
    theirs = create_block_mask(ours.mask_mod, None, heads, n, n, device="cpu", BLOCK_SIZE=bs)

    def rows(counts, indices):  # type: ignore[no-untyped-def]
        c, i = counts.expand(-1, heads or 1, -1), indices.expand(-1, heads or 1, -1, -1)
        return [[sorted(i[0, h, r, : int(c[0, h, r])].tolist()) for r in range(c.shape[-1])] for h in range(c.shape[1])]

    for side in ("kv", "full_kv", "q", "full_q"):
        counts, indices = (getattr(ours, f"{side}_{what}") for what in ("num_blocks", "indices"))
        assert rows(counts, indices) == rows(*(getattr(theirs, f"{side}_{what}") for what in ("num_blocks", "indices")))
        assert indices.shape[-1] == n // bs  # Flex's format: every block (it reads the mask's extent off it)


def test_flex_attention_with_the_block_mask_equals_ours() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    attn = P.compile("pattern p = causal & (window(40) | sink(8))\n")
    bm = attn.to_flex_block_mask(256, block_size=32)
    q, k, v = _qkv(n=256, h=1, d=16)
    assert torch.allclose(flex_attention(q, k, v, block_mask=bm), attn(q, k, v), atol=1e-12)
    assert bm.to_dense().shape[-1] == 256 // 32  # Flex's own helpers take the mask
    with pytest.raises(ValueError, match="selector"):
        P.compile("pattern s = causal & topk(2, block=16)\n").to_flex_block_mask(64)


@pytest.mark.slow
def test_compiled_flex_attention_with_the_block_mask_equals_ours() -> None:
    """Compiled Flex (Inductor's kernel, as a GPU user runs it) reads the mask's extent off its arrays."""
    from torch.nn.attention.flex_attention import flex_attention

    attn = P.compile("pattern p = causal\n")
    n = 512
    q, k, v = (x.float() for x in _qkv(n=n, h=1, d=16))
    flex = torch.compile(flex_attention, dynamic=False)
    out = flex(q, k, v, block_mask=attn.to_flex_block_mask(n, block_size=128))
    assert torch.allclose(out, attn(q, k, v), atol=1e-5)
