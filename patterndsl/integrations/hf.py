"""A compiled pattern as a Hugging Face transformers attention implementation.

`register(name, source)` adds an attention function to transformers' `AttentionInterface` and a mask
function to its `AttentionMaskInterface` under `name`, so `from_config(cfg, attn_implementation=name)` (or
`from_pretrained`) runs the pattern in every attention layer; a `model` pattern gives layer
`module.layer_idx` its own. Keys and values keep the model's key/value heads (GQA). What the pattern cannot
honour is refused with one sentence on the first call that meets it, never run with another meaning:

- a layer whose sliding window (transformers' `sliding_window`, the keys a query sees, itself included)
  is narrower than the pattern's reach: transformers keeps only that window in its cache;
- a pattern that lets a query see a later key: the model is a causal language model;
- attention dropout in training, learned sink logits (`s_aux`), score soft-capping (`softcap`);
- a padding mask with holes, or a mask the model builds from its own overlays (image tokens);
- over transformers' KV cache: padding, or a sliding layer whose pattern reads absolute positions (its
  cache holds the window only).

Generation steps (fewer queries than keys) run bottom-right aligned: the queries are the last rows.
`pattern_cache(model)` is a cache for `generate` that keeps only the keys each layer's pattern can still
read, and steps through the decode path over its pages (`hf_cache`; padding allowed).

Padding (left or right) and packed sequences (position ids restarting, as transformers' flattening collator
writes them, or its `cu_seq_lens_q` keyword) run as packed documents (`cu_seqlens`): the pattern applies
within each document, counted from its first token, and no dense mask is built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .. import expr as E
from .. import ir

__all__ = ["pattern_cache", "register"]

MARK = "_patterndsl_layer"  # the attribute of the keys a pattern cache's update returns: their PatternLayer
MEMO = "_patterndsl_memo"  # the attribute of a mask or position ids tensor: what was read from it (`_memo`)
_T = TypeVar("_T")


def register(name: str, source: str | Path | ir.Program | ir.Pattern, pattern: str | None = None,
             defines: Mapping[str, str | int | float] | None = None) -> Any:
    """Compile `source` (`patterndsl.compile`'s arguments) and register it with transformers as attention
    implementation `name`, with its mask function. Returns the compiled `Attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .. import compile as compile_pattern
    from .. import load, loads
    from ..cli.common import select
    from ..compile import source_path

    if not isinstance(name, str) or not name or name in AttentionInterface._global_mapping \
            and not isinstance(getattr(AttentionInterface._global_mapping[name], "__self__", None), _Bridge):
        raise ValueError(f"attention implementation name must be a new non-empty string, got {name!r}")
    program: ir.Program | ir.Pattern  # checked here once: the cache reads each layer's pattern from it
    if isinstance(source, ir.Program) or not isinstance(source, str | Path):
        program = source
    else:
        path = source_path(source)
        program = load(path, defines) if path is not None else loads(str(source), "<string>", defines)
    item = select(program, pattern) if isinstance(program, ir.Program) else ir.PatternDef(pattern or "pattern", program)
    bridge = _Bridge(compile_pattern(program, pattern), item)
    AttentionInterface.register(name, bridge.attention)
    AttentionMaskInterface.register(name, bridge.mask)
    return bridge.attn


def pattern_cache(model: Any, *, page_size: int | None = None, max_append: int | None = None,
                  max_length: int | None = None) -> Any:
    """A transformers `Cache` for `model.generate(..., cache=pattern_cache(model))` that keeps, per layer, only
    the keys its pattern can still read (a window's ring of pages, sinks for ever), so a window with sinks
    generates in memory that does not grow with the context; layers whose pattern keeps every key keep
    transformers' own cache layer. `model` runs an attention implementation made by `register`. `page_size`:
    tokens per page (default: about 64, whole blocks of a blockwise pattern); `max_append`: the most tokens
    one step after the prompt adds (default: a page); `max_length`: the longest context (fixes the page
    table's width; without it the table doubles as needed). `memory_bytes()` says what it holds. See
    `hf_cache` for how a step runs."""
    from transformers import AttentionInterface

    from . import hf_cache

    config = model.config.get_text_config(decoder=True)
    name = getattr(config, "_attn_implementation", None)
    bridge = getattr(AttentionInterface._global_mapping.get(str(name)), "__self__", None)
    if not isinstance(bridge, _Bridge):
        raise ValueError(f"pattern_cache needs a model whose attn_implementation was registered by "
                         f"patterndsl.integrations.hf.register, got {name!r}")
    depth = config.num_hidden_layers
    match bridge.item:
        case ir.Model(_, schedule) if len(schedule) != depth:
            raise ValueError(f"model pattern '{bridge.item.name}' has {len(schedule)} layers but the model has "
                             f"{depth} (num_hidden_layers)")
        case ir.Model(_, schedule):
            bodies = list(schedule)
        case ir.PatternDef(_, body):
            bodies = [body] * depth
    return hf_cache.pattern_cache(model, bridge, bodies, page_size=page_size, max_append=max_append,
                                  max_length=max_length)


@dataclass
class _Bridge:
    """One registered pattern: the attention and mask functions transformers calls, the checked pattern or
    model it compiles (for `pattern_cache`), and the checks already passed (per layer, window and length),
    so each is paid once."""

    attn: Any
    item: ir.PatternDef | ir.Model
    checked: set[tuple[Any, ...]] = field(default_factory=set)
    reads_n: frozenset[int] = field(init=False)  # predicates that read N: checked again at each new length

    def __post_init__(self) -> None:
        self.reads_n = frozenset(p for p, free in enumerate(self.attn.spec.n_free) if not free)

    def mask(self, batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function: Any = None, attention_mask: torch.Tensor | None = None, use_vmap: bool = False,
             **kwargs: Any) -> torch.Tensor | None:
        """The 2-D padding mask [batch, keys] when some key is padding, else None: the pattern is the mask."""
        if use_vmap:
            raise ValueError("this model adds its own mask overlay (such as bidirectional image tokens), which a "
                             "patterndsl pattern cannot express")
        if attention_mask is None:
            return None
        padding = attention_mask[:, -kv_length:]
        if padding.shape[1] == kv_length and not any(pad_counts(padding)):
            return None
        return padding  # its padding counts go with it: the layers' checks read them without a host sync

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                  sliding_window: int | None = None, softcap: float | None = None,
                  position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """transformers' attention signature: q [B, H, Nq, D], k, v [B, Hkv, Nk, D] -> ([B, Nq, H, D], None)."""
        if dropout:
            raise ValueError(f"attention dropout ({dropout}) in training is not supported by patterndsl "
                             f"attention: set the config's attention_dropout to 0")
        if softcap is not None:
            raise ValueError(f"score soft-capping (softcap = {softcap}) is not supported by patterndsl attention: "
                             f"set the config's attn_logit_softcapping to None")
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise ValueError("learned sink logits (s_aux) are not supported by patterndsl attention; a pattern's "
                             "sink(n) keeps the first n keys instead")
        spec = self.attn.spec
        layer = None
        if spec.model_layers is not None:
            layer = getattr(module, "layer_idx", None)
            self._check_depth(module, layer)
        mine = getattr(key, MARK, None)  # a pattern cache's layer (hf_cache): it holds true positions
        if mine is not None and mine.bridge is not self:
            raise ValueError("this pattern cache was made for another attention implementation: build it with "
                             "pattern_cache(model) for the model that uses it")
        n_q = query.shape[2]
        n_k = key.shape[2] if mine is None else mine.length
        longest = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        at = longest if isinstance(longest, int) else int(n_k)
        # `stepping` is passed as a literal: under torch.compile with dynamic shapes n_q != n_k is symbolic,
        # and _reach_problem (a constant to the tracer) takes only constants
        if n_q != n_k and mine is None:  # over transformers' KV cache (a sliding layer's holds only its window)
            problem = self._reach_problem(layer, sliding_window, at, True)
        else:
            problem = self._reach_problem(layer, sliding_window, at, False)
        if not problem and self.reads_n and not torch.compiler.is_compiling() and self._reads_n(layer):
            problem = self._reach_problem(layer, sliding_window, n_k, n_q != n_k and mine is None)
        if problem:
            raise ValueError(problem)
        if mine is not None:  # the prompt over its own keys, then steps through attn.decode over the pages
            out = mine.attend(query, key, value, attention_mask, layer, scaling,
                              lambda: self._whole(query, key, value, attention_mask, layer, scaling, position_ids,
                                                  kwargs))
        elif n_q != n_k:  # a step over a KV cache: the queries are the last rows (bottom-right aligned)
            if attention_mask is not None:
                raise ValueError("a padding mask with a KV cache is not supported by patterndsl attention: "
                                 "generate unpadded sequences (one at a time, or of one length), or pass "
                                 "cache=patterndsl.integrations.hf.pattern_cache(model)")
            out = self.attn(query, key, value, layer=layer, scale=scaling)
        else:
            out = self._whole(query, key, value, attention_mask, layer, scaling, position_ids, kwargs)
        return out.transpose(1, 2), None

    def _whole(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
               layer: int | None, scaling: float | None, position_ids: torch.Tensor | None,
               kwargs: Mapping[str, Any]) -> torch.Tensor:
        """As many queries as keys: padding and packed sequences as documents, else one call."""
        if attention_mask is not None:
            return self._padded(query, key, value, attention_mask, layer, scaling)
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None and position_ids is not None:  # every layer gets the same tensor: read once per pass
            cu = _memo(position_ids, ("documents", query.shape[0], query.shape[2]),
                       lambda: _documents(query, position_ids, None, None))
        else:
            cu = _documents(query, position_ids, cu_q, cu_k)
        if cu is None:
            return self.attn(query, key, value, layer=layer, scale=scaling)  # type: ignore[no-any-return]
        return _flat(self.attn(*(_pack(t) for t in (query, key, value)), cu_seqlens=cu, layer=layer, scale=scaling),
                     query.shape)

    def _reads_n(self, layer: int | None) -> bool:
        """Some head of this layer reads N."""
        from ..runtime.common import _head_patterns

        pats = _head_patterns(self.attn.spec, layer)
        return pats in self.reads_n if isinstance(pats, int) else not self.reads_n.isdisjoint(pats)

    def _check_depth(self, module: torch.nn.Module, layer: Any) -> None:
        spec = self.attn.spec
        depth = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if depth is not None and depth != len(spec.model_layers):
            raise ValueError(f"model pattern '{spec.name}' has {len(spec.model_layers)} layers but the model has "
                             f"{depth} (num_hidden_layers)")
        if layer is None:
            raise ValueError(f"model pattern '{spec.name}' needs each attention module's layer_idx; "
                             f"{type(module).__name__} has none")

    @torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
    def _reach_problem(self, layer: int | None, window: int | None, n: int, stepping: bool = False) -> str:
        """Why the pattern cannot run here, or "": it reaches a later key, or a key older than the layer's
        sliding window, at length n (exact per-row first and last keys from the analyser's counts). Checked
        once per layer at the model's longest length: a predicate that does not read N only grows its rows
        with N, so that check covers every shorter call; others are checked again at each new length
        (eagerly; under torch.compile only at the longest). `stepping` (a step over a KV cache): a sliding
        layer's cache holds only the window, its keys counted from the window's start, so the pattern must
        read only i - j there. A constant to torch.compile: it runs while tracing, not in the graph. Passed
        checks are remembered per (the layer's head patterns, window, n, stepping): layers that share a
        pattern share its check."""
        from ..runtime.common import _head_patterns

        spec = self.attn.spec
        pats = _head_patterns(spec, layer)
        if (pats, window, n, stepping) in self.checked:
            return ""
        from ..analysis.count import predicate_stats
        from ..expr import offset_form

        where = "" if layer is None else f" in layer {layer}"
        for pat in sorted({pats} if isinstance(pats, int) else set(pats)):
            exprs = [spec.predicates[pat].expr]
            sel = spec.selectors[pat]
            if sel is not None:
                exprs.append(spec.predicates[sel.context].expr)
            bound = E.bind_n(E.disj(*exprs), n)
            if stepping and window is not None and offset_form(bound) is None:
                return (f"pattern '{spec.name}'{where} reads absolute positions, but transformers' cache of a "
                        f"sliding layer keeps only its window ({window} keys): drop the config's sliding_window "
                        f"to generate with it")
            stats = predicate_stats(bound, n)
            rows = np.flatnonzero(stats.counts)
            if np.any(stats.last[rows] > rows):
                i = int(rows[np.argmax(stats.last[rows] > rows)])
                return (f"pattern '{spec.name}'{where} lets query {i} see the later key {int(stats.last[i])} at "
                        f"N = {n}: a causal language model cannot honour that")
            if window is not None and rows.size and int(np.max(rows - stats.first[rows])) > window - 1:
                i = int(rows[np.argmax(rows - stats.first[rows])])
                return (f"the model's sliding_window{where} is {window} (each query sees {window - 1} keys back) "
                        f"but pattern '{spec.name}' lets query {i} see key {int(stats.first[i])} at N = {n}: "
                        f"widen or drop the config's sliding_window")
        self.checked.add((pats, window, n, stepping))
        return ""

    def _padded(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                layer: int | None, scale: float | None) -> torch.Tensor:
        """Left or right padding as packed documents: each row's run of real tokens is one document."""
        if mask.dim() != 2 or mask.shape != (query.shape[0], key.shape[2]):
            raise ValueError(f"patterndsl attention takes a 2-D padding mask [batch, keys] = "
                             f"{[query.shape[0], key.shape[2]]}, got shape {list(mask.shape)}")
        B, N = mask.shape
        where, cu = _memo(mask, ("runs",), lambda: _runs(mask))
        q, k, v = ((t.transpose(1, 2).reshape(B * N, t.shape[1], t.shape[3]))[where] for t in (query, key, value))
        got = self.attn(q, k, v, cu_seqlens=cu, layer=layer, scale=scale)
        out = query.new_zeros((B * N, query.shape[1], query.shape[3])).index_copy(0, where, got)
        return out.view(B, N, query.shape[1], query.shape[3]).transpose(1, 2)


def _runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the real tokens' flat indices, cu_seqlens) of a 2-D padding mask whose rows are each one run of real
    tokens; a mask with gaps is refused."""
    mask = mask.bool()
    B, N = mask.shape
    count = mask.sum(1)
    first = torch.where(count > 0, mask.int().argmax(1), 0)
    at = torch.arange(N, device=mask.device)
    if not bool(torch.equal(mask, (at >= first[:, None]) & (at < (first + count)[:, None]))):
        raise ValueError("the padding mask has gaps inside a row: patterndsl attention takes left or right "
                         "padding (one run of real tokens per row)")
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = count.cumsum(0)
    return mask.reshape(-1).nonzero().squeeze(1), cu


def pad_counts(mask: torch.Tensor) -> list[int]:
    """Padding tokens (zeros) per row of a 2-D mask [batch, keys]: read from the device once per mask tensor,
    which the mask function and every layer's cache share."""
    return _memo(mask, ("pads",), lambda: (mask.shape[1] - mask.bool().sum(1)).tolist())


def _memo(t: torch.Tensor, key: Hashable, compute: Callable[[], _T]) -> _T:
    """`compute()`, remembered on `t` until t changes in place. transformers hands every layer of a forward
    pass the same mask and position ids, and what is read from them on the host (documents, padding) costs a
    host sync, so it is read once per pass rather than once per layer. Under torch.compile, and for inference
    tensors (which keep no version to tell a change by): computed."""
    if torch.compiler.is_compiling() or t.is_inference():
        return compute()
    seen = t.__dict__.setdefault(MEMO, {})
    got = seen.get(key)
    if got is None or got[0] != t._version:
        got = seen[key] = (t._version, compute())
    return got[1]  # type: ignore[no-any-return]


def _documents(query: torch.Tensor, position_ids: torch.Tensor | None, cu_q: torch.Tensor | None,
               cu_k: torch.Tensor | None) -> torch.Tensor | None:
    """cu_seqlens over the batch rows laid end to end when the sequences are packed (transformers'
    `cu_seq_lens_q`, or position ids that restart), else None (one dense call)."""
    if cu_q is not None:
        if cu_k is not None and not torch.equal(cu_q, cu_k):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: patterndsl attention packs one set of documents")
        return cu_q.to(torch.int32)
    B, _, N, _ = query.shape
    if position_ids is None or N == 1:
        return None
    pos = position_ids.expand(B, N)
    restart = torch.ones((B, N), dtype=torch.bool, device=pos.device)
    restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if torch.compiler.is_compiling():
        torch._assert_async(restart[:, 1:].any().logical_not(),
                            "packed sequences under torch.compile need cu_seq_lens_q (return_flash_attn_kwargs)")
        return None
    if not bool(restart[:, 1:].any()):
        return None
    starts = restart.reshape(-1).nonzero().squeeze(1).to(torch.int32)
    return torch.cat([starts, starts.new_tensor([B * N])])


def _pack(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] as one packed row [1, H, B * N, D] (batch rows end to end)."""
    B, H, N, D = t.shape
    return t.transpose(0, 1).reshape(1, H, B * N, D)


def _flat(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of `_pack` for the output."""
    B, H, N, D = shape
    return out.reshape(H, B, N, D).transpose(0, 1)
