# MInference 1.0 (Jiang et al., 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
# Dynamic Sparse Attention"): each head is given one of three shapes offline. "A-shape": attention sinks
# plus a local window (static); "vertical-slash": the key columns and the diagonals (offsets i - j) that
# the last 64 queries attend to most, picked per head from the data at prefill (vertical and slash, scored
# by those queries' softmax summed per column and per diagonal); "block-sparse": the top-n key blocks of
# 64 tokens by mean-pooled q . k, which is exactly topk's score. MInference also always keeps the first
# 30 columns and the last 100 diagonals: here the sinks and the local window. AnchorAttention (Zhang et
# al., 2025) keeps key stripes (columns) whose scores come near an anchor (the row's largest score);
# simplification: written as vertical lines with MInference's scores and a fixed count.
param sinks = 64
param w = 1024
param n = 100
param v = 1000
param s = 6096
param last = 64
pattern a_shape = causal & (sink(sinks) | window(w - 1))
pattern vertical_slash = causal & (vertical(v, last=last) | slash(s, last=last) | sink(sinks) | window(w - 1))
pattern block_sparse = causal & (window(63) | topk(n, block=64))
pattern minference = heads {
    0:8 => causal & (sink(sinks) | window(w - 1))
    8:24 => causal & (vertical(v, last=last) | slash(s, last=last) | sink(sinks) | window(w - 1))
    24:32 => causal & (window(63) | topk(n, block=64))
}
