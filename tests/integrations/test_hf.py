"""patterndsl as a transformers attention implementation: tiny models from configs written here (random
weights, float32, no downloads) against transformers' own `sdpa` / `eager` attention."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.25")  # the hf extra's floor

from patterndsl.cli import main  # noqa: E402
from patterndsl.integrations import hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")

SMALL = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _pair(config: Any, name: str, other: str = "sdpa", dtype: Any = torch.float32) -> tuple[Any, Any]:
    """The same random model twice: with attention `name` and with transformers' `other`. float32 runs the
    Triton kernels (in the interpreter here), float64 the CPU path (quicker, for the longer tests)."""
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name,
                                                         dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=other,
                                                           dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _tokens(batch: int, n: int, seed: int = 1) -> Any:
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_llama_causal_logits_equal_sdpa() -> None:
    hf.register("pd_test_causal", "pattern p = causal")
    ours, theirs = _pair(transformers.LlamaConfig(**SMALL), "pd_test_causal")
    x = _tokens(2, 33)
    assert (ours(x).logits - theirs(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(("kind", "settings", "pattern", "message"), [
    ("llama", {"attention_dropout": 0.1}, "causal", r"attention dropout \(0.1\) in training"),
    ("llama", {}, "window(3)", "see the later key"),
    ("mistral", {"sliding_window": 4}, "causal & window(4)", "sliding_window is 4"),
    ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 50.0, "head_dim": 16}, "causal", "softcap"),
    ("gpt_oss", {"sliding_window": 8, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1},
     "causal & window(7)", "learned sink logits"),
])
def test_what_cannot_be_honoured_is_one_sentence(kind: str, settings: dict[str, Any], pattern: str,
                                                 message: str) -> None:
    name = f"pd_test_refuse_{kind}"
    hf.register(name, f"pattern p = {pattern}")
    config = transformers.AutoConfig.for_model(kind, **{**SMALL, **settings})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name)
    model.train()
    with pytest.raises(ValueError, match=message):
        model(_tokens(1, 12))


def test_a_model_pattern_must_match_the_depth_and_a_padding_mask_have_no_gaps() -> None:
    hf.register("pd_test_depth", "model m = layers(3) { else => causal }")
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL),
                                                          attn_implementation="pd_test_depth")
    with pytest.raises(ValueError, match="has 3 layers but the model has 2"):
        model(_tokens(1, 8))
    hf.register("pd_test_gaps", "pattern p = causal")
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL),
                                                          attn_implementation="pd_test_gaps")
    with pytest.raises(ValueError, match="gaps inside a row"):
        model(_tokens(1, 8), attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]]))


@pytest.mark.slow
@pytest.mark.parametrize("other", ["eager", "sdpa"])
def test_mistral_sliding_window_equals_transformers(other: str) -> None:
    hf.register("pd_test_mistral", "pattern p = causal & window(6)")
    ours, theirs = _pair(transformers.MistralConfig(**SMALL, sliding_window=7), "pd_test_mistral", other)
    x = _tokens(2, 40)
    assert (ours(x).logits - theirs(x).logits).abs().max().item() < 1e-5


@pytest.mark.slow
def test_gemma2_through_patc_from_hf_equals_transformers(tmp_path: Path) -> None:
    settings = {**SMALL, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 6,
                "attn_logit_softcapping": None, "query_pre_attn_scalar": 20}
    config = transformers.Gemma2Config(**settings)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", **settings}))
    assert main(["from-hf", str(tmp_path / "config.json"), "-o", str(tmp_path / "gemma2.pat")]) == 0
    hf.register("pd_test_gemma2", tmp_path / "gemma2.pat", "gemma2")
    ours, theirs = _pair(config, "pd_test_gemma2", "eager")  # transformers' Gemma-2 has no sdpa
    x = _tokens(2, 30)
    assert (ours(x).logits - theirs(x).logits).abs().max().item() < 1e-5  # scaling passed through


@pytest.mark.slow
def test_packed_padded_and_separate_sequences_agree_and_gradients_reach_every_parameter() -> None:
    hf.register("pd_test_pack", "pattern p = causal & (window(5) | sink(2))")
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL),
                                                          attn_implementation="pd_test_pack", dtype=torch.float64)
    x = _tokens(1, 30)
    lengths = (11, 1, 18)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(x, position_ids=position_ids).logits
    separate = torch.cat([model(part).logits for part in x.split(lengths, dim=1)], dim=1)
    assert (packed - separate).abs().max().item() < 1e-5
    cu = torch.tensor([0, 11, 12, 30], dtype=torch.int32)  # transformers' flattening collator's keywords
    given = model(x, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=18,
                  max_length_k=18).logits
    assert (given - separate).abs().max().item() < 1e-5
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mask[1, 13:] = 0  # right padding
    rows = torch.stack([torch.cat([x[0, 14:20], x[0, :14]]), x[0, :20]])
    padded = model(rows, attention_mask=mask).logits
    assert (padded[0, 6:] - model(x[:, :14]).logits[0]).abs().max().item() < 1e-5
    assert (padded[1, :13] - model(x[:, :13]).logits[0]).abs().max().item() < 1e-5
    packed.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
def test_greedy_generation_with_the_cache_equals_eager_for_a_windowed_model() -> None:
    hf.register("pd_test_generate", "pattern p = causal & window(7)")
    ours, theirs = _pair(transformers.MistralConfig(**SMALL, sliding_window=8), "pd_test_generate", "eager",
                         torch.float64)
    prompt = _tokens(1, 6)
    with torch.no_grad():
        want = theirs.generate(prompt, max_new_tokens=32, do_sample=False)
        assert torch.equal(ours.generate(prompt, max_new_tokens=32, do_sample=False), want)  # the decode path
        assert torch.equal(ours.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=False), want)
    hf.register("pd_test_absolute", "pattern p = causal & window(7) & ~sink(2)")
    ours, _ = _pair(transformers.MistralConfig(**SMALL, sliding_window=8), "pd_test_absolute", "eager", torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="reads absolute positions"):
        ours.generate(prompt, max_new_tokens=2, do_sample=False)


@pytest.mark.slow
def test_torch_compile_fullgraph_without_recompiling_for_a_new_length() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    hf.register("pd_test_compile", "pattern p = causal & window(7)")
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1}),
                                                          attn_implementation="pd_test_compile", dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")  # a graph break raises
    for step, n in enumerate((24, 40, 33)):
        x = _tokens(2, n, seed=n)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = compiled(x).logits
        assert (got - model(x).logits).abs().max().item() < 1e-5
    got.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
