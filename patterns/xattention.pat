# XAttention (Xu et al., 2025, "XAttention: Block Sparse Attention with Antidiagonal
# Scoring"): each query block keeps the fewest key blocks (128 x 128) whose softmax mass reaches the
# threshold tau = 0.9. Simplification: block importance here is mean(q) . mean(k), not the paper's sum
# of antidiagonal entries (stride 8), so the blocks picked can differ; the threshold rule is the same.
param tau = 0.9
param b = 128
pattern xattention = causal & threshold(tau, block=b)
