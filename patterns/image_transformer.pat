# Image Transformer (Parmar, Vaswani, Uszkoreit, Kaiser, Shazeer, Ku and Tran, 2018): local
# self-attention for autoregressive image generation, with pixels in raster order. Local 1-D: the
# sequence is cut into query blocks of lq tokens, and a block attends to itself and the lm = lq tokens
# before it (the previous block), causally. Local 2-D: query blocks of qh x qw pixels attend to a memory
# that extends the block hm rows up and wm columns to each side, masked to the pixels before the query in
# raster order. Sizes are illustrative (a 64 x 64 image, one token per pixel; the paper also interleaves
# colour channels).
param lq = 256
param qh = 8
param qw = 32
param hm = 16
param wm = 16
layout image = grid(64, 64)
pattern local_1d = causal & blockwise(lq, window(1, 0))
pattern local_2d = causal & where(image, kc0 >= qc0 // qh * qh - hm and kc0 < qc0 // qh * qh + qh and kc1 >= qc1 // qw * qw - wm and kc1 < qc1 // qw * qw + qw + wm)
