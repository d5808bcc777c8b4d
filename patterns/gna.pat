# Generalized Neighborhood Attention (Hassani et al., 2025, "Generalized Neighborhood Attention:
# Multi-dimensional Sparse Attention at the Speed of Light"): neighborhood attention with a stride:
# queries are tiled in stride-sized groups that all use the window of the group's centre query (the
# right-hand one for an even stride, as in NATTEN), so whole tiles of queries share whole tiles of keys
# (stride 1 is NA; stride = kernel is blocked, Swin-like attention when the kernel divides the axis:
# `gna_blocked`, 15 x 15 tiles of a 60 x 60 map). An image of 64 x 64 tokens (kernel 16, stride 8)
# and a video latent of 16 x 32 x 32 tokens (kernel 8 x 16 x 16, stride 4 x 8 x 8; the paper's models
# use larger latents).
layout image = grid(64, 64)
layout video = grid(16, 32, 32)
pattern gna = neighborhood(image, kernel=16, stride=8)
layout tiles = grid(60, 60)
pattern gna_blocked = neighborhood(tiles, kernel=15, stride=15)
pattern gna_video = neighborhood(video, kernel=(8, 16, 16), stride=(4, 8, 8))
