"""A transformers `Cache` that keeps only the keys a layer's pattern can still read: `PatternKVCache` per layer.

`pattern_cache(model)` (re-exported as `patterndsl.integrations.hf.pattern_cache`) builds one for a model
whose `attn_implementation` was registered by `hf.register`: each layer whose pattern retains less than
every key (a window, sinks, a `model` schedule's sliding layers; `heads { }`: the union of its heads) gets a
`PatternLayer` backed by a `PatternKVCache`; the others keep transformers' own layer (the one
`DynamicCache(config=...)` would make). Pass it to `model.generate(..., cache=...)` (or `past_key_values=`,
the keyword's old name): transformers has no hook through which an attention implementation chooses
the cache `generate` makes, so without it generation runs over transformers' cache (same tokens, more
memory).

How a step runs. transformers calls the layer's `update(k, v)` and hands what it returns to the attention
function, which alone sees the padding mask. So `update` only counts the tokens and returns the new keys
marked with their layer; the attention function (`hf._Bridge`) gives them back to `PatternLayer.attend`:

- the prompt (the cache is empty): attention over the prompt's own keys (the pattern's ordinary forward,
  padding as documents), then only the keys a later query reads go into the pages
  (`PatternKVCache.append_attended`), so the prompt never occupies more than the retained pages;
- each later step (T <= `max_append` new tokens): append, then `attn.decode` over the pages with the page
  table. A page holds consecutive positions and the table maps each logical page to its physical one, so the
  kernel reads every retained key at its true position; evicted positions are never reached by the pattern,
  which is what made them evictable.

Left padding (`generate` over prompts of several lengths): each row is its own document, counted from its
first real token as in the prompt's forward, so each row gets its own `PatternKVCache` and its own decode
call. Beam search, assisted decoding (cropping) and cache reordering are refused with one sentence.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .. import ir
from ..analysis.retention import decode_consistent, retention
from ..cache import PatternKVCache, _positive
from .hf import MARK, _memo, pad_counts


class PatternLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One attention layer's cache: its pattern's retained keys in a PatternKVCache (one per row when the
    prompt is left-padded). Created empty; the first attention call fills it."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, body: ir.Body, bridge: Any, *, page_size: int | None = None, max_append: int | None = None,
                 max_length: int | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.body, self.bridge = body, bridge
        self.page_size, self.max_append, self.max_length = page_size, max_append, max_length
        self.length = 0  # tokens seen (the next query's position)
        self.store: PatternKVCache | None = None  # every row alike
        self.rows: list[PatternKVCache] | None = None  # one per row (left padding)
        self.pads: list[int] = []

    def __repr__(self) -> str:
        return f"PatternLayer({retention(self.body).text()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate before the first attention call, which sees the padding."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the new tokens and return their keys marked with this layer: the attention call stores them."""
        self.length += int(key_states.shape[-2])
        setattr(key_states, MARK, self)
        return key_states, value_states

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               layer: int | None, scale: float | None, whole: Any) -> torch.Tensor:
        """The attention output [B, H, T, Dv] of T new tokens, which this call stores. `whole()`: the
        bridge's attention of the prompt over its own keys (the first call)."""
        if self.store is None and self.rows is None:
            out = whole()
            self._fill(key, value, mask)
            return out  # type: ignore[no-any-return]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise ValueError("the pattern cache serves generation: steps over it carry no gradients (run under "
                             "torch.no_grad(), or train without a cache)")
        t = key.shape[2]
        most = self._stores()[0].max_append
        if t > most:
            raise ValueError(f"the pattern cache takes at most {most} new tokens per step after the prompt, got {t}: "
                             f"build it with pattern_cache(model, max_append={t})")
        if self.rows is None:
            assert self.store is not None
            if mask is not None:
                raise ValueError("the pattern cache was filled without padding but this step has a padding mask: "
                                 "start a new cache for a padded batch")
            self.store.append(key, value)
            return _decode(self.bridge.attn, query, self.store, layer, scale)
        self._check_padding(mask)
        outs = []
        for b, store in enumerate(self.rows):
            store.append(key[b:b + 1], value[b:b + 1])
            outs.append(_decode(self.bridge.attn, query[b:b + 1], store, layer, scale))
        return torch.cat(outs)

    def _fill(self, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Store the prompt's keys (each row's real tokens when left-padded): its queries attended in the
        forward pass, so only the keys later queries read are written (`append_attended`)."""
        if mask is None:
            self.store = self._new(key, value, key.shape[0])
            self.store.append_attended(key, value)
            return
        self.pads = _memo(mask, ("left",), lambda: _left_padding(mask))
        self.rows = [self._new(key, value, 1) for _ in self.pads]
        for b, (store, pad) in enumerate(zip(self.rows, self.pads, strict=True)):
            store.append_attended(key[b:b + 1, :, pad:], value[b:b + 1, :, pad:])

    def _check_padding(self, mask: torch.Tensor | None) -> None:
        """Later tokens are all real: the step's padding counts are the prompt's (read once per step: every
        layer gets the same mask)."""
        zeros = [0] * len(self.pads) if mask is None else pad_counts(mask)
        if zeros != self.pads:
            raise ValueError(f"the pattern cache was filled with left padding {self.pads} but this step's mask has "
                             f"{zeros} padding tokens per row: later tokens must all be real")

    def _new(self, key: torch.Tensor, value: torch.Tensor, batch: int) -> PatternKVCache:
        return PatternKVCache(self.body, batch=batch, kv_heads=key.shape[1], head_dim=key.shape[3],
                              value_dim=value.shape[3], page_size=self.page_size, max_append=self.max_append,
                              max_seqlen=self.max_length, dtype=key.dtype, device=key.device)

    def _stores(self) -> list[PatternKVCache]:
        return self.rows if self.rows is not None else [self.store] if self.store is not None else []

    def memory_bytes(self) -> int:
        """Bytes of the key and value pages held."""
        return sum(s.memory_bytes() for s in self._stores())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length, self.store, self.rows, self.pads = 0, None, None, []

    def offload(self) -> None:
        """The pages stay where they are (transformers' offloading moves `keys`, which this layer has not)."""

    def prefetch(self) -> None:
        """See `offload`."""

    def crop(self, tokens_to_remove: int) -> None:
        _refuse("cropping (assisted or speculative decoding)")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        _refuse("reordering (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        _refuse("repeating rows (beam search, several sequences per prompt)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        _refuse("selecting rows (contrastive search)")


class PatternCache(Cache):
    """transformers' Cache over `PatternLayer`s and transformers' own layers (see the module's doc)."""

    def memory_bytes(self) -> int:
        """Bytes of keys and values held by every layer (pages, or transformers' tensors)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PatternLayer):
                total += layer.memory_bytes()
            else:
                total += sum(int(t.nbytes) for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                             if torch.is_tensor(t))
        return total


def pattern_cache(model: Any, bridge: Any, bodies: list[ir.Body], *, page_size: int | None = None,
                  max_append: int | None = None, max_length: int | None = None) -> PatternCache:
    """The cache for `model`, whose layer l runs `bodies[l]` (hf.pattern_cache checks the model first)."""
    for name, value in (("page_size", page_size), ("max_append", max_append), ("max_length", max_length)):
        if value is not None:
            _positive(name, value)  # now, not at the first step of generate
    config = model.config.get_text_config(decoder=True)
    theirs = DynamicCache(config=config).layers
    if len(theirs) != len(bodies):
        raise ValueError(f"transformers' cache for this config has {len(theirs)} layers but the model has "
                         f"{len(bodies)} (num_hidden_layers): the pattern cache cannot pair them")
    layers: list[Any] = []
    for i, body in enumerate(bodies):
        keeps_less = decode_consistent(body)[0] and not retention(body).keeps_all
        attention = type(theirs[i]) in (DynamicLayer, DynamicSlidingWindowLayer)
        if keeps_less and attention:  # not a layer of linear attention, a shared or an indexed cache
            layers.append(PatternLayer(body, bridge, page_size=page_size, max_append=max_append,
                                       max_length=max_length))
        else:
            layers.append(theirs[i])
    return PatternCache(layers=layers)


def _decode(attn: Any, query: torch.Tensor, store: PatternKVCache, layer: int | None,
            scale: float | None) -> torch.Tensor:
    return attn.decode(query, store.k_pages, store.v_pages, store.cache_seqlens, page_table=store.page_table,  # type: ignore[no-any-return]
                       layer=layer, scale=scale)


def _left_padding(mask: torch.Tensor) -> list[int]:
    """Each row's padding tokens, after checking they all come before its real ones (left padding)."""
    real = mask.bool()
    count = real.sum(1)
    at = torch.arange(real.shape[1], device=real.device)
    if not bool(torch.equal(real, at >= (real.shape[1] - count)[:, None])):
        raise ValueError("the pattern cache takes left padding (each row's real tokens at its end, as generate "
                         "pads a batch of prompts), got a padding mask that is not")
    return (real.shape[1] - count).tolist()


def _refuse(what: str) -> None:
    raise ValueError(f"the pattern cache does not support {what}: generate with num_beams=1 and without an "
                     "assistant, or without cache=pattern_cache(...)")
