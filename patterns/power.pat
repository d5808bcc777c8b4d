# PowerAttention (Chen et al., 2025, "PowerAttention: Exponentially Scaling of Receptive Fields for
# Effective Sparse Attention"): block-sparse attention (blocks of b = 64 tokens) where each query block
# sees the key blocks 1, 2, 4, 8, ... blocks back plus its own and the previous block, so the receptive
# field doubles with each layer (exponential in depth) at O(log N) blocks per query.
param b = 64
pattern power = causal & blockwise(b, hops(2) | window(1))
# The same with StreamingLLM-style sink tokens and a longer dense local band, as used for long-context
# evaluation (an illustrative combination, not from the paper).
pattern power_sink = causal & (blockwise(b, hops(2) | window(1)) | sink(b))
