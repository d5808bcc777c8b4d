"""Run-time misuse of a compiled pattern: each mistake is one clear sentence (ValueError or TypeError, never a
traceback from deep inside), and inputs that are legal but unusual (strided views, NaN, Inf) give the
correct result. CPU path, float64 references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import patterndsl as P

torch = pytest.importorskip("torch")
warnings.filterwarnings("ignore", message=".*CPU tensors take a PyTorch reference path.*")

ATTN = None


def _attn():  # type: ignore[no-untyped-def]
    global ATTN
    if ATTN is None:
        ATTN = P.compile("pattern p = causal & window(6) & rows(2:)\n")
    return ATTN


def _qkv(b: int = 1, h: int = 2, n: int = 20, d: int = 8, hkv: int | None = None, dtype=None):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    dtype = dtype or torch.float64
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, hkv or h, n, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _reference(q, k, v):  # type: ignore[no-untyped-def]
    n = q.shape[2]
    mask = torch.from_numpy(np.asarray(P.dense_mask("causal & window(6) & rows(2:)", n)))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no key: zeros
    return p @ v


@pytest.mark.parametrize(
    ("make", "error", "says"),
    [
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "dtype must be one of"),
        (lambda q, k, v: (q, k.float(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "must be [batch, heads, N, head_dim]"),
        (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]), ValueError, "to match q"),
        (lambda q, k, v: (q, k, v[:, :, :10]), ValueError, "same shape"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "on one device"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "must divide query heads"),
        (lambda q, k, v: (q[:0], k[:0], v[:0]), ValueError, "empty input"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "must be a torch.Tensor"),
    ],
)
def test_misuse_is_one_clear_sentence(make, error, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        _attn()(*make(*_qkv()))
    assert says in str(info.value) and "\n" not in str(info.value)


def test_heads_that_do_not_divide_and_bad_options_are_refused() -> None:
    q, k, v = _qkv(h=4, hkv=3)
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide query heads \(4\)"):
        _attn()(q, k, v)
    with pytest.raises(TypeError, match="scale must be a number"):
        _attn()(*_qkv(), scale="0.1")
    with pytest.raises(TypeError, match="layer= is for modules compiled from a model"):
        _attn()(*_qkv(), layer=0)
    with pytest.raises(ValueError, match="takes no scores"):
        _attn()(*_qkv(), scores=torch.zeros(1))
    with pytest.raises(ValueError, match="only meaningful with cu_seqlens"):
        _attn()(*_qkv(), max_seqlen=4)


def test_a_length_past_the_proven_index_range_is_refused_before_any_work() -> None:
    attn = P.compile("pattern p = where(q * 1024 < k * 1024 + 4096)\n")
    assert attn.spec.max_n < 2**31
    with pytest.raises(ValueError, match="beyond this pattern's proven index range"):
        attn.check_n(attn.spec.max_n * 2)
    grid = P.compile("layout g = grid(4, 5)\npattern p = neighborhood(g, kernel=3)\n")
    with pytest.raises(ValueError, match=r"holds 20 tokens but N = 21"):
        grid(*_qkv(n=21))


def test_strided_and_broadcast_views_give_the_contiguous_result() -> None:
    q, k, v = _qkv(n=24)
    want = _reference(q, k, v)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous strides, same values
    assert not qt.is_contiguous()
    assert torch.allclose(_attn()(qt, k, v), want)
    kb = k[:, :1].expand(-1, 2, -1, -1)  # a broadcast (stride 0) head dimension
    assert torch.allclose(_attn()(q, kb, v[:, :1].expand(-1, 2, -1, -1)), _reference(q, kb.contiguous(), v[:, :1].expand(-1, 2, -1, -1).contiguous()))


def test_nan_goes_where_the_math_sends_it_and_empty_rows_stay_zero() -> None:
    q, k, v = _qkv(n=20)
    q[0, 0, 10] = float("nan")
    out = _attn()(q, k, v)
    assert out[0, 0, 10].isnan().all()  # the poisoned query's own row
    assert not out[0, 0, :10].isnan().any() and not out[0, 0, 11:].isnan().any()  # nowhere else
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))  # rows(2:): rows 0, 1 have no key
    k2 = k.clone()
    k2[0, 0, 3] = float("inf")
    out2, lse2 = _attn()(q, k2, v, return_lse=True)
    assert torch.equal(out2[:, :, :2], torch.zeros_like(out2[:, :, :2])) and torch.isinf(lse2[:, :, :2]).all()


def test_gqa_and_mqa_match_the_repeated_reference() -> None:
    for hkv in (1, 2, 4):
        q, k, v = _qkv(h=4, hkv=hkv)
        assert torch.allclose(_attn()(q, k, v), _reference(q, k, v))
