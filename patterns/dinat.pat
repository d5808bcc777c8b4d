# DiNAT (Hassani and Shi, 2022, "Dilated Neighborhood Attention Transformer"): neighborhood attention
# whose neighbours are every d-th pixel, a sparse global receptive field at the cost of a 7 x 7 window.
# DiNAT alternates plain (NA) and dilated (DiNA) layers, and sets the dilation per stage to at most
# size // kernel: 8 on stage 1 (56 x 56), 4 on stage 2 (28 x 28), 2 on stage 3 (14 x 14).
param kernel = 7
layout stage1 = grid(56, 56)
layout stage2 = grid(28, 28)
pattern dinat = neighborhood(stage2, kernel=kernel, dilation=4)
pattern dinat_stage1 = neighborhood(stage1, kernel=kernel, dilation=8)
model dinat_block = layers(2) {
    every 2 => neighborhood(stage2, kernel=kernel)
    else => neighborhood(stage2, kernel=kernel, dilation=4)
}
