# Longformer (Beltagy, Peters and Cohan, 2020): a sliding window of w tokens on each side (the paper's
# window of 512 is 256 per side) plus global attention on task-chosen tokens ([CLS], question tokens),
# modelled here as the first g tokens; a dilated variant spaces the window's keys d apart. The
# autoregressive character-LM variant is causal, widens the window with depth (32 at the bottom to 512
# at the top) and dilates 2 of its 8 heads in the upper layers; `longformer_lm` writes that linear
# schedule as steps of two layers (a simplification).
param w = 256
param g = 16
param d = 4
pattern longformer = window(w) | global(0:g)
pattern longformer_dilated = window(w, dilation=d) | global(0:g)
pattern longformer_causal = causal & window(w)
model longformer_lm = layers(12) {
    0:2 => causal & window(32)
    2:4 => causal & window(64)
    4:6 => causal & window(128)
    6:8 => causal & window(256)
    8:10 => heads {
        0:2 => causal & window(256, dilation=2)
        2:8 => causal & window(384)
    }
    else => heads {
        0:2 => causal & window(512, dilation=2)
        2:8 => causal & window(512)
    }
}
