# MASFormer (Zhang, Ram, Hawkins, Zha and Zhao, 2023, "MASFormer: Efficient Long-Sequence Transformers
# with Mixed Attention Spans"): a few layers keep full causal attention for long-range dependencies and
# the rest use a short causal sliding window. The paper studies where to put the full layers; written
# here as an evenly spread schedule (every 4th layer full) and with the full layers grouped at the bottom.
param depth = 24
param every_n = 4
param w = 1024
model masformer = layers(depth) {
    every every_n => causal
    else => causal & window(w - 1)
}
model masformer_bottom = layers(depth) {
    0:depth // every_n => causal
    else => causal & window(w - 1)
}
