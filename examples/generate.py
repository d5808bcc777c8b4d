"""Greedy generation with a patterndsl pattern in a transformers model; prints tokens/s and cache memory.

A Llama-style model from a config (random weights, no downloads) generates from a random prompt twice: with
the pattern (a sliding window with attention sinks, StreamingLLM's) and with transformers' `sdpa`, both
over transformers' KV cache (a pattern's step reads only the keys it allows: the window and the sinks).
With a runtime that has no decode path (queries fewer than keys) the pattern's generation recomputes the
prefix for each token instead (`use_cache=False`); the script says which it ran.

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
    """Bytes held by a transformers cache's key and value tensors (0 for none)."""
    total = 0
    for layer in getattr(cache, "layers", ()) or ():
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def run(model: Any, prompt: torch.Tensor, new: int, use_cache: bool) -> tuple[torch.Tensor, float, int]:
    """(tokens, generated tokens per second, cache bytes) of one greedy generation."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache,
                             return_dict_in_generate=True)
        sync()
        seconds = time.perf_counter() - start
    cache = out.cache if "cache" in out else out.get("past_key_values")
    return out.sequences, new / seconds, cache_bytes(cache)


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
    prompt_len = args.prompt or (32768 if args.gpu else 96)
    new = args.new or (64 if args.gpu else 16)
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
    attn = hf.register("patterndsl_streaming", source)
    decode = hasattr(attn, "decode")
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=prompt_len + new, **size)
    models = {}
    for impl in ("patterndsl_streaming", "sdpa"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(LlamaConfig(**config.to_dict()), attn_implementation=impl,
                                                        dtype=dtype).to(device).eval()
    prompt = torch.randint(0, 1024, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"{source}\nprompt {prompt_len} tokens, {new} generated, {size['num_hidden_layers']} layers, {device}")
    for impl, use_cache in (("patterndsl_streaming", decode), ("sdpa", True)):
        run(models[impl], prompt[:, :8], 2, use_cache)  # warm up (kernels, tables)
        tokens, rate, cache = run(models[impl], prompt, new, use_cache)
        how = "KV cache" if use_cache else "no KV cache: the prefix recomputed for each token (no decode path)"
        print(f"{impl:>22}: {rate:9.1f} tokens/s, cache {cache / 2**20:8.2f} MiB ({how})")


if __name__ == "__main__":
    main()
