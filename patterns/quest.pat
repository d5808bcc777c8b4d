# Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"): the
# KV cache is cut into pages, each summarised by the elementwise minimum and maximum of its keys; a query
# scores a page by the upper bound sum_d max(q_d * max_d, q_d * min_d) of q . k over it and attends to the
# top-k pages. Here with pages of b = 16 tokens and, as prefill runs blocks of queries, the query
# block's mean query in place of the one decoding query (score=quest).
param b = 16
param n = 64
pattern quest_pages = causal & topk(n, block=b, score=quest)
