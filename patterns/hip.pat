# HiP Attention (Lee et al., 2024, "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical
# Attention Pruning"): each block of b_q queries keeps its top-k key blocks, key blocks much smaller than
# query blocks (b_q = 64 queries by b_k = 16 keys here), so that the kept keys follow the attention's
# fine structure while queries still share one selection. Simplification: HiP finds its top-k by a
# hierarchical tournament over key chunks (an approximation of the top-k, sub-quadratic to compute);
# here the exact top-k of the blocks' scores, the largest q-bar . k_j in each key block (score=max).
param w = 256
param n = 64
pattern hip = causal & (window(w - 1) | sink(16) | topk(n, block=(64, 16), score=max))
