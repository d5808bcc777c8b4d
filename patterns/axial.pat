# Axial attention (Ho, Kalchbrenner, Weissenborn and Salimans, 2019, "Axial Attention in
# Multidimensional Transformers"): a layer attends along one axis of the image only, rows then columns,
# so two layers connect every pair of pixels. Their union is CCNet's criss-cross attention (Huang et al.,
# 2019). Sizes: a 64 x 64 map.
layout image = grid(64, 64)
pattern axial_row = where(image, qc0 == kc0)
pattern axial_col = where(image, qc1 == kc1)
pattern criss_cross = axial_row | axial_col
model axial = layers(2) {
    every 2 => axial_row
    else => axial_col
}
# Autoregressive (raster-order) axial attention, for image generation.
pattern axial_causal = causal & criss_cross
