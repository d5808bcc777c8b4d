"""PatternKVCache: generation with the pages it keeps equals generation with the whole context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask
from strategies import exact_retention_patterns, expressions

from patterndsl import pattern
from patterndsl.analysis.retention import decode_consistent
from patterndsl.cache import PatternKVCache

B, H, HKV, D = 2, 4, 2, 3  # two query heads per KV head


def _decode_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """float64 attention of one query per head [B, H, D] to the keys at positions `keys` (k, v: [B, Hkv, n, D]);
    no key: zeros."""
    if keys.size == 0:
        return np.zeros_like(q)
    kk = k[:, :, keys].repeat(H // HKV, axis=1)
    vv = v[:, :, keys].repeat(H // HKV, axis=1)
    s = np.einsum("bhd,bhnd->bhn", q, kk) * D**-0.5
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhn,bhnd->bhd", w / w.sum(-1, keepdims=True), vv)


def _gathered(cache: PatternKVCache, pages: torch.Tensor, n: int) -> torch.Tensor:
    """[B, Hkv, n, D]: what the page table says lives at positions 0..n-1 (stale or foreign where evicted)."""
    pos = torch.arange(n)
    phys = cache.page_table[:, pos // cache.page_size].long()
    return pages[phys, (pos % cache.page_size)[None, :]].transpose(1, 2).numpy()


def _generate(src: str, steps: list[int], page_size: int | None, seed: int, prompt: int = 0) -> None:
    """Add a prompt of `prompt` tokens whose queries attended already (`append_attended`), then append
    `steps` tokens at a time; after each append, every new query attends through the page table and must
    get what the whole context gives (the pattern's row at N = tokens so far)."""
    total = prompt + sum(steps)
    mask = reference_mask(pattern(src), total)  # decode-consistent: rows at N = n are these rows' prefixes
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, total, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, total, D, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, total, D, generator=g, dtype=torch.float64).numpy()
    kn, vn = k.numpy(), v.numpy()
    cache = PatternKVCache(src, batch=B, kv_heads=HKV, head_dim=D, page_size=page_size, max_append=max(steps),
                           dtype=torch.float64)  # fmt: skip
    cache.append_attended(k[:, :, :prompt], v[:, :, :prompt])
    n = prompt
    assert cache.length == n
    for t in steps:
        cache.append(k[:, :, n : n + t], v[:, :, n : n + t])
        n += t
        assert cache.length == n and cache.cache_seqlens.tolist() == [n] * B
        kc, vc = _gathered(cache, cache.k_pages, n), _gathered(cache, cache.v_pages, n)
        for i in range(n - t, n):
            keys = np.nonzero(mask[i, :n])[0]
            got = _decode_reference(q[:, :, i], kc, vc, keys)
            want = _decode_reference(q[:, :, i], kn[:, :, :n], vn[:, :, :n], keys)
            assert np.array_equal(got, want), f"query {i} of {src}: a key it reads was evicted"


_DECODE_PATTERNS = st.one_of(exact_retention_patterns(), expressions(max_leaves=3)).filter(
    lambda s: decode_consistent(pattern(s))[0]
)
_STEPS = st.lists(st.integers(1, 4), min_size=1, max_size=12)
_PAGES = st.sampled_from([None, 1, 2, 3, 4])


@settings(max_examples=10)
@given(_DECODE_PATTERNS, _STEPS, _PAGES)
def test_generation_with_the_pattern_cache_equals_the_full_cache(src: str, steps: list[int], page: int | None) -> None:
    _generate(src, steps, page, seed=len(steps))


@settings(max_examples=10)
@given(_DECODE_PATTERNS, st.integers(0, 40), _STEPS, _PAGES)
def test_a_prompt_added_as_attended_keeps_what_later_queries_read(src: str, prompt: int, steps: list[int],
                                                                   page: int | None) -> None:
    _generate(src, steps, page, seed=prompt, prompt=prompt)


def test_a_long_prompt_added_as_attended_takes_no_more_memory() -> None:
    """StreamingLLM's cache after a prompt of 2000 tokens holds what a fresh one does: only the window's and
    the sinks' pages are ever written, and the last queries still read every key they need."""
    src = "causal & (window(15) | sink(4))"
    fresh = PatternKVCache(src, batch=1, kv_heads=1, head_dim=4, dtype=torch.float64)
    cache = PatternKVCache(src, batch=1, kv_heads=1, head_dim=4, dtype=torch.float64)
    k = torch.arange(2000, dtype=torch.float64).reshape(1, 1, 2000, 1).expand(1, 1, 2000, 4)
    cache.append_attended(k, k)
    assert cache.memory_bytes() == fresh.memory_bytes() and cache.length == 2000
    held = [x for a, b in cache.resident_positions() for x in range(a, b)]
    assert set(range(4)) | set(range(2000 - 16, 2000)) <= set(held)
    assert np.array_equal(_gathered(cache, cache.k_pages, 2000)[0, 0, 1990:, 0], np.arange(1990, 2000))


@pytest.mark.slow
@settings(max_examples=300)
@given(_DECODE_PATTERNS, _STEPS, _PAGES)
def test_generation_with_the_pattern_cache_equals_the_full_cache_thoroughly(
    src: str, steps: list[int], page: int | None
) -> None:
    _generate(src, steps, page, seed=len(steps))


def test_streaming_llm_cache_memory_is_constant_in_context_length() -> None:
    src = "causal & (window(100) | sink(4))"
    cache = PatternKVCache(src, batch=1, kv_heads=1, head_dim=8, page_size=16, max_append=256, dtype=torch.float32)
    dense = PatternKVCache("causal", batch=1, kv_heads=1, head_dim=8, page_size=16, max_append=256, dtype=torch.float32)
    chunk = torch.zeros(1, 1, 256, 8)
    sizes = []
    for _ in range(256):  # 64k tokens
        cache.append(chunk, chunk)
        dense.append(chunk, chunk)
        sizes.append(cache.memory_bytes())
    assert len(set(sizes)) == 1 and dense.memory_bytes() > 100 * sizes[0]
    held = cache.resident_positions()
    n = cache.length
    assert held[0] == (0, 16) and held[-1][1] == n and held[-1][0] >= n - 100 - 256 - 16


def test_pages_follow_blockwise_blocks_by_default() -> None:
    cache = PatternKVCache("causal & blockwise(32, window(1) | sink(1))", batch=1, kv_heads=1, head_dim=4)
    assert cache.page_size == 64


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PatternKVCache("window(N // 2)", batch=1, kv_heads=1, head_dim=4), "is sized with N"),
        (lambda: PatternKVCache("causal", batch=0, kv_heads=1, head_dim=4), "batch must be a positive integer"),
    ],
)
def test_misuse_is_one_sentence(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_append_misuse_is_one_sentence() -> None:
    cache = PatternKVCache("causal & window(4)", batch=1, kv_heads=2, head_dim=4, max_append=2, max_seqlen=4,
                           dtype=torch.float32)  # fmt: skip
    ok = torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match=r"k_new must be \[B=1, Hkv=2, T, D=4\]"):
        cache.append(torch.zeros(1, 1, 2, 4), ok)
    with pytest.raises(ValueError, match="at most max_append = 2 tokens"):
        cache.append(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="float64 but the cache holds torch.float32"):
        cache.append(ok.double(), ok.double())
    cache.append(ok, ok)
    cache.append(ok, ok)
    with pytest.raises(ValueError, match="at most max_seqlen = 4 tokens"):
        cache.append(ok, ok)


@pytest.mark.parametrize("src", ["causal & (window(5) | sink(2))", "causal & blockwise(4, hops(2) | window(1))",
                                 "window(3) | sink(1)"])  # fmt: skip
def test_attn_decode_through_the_pattern_cache_equals_the_full_context(src: str) -> None:
    import patterndsl as P
    attn = P.compile(f"pattern p = {src}\n", block_m=16, block_n=16)
    g = torch.Generator().manual_seed(1)
    steps = [3, 1, 4, 1, 2, 4, 4, 1, 3, 2, 4, 4, 1]
    total = sum(steps)
    mask = reference_mask(pattern(src), total)
    k, v, q = (torch.randn(B, h, total, D, generator=g, dtype=torch.float64) for h in (HKV, HKV, H))
    cache = PatternKVCache(src, batch=B, kv_heads=HKV, head_dim=D, page_size=2, max_append=4, dtype=torch.float64)
    n = 0
    for t in steps:
        cache.append(k[:, :, n : n + t], v[:, :, n : n + t])
        n += t
        got = attn.decode(q[:, :, n - t : n], cache.k_pages, cache.v_pages, cache.cache_seqlens,
                          page_table=cache.page_table)  # fmt: skip
        for r, i in enumerate(range(n - t, n)):
            keys = np.nonzero(mask[i, :n])[0]
            want = _decode_reference(q[:, :, i].numpy(), k[:, :, :n].numpy(), v[:, :, :n].numpy(), keys)
            np.testing.assert_allclose(got[:, :, r].numpy(), want, rtol=1e-9, atol=1e-9, err_msg=f"query {i}")
