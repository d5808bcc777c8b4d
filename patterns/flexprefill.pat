# FlexPrefill (Lai et al., 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
# Long-Sequence Inference"): per query block, keep the fewest key blocks whose estimated attention mass
# reaches gamma, plus a local band. Simplifications: only the query-aware mode is modelled (its
# vertical-slash mode picks individual columns and diagonals from the data, which the language cannot
# select); blocks of 128, scores from mean-pooled q . k, and the per-head choice between modes is dropped.
param gamma = 0.9
param b = 128
pattern prefill = causal & (window(b * 2 - 1) | threshold(gamma, block=b))
