# InfLLM-V2 (Zhao et al., 2025, "InfLLM-V2: Dense-Sparse Switchable Attention for Seamless Short-to-Long
# Adaptation"): trainable block selection that reuses dense attention's parameters. Each query attends to
# a few initial blocks, a local window and the top-k key blocks, scored through compressed (pooled) keys
# and chosen once for all query heads of a KV head (summed over the group), so that the selected KV
# blocks are loaded once per group. Simplifications: pooled keys are block means (the paper pools in
# overlapping stages); scores are the softmax attention of each query to the pooled keys, summed over the
# query block (score=compressed).
param w = 512
param b = 64
param n = 16
pattern infllm_v2 = causal & (window(w - 1) | sink(b) | topk(n, block=b, score=compressed, share=kv))
