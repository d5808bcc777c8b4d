"""A transformers model config's attention as a `.pat` model: which layers slide and how far.

transformers' sliding layers (`create_sliding_window_causal_mask`) let query i see key j when
`i - sliding_window < j <= i`: the query and the `sliding_window - 1` keys before it, so
`sliding_window = w` is `causal & window(w - 1)`. Which layers slide is the config's `layer_types`, or,
for configs written before that field, each family's own rule (its configuration class's defaults).
Pure Python over the config's JSON: transformers need not be installed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..source import PatternError

SLIDING, FULL = "sliding_attention", "full_attention"

# Families whose layers are all alike: sliding when the config has a sliding_window (their modeling code
# reads `config.sliding_window` for every layer and ignores layer_types).
UNIFORM = ("mistral", "mixtral", "phi3", "starcoder2")
# Families with plain causal attention in every layer.
CAUSAL = ("llama", "gemma", "olmo", "olmo2", "granite")
# Families that name their layers (layer_types), with the default their config class derives when absent.
NAMED = ("gemma2", "gemma3", "gemma3_text", "cohere2", "gpt_oss", "olmo3", "qwen2", "qwen3", "ministral")


@dataclass(frozen=True)
class HFAttention:
    """What a config says about attention: the model's family, its window (None: no sliding layer) and each
    layer's type, plus notes on what changes scores rather than the mask (soft-capping, learned sinks)."""

    model_type: str
    sliding_window: int | None
    layer_types: tuple[str, ...]
    notes: tuple[str, ...]


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it as `text_config`)."""
    inner = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(inner, Mapping):
        return {"model_type": config.get("model_type"), **inner}
    return config


def read_attention(config: Mapping[str, Any]) -> HFAttention:
    """The attention a config describes, each layer's type as transformers' modeling code reads it."""
    cfg = text_config(config)
    model_type = str(cfg.get("model_type") or "")
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise PatternError(f"the config's num_hidden_layers must be a positive integer, got {layers!r}")
    if cfg.get("is_causal") is False or cfg.get("use_bidirectional_attention"):
        raise PatternError("the config makes attention bidirectional; patc from-hf reads causal language models")
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None  # their config classes drop the window unless use_sliding_window is set
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise PatternError(f"the config's sliding_window must be a positive integer or null, got {window!r}")
    types = _layer_types(cfg, model_type, layers, window)
    if SLIDING in types and window is None:
        raise PatternError("the config has sliding_attention layers but no sliding_window")
    notes = []
    if cfg.get("attn_logit_softcapping") is not None:
        notes.append(f"attn_logit_softcapping = {cfg['attn_logit_softcapping']} caps scores; the mask is unchanged")
    if model_type == "gpt_oss":
        notes.append("gpt_oss learns a sink logit per head (s_aux): scores, not keys; not expressed here")
    return HFAttention(model_type, window if SLIDING in types else None, types, tuple(notes))


def _layer_types(cfg: Mapping[str, Any], model_type: str, layers: int, window: int | None) -> tuple[str, ...]:
    given = cfg.get("layer_types")
    if model_type in UNIFORM or model_type in CAUSAL:
        uniform = (SLIDING if window is not None and model_type in UNIFORM else FULL,) * layers
        if given is not None and tuple(given) != uniform:
            raise PatternError(
                f"transformers' {model_type} models ignore the config's layer_types, which here differ from "
                f"what the model runs ({'sliding' if uniform[0] == SLIDING else 'full'} attention in every layer)",
                None, "remove layer_types, or use a family that reads them (ministral for a Mistral)",
            )  # fmt: skip
        return uniform
    if given is not None:
        if not isinstance(given, list) or len(given) != layers:
            raise PatternError(f"the config's layer_types must list one type per layer ({layers}), got {given!r}")
        for at, kind in enumerate(given):
            if kind not in (SLIDING, FULL):
                raise PatternError(
                    f"layer {at} is '{kind}'; patc from-hf reads '{SLIDING}' and '{FULL}' layers", None,
                    "chunked, linear and other layer kinds are not patterns of the attention mask",
                )  # fmt: skip
        return tuple(given)
    match model_type:
        case "gemma2" | "gpt_oss":
            return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
        case "gemma3" | "gemma3_text" | "cohere2":
            period = cfg.get("sliding_window_pattern", 4 if model_type == "cohere2" else 6)
            return tuple(SLIDING if (i + 1) % period else FULL for i in range(layers))
        case "olmo3":
            return tuple(SLIDING if (i + 1) % 4 else FULL for i in range(layers))
        case "qwen2" | "qwen3":
            start = cfg.get("max_window_layers", 28)
            return tuple(SLIDING if window is not None and i >= start else FULL for i in range(layers))
        case "ministral":
            return (SLIDING if window is not None else FULL,) * layers
    known = ", ".join(sorted(UNIFORM + CAUSAL + NAMED))
    raise PatternError(
        f"the config's model_type '{model_type}' is not one patc from-hf knows", None,
        f"give the config a layer_types list ('{SLIDING}' / '{FULL}' per layer), or use one of: {known}",
    )  # fmt: skip


def model_source(att: HFAttention, origin: str) -> str:
    """The `.pat` text of a config's attention: a `model` with a layer per config layer."""
    name = _identifier(att.model_type)
    lines = [f"# generated by patc from-hf from {origin} (model_type {att.model_type or 'unknown'})"]
    if att.sliding_window is not None:
        lines += [f"# transformers' sliding_window = {att.sliding_window}: a sliding layer's query sees itself "
                  f"and the {att.sliding_window - 1} keys before it", f"param w = {att.sliding_window}"]
    lines += [f"# note: {note}" for note in att.notes]
    used = [t for t in (FULL, SLIDING) if t in att.layer_types]
    if FULL in used:
        lines.append(f"pattern {FULL} = causal")
    if SLIDING in used:
        lines.append(f"pattern {SLIDING} = causal & window(w - 1)")
    lines.append(f"model {name} = layers({len(att.layer_types)}) {{")
    lines += [f"    {entry}" for entry in _entries(list(att.layer_types))]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _entries(kinds: list[str]) -> list[str]:
    """Model entries for a list of per-layer pattern names: the most common as `else`, the others as an
    `every n` when they fall on the multiples of n, else as ranges."""
    counts = Counter(kinds)
    common = max(counts, key=lambda k: (counts[k], k == FULL))
    other = [k for k in counts if k != common]
    if not other:
        return [f"else => {common}"]
    rare = other[0]
    at = [i for i, k in enumerate(kinds) if k == rare]
    for n in range(2, len(kinds) + 1):
        if at == list(range(0, len(kinds), n)):
            return [f"every {n} => {rare}", f"else => {common}"]
    runs: list[str] = []
    start = at[0]
    for prev, cur in zip(at, [*at[1:], None], strict=True):
        if cur != prev + 1:
            runs.append(f"{start}:{prev + 1} => {rare}")
            start = cur if cur is not None else start
    return [*runs, f"else => {common}"]


_RESERVED = {"param", "let", "layout", "pattern", "model", "layers", "heads", "every", "else", "and", "or", "not",
             FULL, SLIDING, "w"}


def _identifier(model_type: str) -> str:
    """The model's name in the file: its model_type as an identifier."""
    name = re.sub(r"\W", "_", model_type) or "hf"
    if name[0].isdigit() or name in _RESERVED:
        name = f"hf_{name}"
    return name
