"""Token layouts on the fast kernel (`runtime.layout_order`) on a CUDA GPU (the lent H100): library patterns
with a token layout at their default sizes, gathered into the layout's order for `_attn_fwd_fast`
(`layout_gather=True`) and read in place by `_attn_fwd` (`layout_gather=False`), each against a float64
reference on a sample of query rows and against each other; the fast kernel's switches (tiles, one loop,
sliced heavy blocks, pointer loads and device descriptors) under a layout; the backward both ways, against
each other at the library's sizes and in float32 against the whole float64 reference; and the tuner
timing the forward kernels that run. Outputs are written into
NaN-filled tensors.

Run with `pytest -m gpu tests/gpu/test_gpu_layout_order.py` on a machine with CUDA; skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import LIBRARY, spy_launches

import patterndsl as P
from patterndsl.mask import dense_mask, eval_numpy
from patterndsl.semantics import predicate

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

CASES = [  # (file or bare pattern, pattern, N at the file's defaults)
    ("video_dit.pat", "video_dit", 226 + 16 * 32 * 32),
    ("video.pat", "video_causal", 16 * 32 * 32),
    ("nat.pat", "nat", 56 * 56),
    ("image_transformer.pat", "local_2d", 64 * 64),
    ("dinat.pat", "dinat_stage1", 56 * 56),
    ("causal & window(1024, dilation=4)", "p", 16000),  # residue classes, padding rows
]
IDS = [f"{c[0][:-4]}:{c[1]}" if c[0].endswith(".pat") else "dilated_window" for c in CASES]


def _compiled(file: str, name: str) -> tuple[Any, Any]:
    if file.endswith(".pat"):
        return P.compile(LIBRARY / file, name), P.load(LIBRARY / file).get(name).body  # type: ignore[union-attr]
    program = P.loads(f"pattern p = {file}\n")
    return P.compile(program, "p"), program.get("p").body  # type: ignore[union-attr]


def _nan(shape: Any, dtype: Any) -> Any:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device="cuda")


def _sampled_reference(body: Any, q: Any, k: Any, v: Any, rows: Any, scale: float) -> tuple[Any, Any]:
    """float64 attention of query rows `rows` (their mask from the pattern's predicate), GQA heads shared."""
    n = k.shape[2]
    mask = eval_numpy(predicate(body), rows[:, None], np.arange(n)[None, :], n)
    mask = torch.from_numpy(np.broadcast_to(mask, (rows.size, n)).copy()).cuda()
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    s = (q[:, :, torch.from_numpy(rows).cuda()].double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    return p @ vv, lse


def _run(attn: Any, q: Any, k: Any, v: Any, monkeypatch: Any, **options: Any) -> tuple[Any, Any, list[Any]]:
    """(out, lse, the fast kernel's NTOK per launch) of one call into NaN-filled tensors under `options`."""
    from patterndsl.runtime import forward

    out, lse = _nan(q.shape, q.dtype), _nan(q.shape[:3], torch.float32)
    fast: list[Any] = []
    with monkeypatch.context() as m, torch.no_grad(), attn.options(**options):
        spy_launches(m, forward, "_attn_fwd_fast", fast, lambda kw: kw.get("NTOK"))
        attn.attention_lse(q, k, v, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN) elements"
    return out, lse, fast


def _close(out: Any, lse: Any, ref: Any, ref_lse: Any, rows: Any) -> None:
    r = torch.from_numpy(rows).cuda()
    got = out[:, :, r].double()
    assert torch.equal(torch.isinf(lse[:, :, r]), torch.isinf(ref_lse))
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("file, name, n", CASES, ids=IDS)
def test_gpu_gathered_layout_matches_float64_and_the_pointer_kernel(file: str, name: str, n: int,
                                                                    monkeypatch: Any) -> None:  # fmt: skip
    attn, body = _compiled(file, name)
    assert attn.spec.layouts[0] is not None
    d = 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (4, 2, 2))
    gathered, g_lse, fast = _run(attn, q, k, v, monkeypatch, layout_gather=True)
    assert fast == [n], "the layout must run on the fast kernel"
    in_place, p_lse, fast = _run(attn, q, k, v, monkeypatch, layout_gather=False)
    assert fast == []
    rows = np.unique(np.concatenate([np.arange(0, n, 61), np.arange(n - 300, n)]))
    ref, ref_lse = _sampled_reference(body, q, k, v, rows, d**-0.5)
    _close(gathered, g_lse, ref, ref_lse, rows)
    _close(in_place, p_lse, ref, ref_lse, rows)
    assert ((gathered.float() - in_place.float()).norm() / in_place.float().norm()).item() < 1e-2
    assert torch.equal(torch.isinf(g_lse), torch.isinf(p_lse))


SWITCHES = [dict(tiles=(64, 64, 4, 3)), dict(tiles=(128, 128, 8, 2)), dict(one_loop=True), dict(split_tiles=16),
            dict(tma_mode=0), dict(tma_mode=2), dict(maxnreg=168), dict(fold=False, contig=False)]  # fmt: skip


@pytest.mark.parametrize("options", SWITCHES, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o in SWITCHES])
def test_gpu_gathered_dit_under_the_fast_kernels_switches(options: dict[str, Any], monkeypatch: Any) -> None:
    """The video DiT (text rows far heavier than the rest: split_tiles slices them) through every switch of
    the fast kernel, its LAYOUT variant compiled for each."""
    file, name, n = CASES[0]
    attn, body = _compiled(file, name)
    d = 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out, lse, fast = _run(attn, q, k, v, monkeypatch, **options)
    assert fast == [n]
    rows = np.unique(np.concatenate([np.arange(0, 300), np.arange(0, n, 97), np.arange(n - 300, n)]))
    _close(out, lse, *_sampled_reference(body, q, k, v, rows, d**-0.5), rows)


@pytest.mark.parametrize("file, name, n", CASES, ids=IDS)
def test_gpu_gathered_backward_matches_the_in_place_one(file: str, name: str, n: int, monkeypatch: Any) -> None:
    """bf16 gradients at the library's sizes with the backward gathered into the layout's rows (TMA tiles,
    rows mapped to tokens for the predicate only) and read in place: finite and the same within bf16."""
    from patterndsl.runtime import backward

    attn, _ = _compiled(file, name)
    d = 128
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (4, 2, 2))
    do = torch.randn(1, 4, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    grads = {}
    for gather in (True, False):
        seen: list[Any] = []
        with monkeypatch.context() as m, attn.options(layout_gather=gather):
            spy_launches(m, backward, "_attn_bwd_dkdv", seen, lambda kw: kw["GATHERED"])
            grads[gather] = torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do)
        assert seen == [gather]
    for name_, x, y in zip(("dq", "dk", "dv"), grads[True], grads[False], strict=True):
        assert torch.isfinite(x).all(), name_
        assert ((x.float() - y.float()).norm() / y.float().norm()).item() < 2e-2, name_


SMALL = [  # (file, pattern, defines, N): forward + backward against the whole float64 reference
    ("video_dit.pat", "video_dit", {"frames": 4, "height": 16, "width": 16}, 226 + 4 * 16 * 16),
    ("dinat.pat", "dinat", {}, 28 * 28),
]


@pytest.mark.parametrize("file, name, defines, n", SMALL, ids=[f"{c[0][:-4]}:{c[1]}" for c in SMALL])
def test_gpu_gathered_and_in_place_forward_and_backward_match_float64(file: str, name: str, defines: dict[str, int],
                                                                   n: int) -> None:  # fmt: skip
    program = P.load(LIBRARY / file, defines)
    body = program.get(name).body  # type: ignore[union-attr]
    attn = P.compile(program, name)
    assert attn.spec.layouts[0] is not None
    d = 64
    q, k, v = (torch.randn(1, 2, n, d, device="cuda", requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, n, d, device="cuda")
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2) * d**-0.5).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1) @ vd
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    for gather in (True, False):
        with attn.options(layout_gather=gather):
            out = attn.attention(q, k, v)
            got = torch.autograd.grad(out, (q, k, v), do)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4, gather
        for x, y in zip(got, want, strict=True):
            assert ((x.double() - y).norm() / y.norm()).item() < 1e-3, gather


@pytest.mark.autotune
def test_gpu_tuner_times_the_kernel_that_runs(tmp_path: Path, monkeypatch: Any) -> None:
    """By default a layout pattern is tuned both ways: gathered, over the fast kernel's candidates (BLOCK_M,
    BLOCK_N, warps, stages, tma, one_loop, maxnreg), its configured tiles among them; read in place, over the
    pointer-load kernel's, under a key of their own; then the two ways timed against each other. A later call
    with the gather off reuses the in-place tuning."""
    from patterndsl.runtime import tuning
    from patterndsl.runtime.common import _d_pad

    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PATTERNDSL_AUTOTUNE", raising=False)
    file, name, n = CASES[2]  # NAT: 3136 tokens, quick to tune
    attn, _ = _compiled(file, name)
    spec = attn.spec
    q, k, v = (torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    before = len(tuning.records())
    attn(q, k, v)
    with attn.options(layout_gather=False):
        attn(q, k, v)
    fast, pointer, way = tuning.records()[before:]
    assert "layout-way" in way.key and set(way.rounds) == {(1,), (0,)} and way.choice in way.rounds
    default = (*tuning._by_width(spec.configs, 128, 2), 1, 0, 0)  # the tiles its layout was chosen for
    assert default in fast.rounds and set(fast.rounds) <= set(tuning._tune_candidates(spec, _d_pad(128), 1, 2, default))
    assert fast.choice in fast.rounds and "fwd-pointer" not in fast.key
    assert pointer.rounds and set(pointer.rounds) <= set(tuning._layout_candidates(spec, 128, 2, default))
    assert "fwd-pointer" in pointer.key
