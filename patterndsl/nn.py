"""`torch.nn` modules over compiled patterns (the shape NATTEN's `NeighborhoodAttention2D` gives its users)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import ir


class PatternAttention(nn.Module):
    """Multi-head attention whose score pattern is a compiled pattern: x [B, N, dim] -> [B, N, dim].

    `source` and `name` as `patterndsl.compile` takes them; `heads` query heads and `kv_heads` key/value
    heads (GQA when fewer; they must divide `heads`); q, k, v and the output projection are linear layers.
    `layer` picks a model's layer. The attention itself is `patterndsl.compile(...)`'s `Attention`, so it
    runs the Triton kernels on a GPU and the PyTorch path on a CPU, with gradients either way."""

    def __init__(self, source: str | Path | ir.Program | ir.Pattern, name: str | None = None, *, dim: int,
                 heads: int, kv_heads: int | None = None, bias: bool = False, layer: int | None = None,
                 defines: Mapping[str, str | int | float] | None = None, **compile_options: Any) -> None:
        super().__init__()
        from . import compile as compile_pattern

        kv_heads = heads if kv_heads is None else kv_heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim ({dim}) must divide into heads ({heads}), and kv_heads ({kv_heads}) divide heads")
        self.attn = compile_pattern(source, name, defines, **compile_options)
        self.heads, self.kv_heads, self.head_dim, self.layer = heads, kv_heads, dim // heads, layer
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y: torch.Tensor = self.attn(q, k.contiguous(), v.contiguous(), layer=self.layer)
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(B, N, -1))
        return out
