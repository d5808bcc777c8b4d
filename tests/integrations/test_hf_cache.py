"""`hf.pattern_cache`: generation over a cache that keeps only what each layer's pattern can still read gives
the tokens of transformers' full cache (and of transformers' own sliding window), in memory that does not grow
with the context. Tiny random models, float64 (the CPU path), no downloads."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.25")  # the hf extra's floor

from patterndsl.integrations import hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _model(config: Any, name: str) -> Any:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name,
                                                         dtype=torch.float64).eval()


def _tokens(batch: int, n: int, seed: int = 1) -> Any:
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model: Any, prompt: Any, new: int, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


def test_a_windowed_model_generates_the_tokens_of_the_full_cache_and_of_eager() -> None:
    hf.register("pd_cache_window", "pattern p = causal & window(7)")
    config = transformers.MistralConfig(**SMALL, sliding_window=8)
    ours, eager = _model(config, "pd_cache_window"), _model(config, "eager")
    prompt = _tokens(1, 6)
    want = _greedy(eager, prompt, 32)  # transformers' own sliding window
    cache = hf.pattern_cache(ours, page_size=4)
    assert torch.equal(_greedy(ours, prompt, 32, cache=cache), want)
    assert torch.equal(_greedy(ours, prompt, 32), want)  # transformers' cache, patterndsl's decode path
    assert cache.get_seq_length() == 6 + 32 - 1 and "PatternLayer(the last 7)" in repr(cache)


def test_window_and_sinks_generate_in_constant_memory_with_the_full_cache_tokens() -> None:
    hf.register("pd_cache_stream", "pattern p = causal & (window(5) | sink(2))")
    ours = _model(transformers.LlamaConfig(**SMALL), "pd_cache_stream")
    prompt = _tokens(1, 9)
    cache = hf.pattern_cache(ours, page_size=4)
    held: list[int] = []

    def record(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        held.append(cache.memory_bytes())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    got = _greedy(ours, prompt, 64, cache=cache, stopping_criteria=transformers.StoppingCriteriaList([record]))
    full = _greedy(ours, prompt, 64, return_dict_in_generate=True)
    assert torch.equal(got, full.sequences)
    assert len(held) == 64 and len(set(held)) == 1  # from the prompt's 9 tokens to 72
    assert 2 * held[-1] < sum(layer.keys.nbytes + layer.values.nbytes for layer in full.cache.layers)


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone() -> None:
    hf.register("pd_cache_pad", "pattern p = causal & (window(5) | sink(2))")
    ours = _model(transformers.LlamaConfig(**SMALL), "pd_cache_pad")
    a, b = _tokens(1, 9, seed=2), _tokens(1, 4, seed=3)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, 5:] = a[0], b[0]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    got = _greedy(ours, ids, 20, attention_mask=mask, cache=hf.pattern_cache(ours, page_size=4))
    assert torch.equal(got[0], _greedy(ours, a, 20)[0])
    assert torch.equal(got[1, 5:], _greedy(ours, b, 20)[0])
    with pytest.raises(ValueError, match="padding mask with a KV cache is not supported.*pattern_cache"):
        _greedy(ours, ids, 2, attention_mask=mask)  # transformers' cache: one sentence that names the way out


def test_a_model_schedule_and_heads_keep_each_layers_keys_and_transformers_layer_where_all_stay() -> None:
    source = """
pattern mixed = heads {
    0:2 => causal & window(3)
    2:4 => causal & (window(5) | sink(2))
}
model m = layers(3) {
    0:1 => mixed
    1:2 => causal
    else => causal & window(4)
}
"""
    hf.register("pd_cache_model", source, "m")
    ours = _model(transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 3}), "pd_cache_model")
    cache = hf.pattern_cache(ours, page_size=4)
    assert [type(layer).__name__ for layer in cache.layers] == ["PatternLayer", "DynamicLayer", "PatternLayer"]
    prompt = _tokens(2, 7)
    assert torch.equal(_greedy(ours, prompt, 32, cache=cache), _greedy(ours, prompt, 32))


def test_steps_of_several_tokens_equal_the_whole_forward() -> None:
    hf.register("pd_cache_steps", "pattern p = causal & (window(6) | sink(1))")
    ours = _model(transformers.LlamaConfig(**SMALL), "pd_cache_steps")
    x = _tokens(2, 30)
    cache = hf.pattern_cache(ours, page_size=4, max_append=3)
    with torch.no_grad():
        parts = [ours(x[:, :20], cache=cache).logits]
        parts += [ours(x[:, n:n + 3], cache=cache).logits for n in (20, 23, 26)]
        whole = ours(x[:, :29]).logits
        assert (torch.cat(parts, dim=1) - whole).abs().max().item() < 1e-10
        with pytest.raises(ValueError, match="at most 3 new tokens per step.*max_append=4"):
            ours(x[:, 25:29], cache=cache)


def test_what_the_pattern_cache_cannot_do_is_one_sentence() -> None:
    hf.register("pd_cache_refuse", "pattern p = causal & window(4)")
    config = transformers.LlamaConfig(**SMALL)
    with pytest.raises(ValueError, match="registered by patterndsl.integrations.hf.register, got 'sdpa'"):
        hf.pattern_cache(_model(config, "sdpa"))
    ours = _model(config, "pd_cache_refuse")
    with pytest.raises(ValueError, match="page_size must be a positive integer, got 0"):
        hf.pattern_cache(ours, page_size=0)
    with pytest.raises(ValueError, match="beam search"):
        _greedy(ours, _tokens(1, 5), 3, num_beams=2, cache=hf.pattern_cache(ours))
    cache = hf.pattern_cache(ours)
    x = _tokens(1, 8)
    ours(x[:, :6], cache=cache)
    with pytest.raises(ValueError, match="carry no gradients"):
        ours(x[:, 6:], cache=cache)
