# SeerAttention (Gao et al., 2024, "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs"): a
# learned gate (AttnGate) scores blocks of 64 x 64 from pooled q and k, and each query block keeps its
# top-n key blocks; the scores come from the caller at run time (score=given). Simplification: the
# paper also selects by a threshold on the gate's softmax, which has no score=given form here.
param n = 8
param b = 64
pattern seer = causal & topk(n, block=b, score=given)
# With the diagonal and first block always kept (a common safety net in block-sparse decoders).
let safety = window(b - 1) | sink(b)
pattern seer_local = causal & (safety | topk(n, block=b, score=given))
