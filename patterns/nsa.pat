# Native Sparse Attention (Yuan et al., 2025, "Native Sparse Attention: Hardware-Aligned and Natively
# Trainable Sparse Attention"): three causal branches, a sliding window of w = 512 tokens, the n = 16
# top-scored key blocks of b = 64 tokens, and the first block always kept. Simplifications: NSA's
# compressed branch (attention to pooled block summaries) and the learned gates mixing the branches are
# not masks and are not modelled; block scores are mean-pooled q . k (NSA derives them from the
# compressed branch's attention), and NSA's "2 local blocks always selected" is covered by the window.
param w = 512
param n = 16
param b = 64
let local = window(w - 1) | sink(b)
pattern nsa = causal & (local | topk(n, block=b))
# Closer to the paper: block scores from the compressed branch (each query's softmax over the mean-pooled
# keys, summed over the query block) and one selection per KV head from the sum over its query heads, as
# NSA's GQA-shared selection. NSA's compression is a learned MLP over overlapping blocks; here the mean.
pattern nsa_shared = causal & (local | topk(n, block=b, score=compressed, share=kv))
