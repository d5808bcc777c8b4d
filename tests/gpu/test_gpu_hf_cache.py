"""`hf.pattern_cache` on the GPU: a tiny Llama-style model (random weights, no downloads) whose steps run the
compiled decode kernel over the cache's pages. Each step's logits equal the whole sequence's forward, and
greedy generation gives the tokens of transformers' full cache, in float32 (bf16 rounds the two paths
differently, and a random model's logits are close).

Run with `pytest -m gpu tests/gpu/test_gpu_hf_cache.py`; skipped without CUDA.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.25")  # the hf extra's floor

from patterndsl.integrations import hf  # noqa: E402

pytestmark = pytest.mark.gpu  # skipped without a CUDA GPU (conftest.py)

SIZE = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def _model(name: str) -> object:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SIZE), attn_implementation=name,
                                                         dtype=torch.float32).to("cuda").eval()


def test_steps_over_the_pages_equal_the_whole_forward_on_the_gpu() -> None:
    hf.register("pd_gpu_cache", "pattern p = causal & (window(127) | sink(4))")
    model = _model("pd_gpu_cache")
    x = torch.randint(0, 256, (2, 1100), generator=torch.Generator().manual_seed(1)).cuda()
    cache = hf.pattern_cache(model, page_size=64)
    with torch.no_grad():
        parts = [model(x[:, :1000], cache=cache).logits[:, -1:]]
        parts += [model(x[:, n:n + 1], cache=cache).logits for n in range(1000, 1100)]
        whole = model(x).logits[:, 999:]
    assert (torch.cat(parts, dim=1) - whole).abs().max().item() < 2e-3
    assert cache.memory_bytes() <= 2 * 2 * 2 * 2 * 64 * 32 * 4 * 6  # six pages per row, layer, k and v


def test_greedy_tokens_equal_transformers_cache_on_the_gpu() -> None:
    hf.register("pd_gpu_greedy", "pattern p = causal & (window(127) | sink(4))")
    model = _model("pd_gpu_greedy")
    prompt = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
        got = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False,
                             cache=hf.pattern_cache(model))
    assert torch.equal(got, want)
