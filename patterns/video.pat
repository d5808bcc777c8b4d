# 3-D neighborhood attention on a video latent with causal time (NATTEN; Hassani, Hwu and Shi,
# 2024, "Faster Neighborhood Attention"; causal masking per axis): every token sees the current and the
# previous kt - 1 frames, and a ks x ks spatial neighbourhood in each, so frames can be generated in order.
# 16 frames of 32 x 32 tokens by default. Also: a bidirectional 3-D neighbourhood, and frame-causal attention
# (full attention to the current and all earlier frames, as in autoregressive video diffusion).
param frames = 16
param height = 32
param width = 32
param kt = 3
param ks = 9
layout video = grid(frames, height, width)
pattern video_causal = neighborhood(video, kernel=(kt, ks, ks), causal=(true, false, false))
pattern video_na = neighborhood(video, kernel=(kt, ks, ks))
pattern frame_causal = where(video, kc0 <= qc0)
