# Dilated sliding window (Beltagy, Peters and Cohan, 2020, Longformer section 3.1), in the causal form
# used by patterndsl's benchmarks: 1024 keys spaced d = 4 apart (i - j in {0, 4, ..., 4092}), reaching
# about 4 x 1024 tokens back at the cost of a 1024-token window. window(r, dilation=d) spans r * d and
# keeps every d-th offset. Also the mix used by Longformer's character LM: a dense local window on some
# heads and dilated windows on others, so that the dilated heads see far and the dense ones see near.
param r = 1023
param d = 4
pattern dilated = causal & window(r, dilation=d)
pattern dilated_mix = heads {
    0:6 => causal & window(r)
    6:8 => causal & window(r, dilation=d)
}
