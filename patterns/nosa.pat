# NOSA (Huang et al., 2025, "NOSA: Native and Offloadable Sparse Attention"): trainable block-sparse
# attention whose selection is split into a query-aware part (the top-scored key blocks for the query
# block) and a query-agnostic part (blocks kept whatever the query asks, from a score the model computes
# without the query), so that the blocks a decoding step needs stay local enough to offload the KV cache.
# Here both parts are selectors of one pattern over blocks of b = 64 tokens, beside a sliding window and
# the first block: topk(n_q) by mean-pooled q . k, and topk(n_a) by the caller's scores (score=given),
# which for a query-agnostic score repeat one row for every query block. Simplification: NOSA's block
# scores come from its compressed branch (as in NSA / InfLLM-v2); here they are mean-pooled q . k.
param w = 512
param b = 64
param n_q = 12
param n_a = 4
let local = window(w - 1) | sink(b)
pattern nosa = causal & (local | topk(n_q, block=b) | topk(n_a, block=b, score=given))
