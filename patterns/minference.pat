# MInference 1.0 (Jiang et al., 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
# Dynamic Sparse Attention"): each head is given one of three shapes offline. "A-shape": attention sinks
# plus a local window (static); "block-sparse": the top-n key blocks of 64 tokens by mean-pooled q . k,
# which is exactly topk's score. Not modelled: the "vertical-slash" shape, which picks individual key
# columns and diagonals from the data at run time (no token-level dynamic selector in the language).
param sinks = 64
param w = 1024
param n = 100
pattern a_shape = causal & (sink(sinks) | window(w - 1))
pattern block_sparse = causal & (window(63) | topk(n, block=64))
pattern minference = heads {
    0:16 => causal & (sink(sinks) | window(w - 1))
    16:32 => causal & (window(63) | topk(n, block=64))
}
