"""Greedy generation with a patterndsl pattern in a transformers model; prints tokens/s and cache memory.

A Llama-style model from a config (random weights, no downloads) generates greedily from a random prompt
with a sliding window plus attention sinks (StreamingLLM's pattern), three ways:

- patterndsl over `hf.pattern_cache(model)`: each layer keeps only the keys the pattern can still read (a
  ring of pages for the window, the sinks' first page), so the cache does not grow with the context, and
  each step runs patterndsl's decode path over those pages;
- patterndsl over transformers' own cache (every key kept; each step reads only the keys it allows);
- transformers' `sdpa` (full causal attention, every key kept and read).

The script says whether the two patterndsl runs generated the same tokens (in float32 on the CPU they must).
Decode rate: the tokens after the first over the time after the first (the prompt's forward is timed apart).

    python examples/generate.py                   # CPU, tiny
    python examples/generate.py --gpu             # a larger model and a 32k-token prompt on a CUDA GPU
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch


def cache_bytes(cache: Any) -> int:
    """Bytes of a cache's keys and values: a pattern cache says itself; transformers' layers hold tensors."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    return sum(t.nbytes for layer in getattr(cache, "layers", ()) for t in (layer.keys, layer.values)
               if torch.is_tensor(t))


def run(model: Any, prompt: torch.Tensor, new: int, cache: Any) -> tuple[torch.Tensor, float, float, int]:
    """(tokens, prompt-and-first-token seconds, decode tokens per second, cache bytes) of a greedy run: a
    stopping criterion reads the clock as each token comes out, so the decode rate is the tokens after the
    first over the time after the first."""
    from transformers import StoppingCriteriaList

    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    clock: list[float] = []

    def tick(input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        sync()
        clock.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    extra = {} if cache is None else {"cache": cache}
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([tick]), **extra)
    rate = (len(clock) - 1) / (clock[-1] - clock[0]) if len(clock) > 1 else float("nan")
    return out.sequences, clock[0] - start, rate, cache_bytes(out.cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the larger size, on a CUDA GPU")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens")
    parser.add_argument("--new", type=int, default=None, help="tokens to generate")
    parser.add_argument("--window", type=int, default=None, help="the pattern's window (keys back)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU")
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    prompt_len = args.prompt or (32768 if args.gpu else 1024)
    new = args.new or (128 if args.gpu else 32)
    window = args.window or (4095 if args.gpu else 31)
    size = (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4) if args.gpu else
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    if not args.gpu:
        torch.set_num_threads(1)  # small matrices: more threads wait more than they work
        warnings.filterwarnings("ignore", message="patterndsl .*not the fast")

    from transformers import AutoModelForCausalLM, LlamaConfig

    from patterndsl.integrations import hf

    source = f"pattern streaming = causal & (window({window}) | sink(4))"
    hf.register("patterndsl_streaming", source)
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=prompt_len + new, **size)
    models = {}
    for impl in ("patterndsl_streaming", "sdpa"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(LlamaConfig(**config.to_dict()), attn_implementation=impl,
                                                        dtype=dtype).to(device).eval()
    ours = models["patterndsl_streaming"]
    prompt = torch.randint(0, 1024, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"{source}\nprompt {prompt_len} tokens, {new} generated, {size['num_hidden_layers']} layers, {device}")
    runs = (("patterndsl, pattern cache", ours, lambda: hf.pattern_cache(ours, max_length=prompt_len + new)),
            ("patterndsl, transformers' cache", ours, lambda: None),
            ("sdpa, transformers' cache", models["sdpa"], lambda: None))
    tokens = []
    for label, model, make_cache in runs:
        warm = make_cache()  # warm up the kernels each run steps through (the paged decode kernel, tables)
        model.generate(prompt[:, :8], max_new_tokens=4, do_sample=False, **({} if warm is None else {"cache": warm}))
        got, first, rate, held = run(model, prompt, new, make_cache())
        tokens.append(got)
        print(f"{label:>32}: {rate:9.1f} tokens/s decoding, prompt {first:7.3f} s, cache {held / 2**20:8.2f} MiB")
    differ = (tokens[0] != tokens[1]).flatten().nonzero()
    if differ.numel() == 0:
        print("the pattern cache generated the same tokens as transformers' cache")
    else:  # in bf16 the two decode calls may round differently, and a random model's logits are close
        print(f"the two patterndsl runs part at token {int(differ[0]) - prompt_len} of {new} (rounding)")


if __name__ == "__main__":
    main()
