# SparseD (Wang et al., 2025, "SparseD: Sparse Attention for Diffusion Language Models"): diffusion
# language models attend in both directions, and SparseD keeps for each query block only the key blocks
# of highest attention score, a fixed share of them (the top 30% here), rather than a fixed count: the
# budget grows with the sequence. topk(0.3, ...) keeps ceil(0.3 * c) of a query block's c candidate key
# blocks. Simplifications: SparseD computes its head-specific selection once, from full attention at an
# early denoising step, reuses it for later steps and keeps early steps dense; here the selection is made
# at each call from mean-pooled q . k (a caller holding SparseD's scores passes them with score=given).
param b = 64
param share = 0.3
pattern sparsed = topk(share, block=b)
# The same budget over the caller's scores, e.g. those of an earlier denoising step.
pattern sparsed_given = topk(share, block=b, score=given)
