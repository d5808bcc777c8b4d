# Gemma 2 (Gemma Team, 2024) and Gemma 3 (Gemma Team, 2025): interleaved local and global layers. Gemma 2
# alternates a causal sliding window of 4096 tokens (even layers) with full causal attention (odd layers),
# 42 layers for the 9B model; Gemma 3 runs five local layers with a 1024-token window for each global
# layer (34 layers for the 4B model). The logit soft-capping of Gemma 2 does not change the mask.
param w2 = 4096
param w3 = 1024
model gemma2 = layers(42) {
    every 2 => causal & window(w2 - 1)
    else => causal
}
model gemma3 = layers(34) {
    5:6 => causal
    11:12 => causal
    17:18 => causal
    23:24 => causal
    29:30 => causal
    else => causal & window(w3 - 1)
}
