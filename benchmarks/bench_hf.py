# ruff: noqa: B023  (the timing closures run inside their loop iteration)
"""A transformers model trained with patterndsl attention against its own `flex_attention` and `sdpa`, one run
(issue 22, item 7).

A ~125M-parameter Llama-style model (Ministral: hidden 768, 12 layers, 12 query heads, 4 key/value heads,
head_dim 64, vocab 32000) at 16k context, three sliding-window layers (window 4096) to each full one, bf16,
batch 1, random initialisation. One training step is forward + backward + AdamW. The three attention
implementations take turns step by step (interleaved, after warm-up), so drift hits all alike:

- patterndsl: the config's `patc from-hf` model pattern, `patterndsl.integrations.hf.register`;
- flex_attention: transformers' FlexAttention path (its BlockMask built by transformers each step; with 12
  query heads, not a power of two, transformers repeats k and v to 12 heads before calling Flex);
- sdpa: transformers' SDPA path (a dense mask for the sliding layers, `is_causal` for the full ones).

Every implementation is warmed up first (autotuning, Flex's torch.compile and BlockMask, the profiling
wrappers); then the timed steps (interleaved), then as many profiled steps for each (interleaved, medians).
Per implementation: training tokens/s (median step), peak memory, and the attention's own time in a
profiled step: the forward of each attention call and its backward (timing events around the call, and in
gradient hooks on its output and on q, k, v added after it), summed over layers, and the mask function's
time (where Flex builds its BlockMask). `compiled_in_window` counts graphs torch.compile made while timing
(must be 0).
Generation: greedy decoding tokens/s after a 32k prompt with window + sinks, at batch 1 and `GEN_BATCH` (8):
patterndsl over `hf.pattern_cache` (only the window's and sinks' pages kept) and over transformers' cache,
against sdpa; each warmed up by a generation after a prompt of the full length, the decode rate over the
decode steps alone. Figures that cannot be measurements (negative, a part longer than its whole, a
compilation while timing) are written as null, listed under "invalid", and the script exits with 1.
`BENCH_PARTS=training` or `generation`: only that part (default both).
`BENCH_SMOKE=1`: tiny sizes on CPU (checks the script, no Flex; clock times instead of CUDA events).

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
PROFILED = 1 if SMOKE else 3  # profiled steps per implementation (after a profiled warm-up step)
SIZE = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16) if SMOKE else
        dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64))
IMPLS = ("patterndsl", "sdpa") if SMOKE else ("patterndsl", "flex_attention", "sdpa")
START = time.perf_counter()
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "330"))
PARTS = os.environ.get("BENCH_PARTS", "training,generation").split(",")  # either or both


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


class _Stamp:
    """A point in time with the interface of a timing CUDA event: on the GPU the event (it records where the
    stream is, without a host sync), on the CPU the clock."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if DEV == "cuda" else None
        self.at = 0.0
        self.recorded = False

    def record(self) -> _Stamp:
        self.recorded = True
        if self.event is not None:
            self.event.record()
        else:
            self.at = time.perf_counter()
        return self

    def ms_until(self, later: _Stamp) -> float:
        """Milliseconds from this point to `later` (both recorded; on the GPU after a synchronize)."""
        if self.event is not None and later.event is not None:
            return float(self.event.elapsed_time(later.event))
        return 1e3 * (later.at - self.at)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process: a measurement window must add none (Flex compiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profiled_step(impl: str, model: Any, opt: Any, tokens: torch.Tensor) -> dict[str, float]:
    """One training step with the attention's own time (ms), summed over layers: the forward of each call
    of the implementation's attention function, its backward (from the output's gradient to the last of
    q's, k's and v's: hooks added after the call, so the function sees the tensors it always sees and
    torch.compile keeps its graphs), and the mask function (Flex builds its BlockMask there, once per mask
    kind and step; patterndsl's tables are cached). Both functions are wrapped in transformers' registries
    for this step only."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    registries = (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
    inner = tuple(r[impl] for r in registries)
    fwd: list[tuple[_Stamp, _Stamp]] = []
    masks: list[tuple[_Stamp, _Stamp]] = []
    bwd: list[tuple[_Stamp, list[_Stamp]]] = []

    def attention(module: Any, q: Any, k: Any, v: Any, mask: Any, **kwargs: Any) -> Any:
        a = _Stamp().record()
        out, weights = inner[0](module, q, k, v, mask, **kwargs)
        fwd.append((a, _Stamp().record()))
        if out.requires_grad:
            start, ends = _Stamp(), []
            out.register_hook(lambda g: (start.record(), g)[1])
            for t in (q, k, v):
                if t.requires_grad:
                    t.register_hook(lambda g: (ends.append(_Stamp().record()), g)[1])
            bwd.append((start, ends))
        return out, weights

    def mask_function(*args: Any, **kwargs: Any) -> Any:
        a = _Stamp().record()
        got = inner[1](*args, **kwargs)
        masks.append((a, _Stamp().record()))
        return got

    registries[0][impl], registries[1][impl] = attention, mask_function
    try:
        sync()
        began = _Stamp().record()
        step(model, opt, tokens)
        done = _Stamp().record()
        sync()
    finally:
        registries[0][impl], registries[1][impl] = inner
    f = sum(a.ms_until(b) for a, b in fwd)
    b = sum(start.ms_until(ends[-1]) for start, ends in bwd if start.recorded and ends)  # the last of q, k, v
    m = sum(a.ms_until(b) for a, b in masks)
    return {"step_ms": began.ms_until(done), "attention_fwd_ms": f, "attention_bwd_ms": b, "attention_ms": f + b,
            "mask_ms": m, "attention_and_mask_ms": f + b + m, "attention_calls": len(fwd), "backward_calls": len(bwd)}


class _Tokens:
    """A `generate` stopping criterion that stops nothing and stamps the time of each new token (the first
    one after the prompt's forward pass, then one per decode step)."""

    def __init__(self) -> None:
        self.stamps: list[_Stamp] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.stamps.append(_Stamp().record())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model: Any, prompt: torch.Tensor, new: int, given: dict[str, Any],
                   extra: dict[str, Any]) -> dict[str, Any]:
    """One greedy `generate` of `new` tokens: the prompt's forward pass with the first token, the decode
    steps alone (from the first token to the last: new - 1 steps), the whole call, and the cache's bytes."""
    from transformers import StoppingCriteriaList

    tokens = _Tokens()
    sync()
    began = _Stamp().record()
    result = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True,
                            stopping_criteria=StoppingCriteriaList([tokens]), **given, **extra)
    done = _Stamp().record()
    sync()
    stamps = tokens.stamps
    if len(stamps) != new:
        raise SystemExit(f"generate stamped {len(stamps)} tokens, asked for {new}")
    decode_s = stamps[0].ms_until(stamps[-1]) / 1e3
    return {"prefill_and_first_s": began.ms_until(stamps[0]) / 1e3, "decode_s": decode_s,
            "total_s": began.ms_until(done) / 1e3, "cache_bytes": _cache_bytes(result.cache),
            "decode_tokens_per_s": prompt.shape[0] * (new - 1) / decode_s if decode_s > 0 else float("nan")}


def generation(hf: Any, out: dict[str, Any], save: Any) -> None:
    """Greedy decoding tokens/s after a GEN_N-token prompt, at batch 1 and GEN_BATCH: a Llama-style model of the
    same size (no sliding_window: transformers keeps the whole cache) with `causal & (window(4095) | sink(4))`
    over `hf.pattern_cache` (the retained pages only, patterndsl's decode path) and over transformers' cache,
    against sdpa's full causal attention. Each implementation first generates a few tokens after a prompt of
    the full length (autotuning, kernel compilation); then the decode rate is batch * (new - 1) tokens over
    the time from the first new token to the last (CUDA events in a stopping criterion); cache memory as each
    cache holds it after the run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    n = 256 if SMOKE else 32768
    new = 4 if SMOKE else 64
    batches = (1, 2) if SMOKE else (1, int(os.environ.get("GEN_BATCH", "8")))
    pattern = f"causal & (window({WINDOW - 1}) | sink(4))"
    hf.register("patterndsl_streaming", f"pattern streaming = {pattern}")
    cfg = LlamaConfig(**SIZE, max_position_embeddings=n + new, tie_word_embeddings=False)
    out.update({"prompt": n, "new_tokens": new, "pattern": pattern, "batches": {}})
    runs = (("patterndsl_pattern_cache", "patterndsl_streaming", True),
            ("patterndsl_transformers_cache", "patterndsl_streaming", False), ("sdpa", "sdpa", False))
    for batch in batches:
        prompt = torch.randint(0, SIZE["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(2)).to(DEV)
        given = {"attention_mask": torch.ones_like(prompt), "pad_token_id": 0, "do_sample": False}
        got: dict[str, Any] = out["batches"].setdefault(str(batch), {})
        for label, impl, ours in runs:
            if time.perf_counter() - START > DEADLINE:
                out["note"] = "stopped at the deadline"
                break
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl,
                                                     dtype=DT).to(DEV).eval()
            with torch.no_grad():
                timed_generate(model, prompt, min(4, new), given, _cache_kwargs(hf, model, ours, n + new))  # warm-up
                got[label] = timed_generate(model, prompt, new, given, _cache_kwargs(hf, model, ours, n + new))
            save()
            del model
            if DEV == "cuda":
                torch.cuda.empty_cache()


def _cache_kwargs(hf: Any, model: Any, ours: bool, length: int) -> dict[str, Any]:
    """generate's keyword for a fresh pattern cache (none: transformers makes its own)."""
    return {"cache": hf.pattern_cache(model, max_length=length)} if ours else {}


def _cache_bytes(cache: Any) -> int:
    """Bytes of a cache's keys and values (a pattern cache counts its pages)."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if torch.is_tensor(t))


def ratios(result: dict[str, Any]) -> None:
    """patterndsl against each other implementation, where both figures stand."""
    def ratio(a: Any, b: Any) -> float | None:
        return a / b if isinstance(a, float) and isinstance(b, float) and a > 0 and b > 0 else None

    training = result["training"]
    ours = training.get("patterndsl", {})
    for other in IMPLS[1:] if ours else ():
        theirs = training[other]
        training[f"patterndsl_vs_{other}"] = {
            "tokens_per_s_ratio": ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
            "attention_speedup": ratio(theirs.get("attention_ms"), ours.get("attention_ms")),
            "attention_and_mask_speedup": ratio(theirs.get("attention_and_mask_ms"), ours.get("attention_and_mask_ms"))}
    for got in result.get("generation", {}).get("batches", {}).values():
        for label in ("patterndsl_pattern_cache", "patterndsl_transformers_cache"):
            if label in got and "sdpa" in got:
                got[f"{label}_speedup_vs_sdpa"] = ratio(got[label]["decode_tokens_per_s"],
                                                        got["sdpa"]["decode_tokens_per_s"])


def insane(result: dict[str, Any]) -> list[str]:
    """What in `result` cannot be a measurement (a negative or zero time, a part longer than its whole, a rate
    no step could reach, a compilation inside a timed window), each as one sentence; those figures are
    replaced by null so that no one quotes them."""
    problems: list[str] = []

    def bad(where: dict[str, Any], key: str, why: str) -> None:
        problems.append(f"{key} = {where[key]!r}: {why}")
        where[key] = None

    for impl, got in result.get("training", {}).items():
        if impl.startswith("patterndsl_vs_"):
            continue
        step_ms = got.get("median_step_ms")
        if not (isinstance(step_ms, float) and step_ms > 0):
            bad(got, "median_step_ms", f"{impl}: a step takes a positive time")
            continue
        for key in ("attention_fwd_ms", "attention_bwd_ms", "attention_ms", "mask_ms"):
            if key in got and not 0 <= got[key] < step_ms:
                bad(got, key, f"{impl}: a part of a step ({step_ms:.1f} ms, median) between 0 and the step")
        if "attention_and_mask_ms" in got and got["attention_and_mask_ms"] is not None \
                and not 0 < got["attention_and_mask_ms"] < 1.2 * step_ms:
            bad(got, "attention_and_mask_ms", f"{impl}: attention is a part of the step ({step_ms:.1f} ms)")
        if got.get("compiled_in_window") and got.get("attention_ms") is not None:
            bad(got, "attention_ms", f"{impl}: torch.compile made {got['compiled_in_window']} graphs while timing")
    for batch, runs in result.get("generation", {}).get("batches", {}).items():
        for label, got in runs.items():
            if not isinstance(got, dict):
                continue
            where = f"generation batch {batch}, {label}"
            if not 0 < got["prefill_and_first_s"] <= got["total_s"]:
                bad(got, "prefill_and_first_s", f"{where}: the prompt's pass is a positive part of the call")
            if not 0 < got["decode_s"] < got["total_s"]:
                bad(got, "decode_s", f"{where}: the decode steps are a positive part of the call")
                got["decode_tokens_per_s"] = None
            elif not 0 < got["decode_tokens_per_s"] < 1e6:
                bad(got, "decode_tokens_per_s", f"{where}: no 125M-parameter model decodes that fast")
    return problems


def training(cfg: Any, notes: list[str]) -> tuple[int, dict[str, Any]]:
    """(parameters, per implementation its training figures): warm-up, timed steps interleaved, then as many
    profiled steps for each, interleaved (see the module's docstring); what the deadline cut goes to `notes`."""
    models = {impl: build(impl, cfg) for impl in IMPLS}
    parameters = sum(p.numel() for p in models[IMPLS[0]][0].parameters())
    tokens = torch.randint(0, SIZE["vocab_size"], (1, N), generator=torch.Generator().manual_seed(1)).to(DEV)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    profiles: dict[str, list[dict[str, float]]] = {impl: [] for impl in IMPLS}
    compiled = dict.fromkeys(IMPLS, 0)  # graphs torch.compile made inside the timed and profiled steps
    peak = dict.fromkeys(IMPLS, 0.0)
    for impl in IMPLS:  # warm-up: autotuning, Flex's compilation and block masks, the profiled step's wrappers
        for _ in range(WARMUP):
            step(*models[impl], tokens)
        profiled_step(impl, *models[impl], tokens)
        sync()
    for _ in range(STEPS):
        if time.perf_counter() - START > DEADLINE and all(times.values()):
            notes.append("timed fewer steps: the deadline")
            break
        for impl in IMPLS:  # interleaved
            graphs = compiled_graphs()
            sync()
            t = time.perf_counter()
            step(*models[impl], tokens)
            sync()
            times[impl].append(time.perf_counter() - t)
            compiled[impl] += compiled_graphs() - graphs
    for _ in range(PROFILED):  # as many profiled steps for each, interleaved
        if time.perf_counter() - START > DEADLINE and all(profiles.values()):
            notes.append("profiled fewer steps: the deadline")
            break
        for impl in IMPLS:
            graphs = compiled_graphs()
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            profiles[impl].append(profiled_step(impl, *models[impl], tokens))
            compiled[impl] += compiled_graphs() - graphs
            if DEV == "cuda":
                peak[impl] = max(peak[impl], torch.cuda.max_memory_allocated() / 2**30)
    figures: dict[str, Any] = {}
    for impl in IMPLS:
        step_s = statistics.median(times[impl]) if times[impl] else float("nan")
        prof = {key: statistics.median(p[key] for p in profiles[impl]) for key in profiles[impl][0]}
        figures[impl] = {
            "step_ms": [1e3 * t for t in times[impl]], "median_step_ms": 1e3 * step_s, "tokens_per_s": N / step_s,
            "peak_memory_gib": peak[impl] if DEV == "cuda" else None, "profiled_steps": len(profiles[impl]),
            "compiled_in_window": compiled[impl], **{f"profiled_{k}" if k == "step_ms" else k: v
                                                     for k, v in prof.items()}}
    return parameters, figures


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

    def save() -> list[str]:
        """Write the results so far, figures that cannot be measurements as null (see `insane`)."""
        checked = copy.deepcopy(result)
        problems = checked["invalid"] = insane(checked)
        ratios(checked)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(checked, indent=1))
        return problems

    with tempfile.TemporaryDirectory() as tmp:
        source = pattern_source(cfg, Path(tmp))
        result["setup"]["pattern"] = source.read_text()
        hf.register("patterndsl", source, "ministral")
    if "training" in PARTS:
        result["setup"]["parameters"], result["training"] = training(cfg, result["notes"])
        save()
    if "generation" in PARTS:
        result["generation"] = {}
        generation(hf, result["generation"], save)
    problems = save()
    checked = json.loads(out_path.read_text())
    print(json.dumps({k: v for k, v in checked["training"].items() if k.startswith("patterndsl_vs_")}, indent=1))
    print(json.dumps({b: {k: v for k, v in runs.items() if k.endswith("_vs_sdpa")}
                      for b, runs in checked.get("generation", {}).get("batches", {}).items()}, indent=1))
    print(f"wrote {out_path}")
    if problems:
        print("figures refused (written as null):\n  " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
