# Swin Transformer (Liu et al., 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
# Windows"): attention inside non-overlapping 7 x 7 windows of a 56 x 56 map, alternating with windows
# shifted by 3. Swin's cyclic shift plus its mask is exactly the un-wrapped partition with cuts at
# 3, 10, 17, ...: window index (x + win - shift) // win on each axis, which is what `swin_shifted` says.
param win = 7
param shift = 3
layout image = grid(56, 56)
pattern swin = where(image, qc0 // win == kc0 // win and qc1 // win == kc1 // win)
pattern swin_shifted = where(image, (qc0 + win - shift) // win == (kc0 + win - shift) // win and (qc1 + win - shift) // win == (kc1 + win - shift) // win)
model swin_block = layers(2) {
    every 2 => swin
    else => swin_shifted
}
# The same partition written with blockwise on a 1-D sequence (local attention in non-overlapping blocks,
# as in BlockBERT/Image Transformer local 1-D attention).
param block = 64
pattern block_local = blockwise(block, window(0))
