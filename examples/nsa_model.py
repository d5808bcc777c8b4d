"""NSA's attention layer (Yuan et al., 2025, "Native Sparse Attention") written with patterndsl: three
branches per query, gated per head in PyTorch.

- compressed: attention to the block means of keys and values (`runtime.compressed_attention`);
- selected: the top-n key blocks scored through the compressed branch, one choice per KV head
  (`topk(n, block=b, score=compressed, share=kv)`), with the first block and the diagonal's neighbours;
- window: the last w tokens (`causal & window(w - 1)`).

out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, the gates a sigmoid of a linear map of the layer's
input, per query and head. Run `python examples/nsa_model.py` for a small forward and backward on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import patterndsl as P
from patterndsl.runtime import compressed_attention


class NSAAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, block: int = 64, selected: int = 16, window: int = 512):
        super().__init__()
        self.heads, self.kv_heads, self.block = heads, kv_heads, block
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.gate = nn.Linear(dim, 3 * heads)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.selected = P.compile(
            f"pattern slc = causal & (sink({block}) | window({block - 1}) | "
            f"topk({selected}, block={block}, score=compressed, share=kv))\n"
        )
        self.window = P.compile(f"pattern win = causal & window({window - 1})\n")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o_cmp, _ = compressed_attention(q, k, v, self.block)
        o_slc = self.selected.attention(q, k, v)
        o_win = self.window.attention(q, k, v)
        g = torch.sigmoid(self.gate(x)).view(B, N, 3, self.heads).permute(2, 0, 3, 1)[..., None]
        o = torch.addcmul(torch.addcmul(g[0] * o_cmp, g[1], o_slc), g[2], o_win)  # three kernels, not five
        return self.out(o.transpose(1, 2).reshape(B, N, -1))


def main() -> None:
    torch.manual_seed(0)
    layer = NSAAttention(dim=64, heads=4, kv_heads=2, block=16, selected=2, window=32)
    x = torch.randn(1, 100, 64, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    print(f"NSA layer: out {list(y.shape)}, |dx| = {x.grad.norm():.4f}")


if __name__ == "__main__":
    main()
