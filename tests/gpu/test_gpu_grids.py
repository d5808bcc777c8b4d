"""log2, tile-major grids and grids with extra tokens on a CUDA GPU (the lent H100): the library patterns
that use them (Radial Attention, Sliding Tile Attention 2-D and 3-D, the video DiT with 226 text tokens)
at their default sizes against a float64 reference on a sample of query rows, and forward + backward at
smaller sizes against a full float64 reference. Outputs and gradients are written into NaN-filled tensors.

Run with `pytest -m gpu tests/gpu/test_gpu_grids.py` on a machine with CUDA; skipped elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import LIBRARY

import patterndsl as P
from patterndsl.mask import dense_mask, eval_numpy
from patterndsl.semantics import predicate

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

LIBRARY_CASES = [  # (file, pattern, N at the file's defaults)
    ("radial.pat", "radial", 16 * 1024),
    ("radial.pat", "radial_causal", 16 * 1024),
    ("radial.pat", "radial_2d", 16 * 32 * 32),
    ("sta.pat", "sta_2d", 64 * 64),
    ("sta.pat", "sta_3d", 16 * 32 * 32),
    ("video_dit.pat", "video_dit", 226 + 16 * 32 * 32),
]
SMALL_CASES = [  # (file, pattern, defines, N): forward + backward against the whole float64 reference
    ("video_dit.pat", "video_dit", {"frames": 4, "height": 16, "width": 16}, 226 + 4 * 16 * 16),
    ("sta.pat", "sta_3d", {"tiles_t": 3, "tiles_h3": 4, "tiles_w3": 4, "tt": 2, "th": 4, "tw": 4}, 3 * 16 * 32),
    ("radial.pat", "radial_causal", {"frames": 8, "tokens": 256, "w0": 64}, 8 * 256),
]


def _nan(shape: Any, dtype: Any) -> Any:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device="cuda")


def _reference(q: Any, k: Any, v: Any, mask: Any, scale: float) -> tuple[Any, Any]:
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    return p @ v.double(), lse


@pytest.mark.parametrize("file, name, n", LIBRARY_CASES, ids=[f"{c[0][:-4]}:{c[1]}" for c in LIBRARY_CASES])
def test_gpu_library_pattern_matches_float64_on_sampled_rows(file: str, name: str, n: int) -> None:
    body = P.load(LIBRARY / file).get(name).body  # type: ignore[union-attr]
    attn = P.compile(LIBRARY / file, name)
    d = 128
    q, k, v = (torch.randn(1, 4, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = _nan(q.shape, q.dtype), _nan(q.shape[:3], torch.float32)
    with torch.no_grad():
        attn.attention_lse(q, k, v, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN) elements"
    rows = np.unique(np.concatenate([np.arange(0, n, 61), np.arange(n - 300, n)]))
    mask = eval_numpy(predicate(body), rows[:, None], np.arange(n)[None, :], n)
    mask = torch.from_numpy(np.broadcast_to(mask, (rows.size, n)).copy()).cuda()
    r = torch.from_numpy(rows).cuda()
    ref, ref_lse = _reference(q[:, :, r], k, v, mask, d**-0.5)
    got = out[:, :, r].double()
    assert torch.equal(torch.isinf(lse[:, :, r]), torch.isinf(ref_lse))
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("file, name, defines, n", SMALL_CASES, ids=[f"{c[0][:-4]}:{c[1]}" for c in SMALL_CASES])
def test_gpu_forward_and_backward_match_float64(file: str, name: str, defines: dict[str, int], n: int) -> None:
    program = P.load(LIBRARY / file, defines)
    body = program.get(name).body  # type: ignore[union-attr]
    attn = P.compile(program, name)
    d = 64
    q, k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=torch.float32, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, n, d, device="cuda")
    out = attn.attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    mask = torch.from_numpy(dense_mask(body, n)).cuda()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = _reference(qd, kd, vd, mask, d**-0.5)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4
    for got, w in zip((dq, dk, dv), want, strict=True):
        assert not torch.isnan(got).any()
        assert ((got.double() - w).norm() / w.norm()).item() < 1e-3
