# StreamingLLM (Xiao, Tian, Chen, Han and Lewis, 2023, "Efficient Streaming Language Models with
# Attention Sinks"): a causal sliding window over the w most recent tokens plus the first `sinks`
# tokens, which soak up attention mass ("attention sinks"; 4 in the paper). Simplification: the paper
# re-numbers positions inside the cache for RoPE; that changes positions, not the mask.
param w = 1024
param sinks = 4
let local = causal & window(w - 1)
pattern streaming = local | (causal & sink(sinks))
# LM-Infinite (Han et al., 2023) uses the same Lambda-shaped mask with a longer local branch.
pattern lm_infinite = causal & (window(4095) | sink(10))
