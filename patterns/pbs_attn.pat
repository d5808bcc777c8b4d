# PBS-Attn, Permuted Block-Sparse Attention (Wang et al., 2025, "Sparser Block-Sparse Attention via
# Token Permutation"): tokens are permuted within segments of s = 256 (the paper sorts each segment's keys
# by the attention the last query block pays them), so the keys a query block needs gather into few key
# blocks of b = 64; each query block keeps, among the blocks of earlier segments, the first block and the
# fewest others whose softmax mass of mean-pooled scores reaches tau = 0.9, and attends densely and
# causally inside its own segment. Permuting within segments keeps causality between segments.
# Two patterns over disjoint pairs, merged by log-sum-exp (patterndsl.runtime.positions.merge): `pbs`,
# the earlier segments in the order of the caller's permutation, and `pbs_diagonal`, the own segment in
# the caller's order. Call `pbs` with permutation=(identity, keys' order): PBS permutes keys only. One
# difference: the block always kept is the permuted order's first, not the one holding token 0.
param s = 256
param b = 64
param tau = 0.9
pattern pbs = permute(blockwise(s, causal - window(0)) & (sink(b) | threshold(tau, block=b)), segment=s, by=given)
pattern pbs_diagonal = causal & blockwise(s, window(0))
