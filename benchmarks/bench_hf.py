# ruff: noqa: B023  (the timing closures run inside their loop iteration)
"""A transformers model trained with patterndsl attention against its own `flex_attention` and `sdpa`, one run
(issue 22, item 7).

A ~125M-parameter Llama-style model (Ministral: hidden 768, 12 layers, 12 query heads, 4 key/value heads,
head_dim 64, vocab 32000) at 16k context, three sliding-window layers (window 4096) to each full one, bf16,
batch 1, random initialisation. One training step is forward + backward + AdamW. The three attention
implementations take turns step by step (interleaved, after warm-up), so drift hits all alike:

- patterndsl: the config's `patc from-hf` model pattern, `patterndsl.integrations.hf.register`;
- flex_attention: transformers' FlexAttention path (its BlockMask built by transformers each step);
- sdpa: transformers' SDPA path (a dense mask for the sliding layers, `is_causal` for the full ones).

Per implementation: training tokens/s (median step), peak memory, and the attention's own time in a
step (forward and backward): CUDA events around each attention call and around its backward (an
identity autograd node on each side), summed over layers, in separate profiled steps.
Generation: greedy decoding tokens/s after a 32k prompt with window + sinks, at batch 1 and `GEN_BATCH` (8):
patterndsl over `hf.pattern_cache` (only the window's and sinks' pages kept) and over transformers' cache,
against sdpa. `BENCH_SMOKE=1`: tiny sizes on CPU (checks the script, no Flex).

    python benchmarks/bench_hf.py OUT.json
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runinfo import run_info  # noqa: E402

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
N = 64 if SMOKE else 16384
WINDOW = 16 if SMOKE else 4096
STEPS = 2 if SMOKE else 8  # timed steps per implementation
WARMUP = 1 if SMOKE else 3
SIZE = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16) if SMOKE else
        dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64))
IMPLS = ("patterndsl", "sdpa") if SMOKE else ("patterndsl", "flex_attention", "sdpa")
START = time.perf_counter()
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "330"))


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def config() -> Any:
    from transformers import MinistralConfig

    layers = SIZE["num_hidden_layers"]
    types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)]
    return MinistralConfig(**SIZE, sliding_window=WINDOW, layer_types=types, max_position_embeddings=N,
                           attention_dropout=0.0, tie_word_embeddings=False)


def pattern_source(cfg: Any, folder: Path) -> Path:
    """The config's attention as `patc from-hf` writes it."""
    from patterndsl.cli import main as patc

    (folder / "config.json").write_text(json.dumps({"model_type": "ministral", **cfg.to_dict()}))
    if patc(["from-hf", str(folder / "config.json"), "-o", str(folder / "model.pat"), "--force"]) != 0:
        raise SystemExit("patc from-hf failed")
    return folder / "model.pat"


def build(impl: str, cfg: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl, dtype=DT).to(DEV)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")


def step(model: Any, opt: Any, tokens: torch.Tensor) -> float:
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


class _Mark(torch.autograd.Function):
    """Identity whose backward records a CUDA event: around an attention call's backward."""

    @staticmethod
    def forward(ctx: Any, log: list, tag: str, *ts: torch.Tensor) -> Any:
        ctx.log, ctx.tag = log, tag
        return ts if len(ts) > 1 else ts[0]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ctx.log.append((ctx.tag, ev))
        return (None, None, *grads)


def attention_ms(impl: str, model: Any, opt: Any, tokens: torch.Tensor) -> dict[str, float]:
    """The attention's forward and backward time (ms) in one training step, summed over layers: the
    implementation's function wrapped (in transformers' registry, for this step only) with CUDA events."""
    from transformers import AttentionInterface

    if DEV != "cuda":
        return {}
    mapping = AttentionInterface._global_mapping
    inner = mapping[impl]
    fwd: list[tuple[Any, Any]] = []
    bwd: list[tuple[str, Any]] = []

    def timed(module: Any, q: Any, k: Any, v: Any, mask: Any, **kwargs: Any) -> Any:
        q, k, v = _Mark.apply(bwd, "end", q, k, v)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out, weights = inner(module, q, k, v, mask, **kwargs)
        b.record()
        fwd.append((a, b))
        return _Mark.apply(bwd, "start", out), weights

    mapping[impl] = timed
    try:
        step(model, opt, tokens)
        sync()
    finally:
        mapping[impl] = inner
    f = sum(a.elapsed_time(b) for a, b in fwd)
    starts = [ev for tag, ev in bwd if tag == "start"]
    ends = [ev for tag, ev in bwd if tag == "end"]
    b = sum(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return {"attention_fwd_ms": f, "attention_bwd_ms": b, "attention_ms": f + b}


def generation(hf: Any) -> dict[str, Any]:
    """Greedy decoding tokens/s after a GEN_N-token prompt, at batch 1 and GEN_BATCH: a Llama-style model of the
    same size (no sliding_window: transformers keeps the whole cache) with `causal & (window(4095) | sink(4))`
    over `hf.pattern_cache` (the retained pages only, patterndsl's decode path) and over transformers' cache,
    against sdpa's full causal attention. Decode rate = (new - 1) tokens over the time past the first token;
    cache memory as each cache holds it after the run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    n = 256 if SMOKE else 32768
    new = 4 if SMOKE else 64
    batches = (1, 2) if SMOKE else (1, int(os.environ.get("GEN_BATCH", "8")))
    pattern = f"causal & (window({WINDOW - 1}) | sink(4))"
    hf.register("patterndsl_streaming", f"pattern streaming = {pattern}")
    cfg = LlamaConfig(**SIZE, max_position_embeddings=n + new, tie_word_embeddings=False)
    out: dict[str, Any] = {"prompt": n, "new_tokens": new, "pattern": pattern, "batches": {}}
    runs = (("patterndsl_pattern_cache", "patterndsl_streaming", True),
            ("patterndsl_transformers_cache", "patterndsl_streaming", False), ("sdpa", "sdpa", False))
    for batch in batches:
        prompt = torch.randint(0, SIZE["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(2)).to(DEV)
        given = {"attention_mask": torch.ones_like(prompt), "pad_token_id": 0, "do_sample": False}
        got: dict[str, Any] = {}
        for label, impl, ours in runs:
            if time.perf_counter() - START > DEADLINE:
                out["note"] = "stopped at the deadline"
                break
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl,
                                                     dtype=DT).to(DEV).eval()
            seconds, held = {}, 0
            with torch.no_grad():
                model.generate(prompt[:, :64], max_new_tokens=4, min_new_tokens=4, attention_mask=given["attention_mask"][:, :64],
                               pad_token_id=0, do_sample=False, **_cache_kwargs(hf, model, ours, n + new))
                for k in (1, new):
                    extra = _cache_kwargs(hf, model, ours, n + new)
                    sync()
                    t = time.perf_counter()
                    result = model.generate(prompt, max_new_tokens=k, min_new_tokens=k, return_dict_in_generate=True,
                                            **given, **extra)
                    sync()
                    seconds[k] = time.perf_counter() - t
                    held = _cache_bytes(result.cache)
                    del result, extra
            got[label] = {"prefill_and_first_s": seconds[1], "total_s": seconds[new], "cache_bytes": held,
                          "decode_tokens_per_s": batch * (new - 1) / max(seconds[new] - seconds[1], 1e-9)}
            del model
            if DEV == "cuda":
                torch.cuda.empty_cache()
        for label in ("patterndsl_pattern_cache", "patterndsl_transformers_cache"):
            if label in got and "sdpa" in got:
                got[f"{label}_speedup_vs_sdpa"] = (got[label]["decode_tokens_per_s"]
                                                   / got["sdpa"]["decode_tokens_per_s"])
        out["batches"][str(batch)] = got
    return out


def _cache_kwargs(hf: Any, model: Any, ours: bool, length: int) -> dict[str, Any]:
    """generate's keyword for a fresh pattern cache (none: transformers makes its own)."""
    return {"cache": hf.pattern_cache(model, max_length=length)} if ours else {}


def _cache_bytes(cache: Any) -> int:
    """Bytes of a cache's keys and values (a pattern cache counts its pages)."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if torch.is_tensor(t))


def main() -> None:
    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results/hf_h100.json")
    warnings.filterwarnings("ignore", message="patterndsl .*not the fast")
    if SMOKE:
        torch.set_num_threads(1)  # tiny matrices
    import tempfile

    import transformers

    from patterndsl.integrations import hf

    cfg = config()
    result: dict[str, Any] = {"run": {**run_info(), "transformers": transformers.__version__},
                              "setup": {"N": N, "window": WINDOW, "dtype": str(DT), **SIZE,
                                        "layer_types": cfg.layer_types, "steps": STEPS, "warmup": WARMUP},
                              "training": {}, "notes": []}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        source = pattern_source(cfg, Path(tmp))
        result["setup"]["pattern"] = source.read_text()
        hf.register("patterndsl", source, "ministral")
    models = {impl: build(impl, cfg) for impl in IMPLS}
    result["setup"]["parameters"] = sum(p.numel() for p in models[IMPLS[0]][0].parameters())
    tokens = torch.randint(0, SIZE["vocab_size"], (1, N), generator=torch.Generator().manual_seed(1)).to(DEV)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for impl in IMPLS:  # warm-up: autotuning, Flex's compilation
        for _ in range(WARMUP):
            step(*models[impl], tokens)
        sync()
    for _ in range(STEPS):
        for impl in IMPLS:  # interleaved
            if time.perf_counter() - START > DEADLINE:
                result["notes"].append("stopped at the deadline")
                break
            sync()
            t = time.perf_counter()
            step(*models[impl], tokens)
            sync()
            times[impl].append(time.perf_counter() - t)
    for impl in IMPLS:
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prof = attention_ms(impl, *models[impl], tokens)
        step_s = statistics.median(times[impl]) if times[impl] else float("nan")
        result["training"][impl] = {
            "step_ms": [1e3 * t for t in times[impl]], "median_step_ms": 1e3 * step_s, "tokens_per_s": N / step_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None, **prof}
        save()
    ours = result["training"]["patterndsl"]
    for other in IMPLS[1:]:
        theirs = result["training"][other]
        result["training"][f"patterndsl_vs_{other}"] = {
            "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "attention_speedup": (theirs["attention_ms"] / ours["attention_ms"]) if "attention_ms" in ours else None}
    del models
    result["generation"] = generation(hf)
    save()
    print(json.dumps(result["training"], indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
