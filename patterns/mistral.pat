# Mistral 7B (Jiang et al., 2023): sliding-window attention (SWA). Each query sees itself and the
# w - 1 tokens before it (w = 4096 in Mistral 7B); through k layers information travels up to k * w
# tokens back. The rolling-buffer KV cache is an implementation detail and does not change the mask.
param w = 4096
pattern mistral = causal & window(w - 1)
