# TidalDecode (Yang, Zhang, Chen, Li and Jia, 2024, "TidalDecode: Fast and Accurate LLM Decoding with
# Position Persistent Sparse Attention"), for a 32-layer Llama: the first layers use full attention, one
# of them (layer 2) and a middle "re-selection" layer (13) pick the top-k tokens, and every other layer
# attends only to those tokens. Simplifications: the language has no cross-layer reuse, so each sparse
# layer selects for itself (topk on mean-pooled blocks of b tokens: n * b = 2048 tokens) instead of
# reusing the selection of layer 2 or 13; TidalDecode selects single tokens while decoding one query.
param depth = 32
param reselect = 13
param n = 128
param b = 16
model tidaldecode = layers(depth) {
    0:3 => causal
    reselect:reselect + 1 => causal
    else => causal & topk(n, block=b)
}
