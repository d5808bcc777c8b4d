# Neighborhood Attention Transformer (Hassani, Walton, Li, Li and Shi, 2023, CVPR), as implemented by
# NATTEN: every pixel attends to the kernel x kernel pixels around it; at the borders the window is
# shifted inward, not cut, so every query has exactly kernel**2 keys. 56 x 56 tokens is NAT's first
# stage (224 x 224 input, 4 x 4 patches), kernel 7 as in the paper.
param height = 56
param width = 56
param kernel = 7
layout image = grid(height, width)
pattern nat = neighborhood(image, kernel=kernel)
# A causal 2-D neighborhood (raster order: rows above, and pixels to the left in the same row window).
pattern nat_causal = neighborhood(image, kernel=kernel, causal=(true, false)) & causal
