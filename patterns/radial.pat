# Radial Attention (Li et al., 2025, "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
# Long Video Generation"): attention scores decay with temporal distance, so the spatial band a token
# attends to in another frame halves each time the frame distance doubles: frames 2**m to 2**(m+1) - 1
# apart (m = log2 of the distance, 0 for distances 0 and 1) keep spatial offsets up to w0 // 2**m. With w0
# a power of two that is `offset <= 2**(log2(w0) - m)`, written with log2 as `log2(offset - 1) <
# log2(w0) - m` (x <= 2**e exactly when log2(x - 1) < e, for e >= 0), or offset 0 (kept at any distance). As in the paper, the tokens of a
# frame are one flattened axis (grid(frames, tokens)). Simplification: the paper thins out far frames
# once the band is narrower than one token; here the band just stops at the same position. `radial_2d`
# is a variant on a 2-D frame where the square spatial neighbourhood shrinks instead; `radial_causal` is
# the causal restriction. w0 and s0 are powers of two (any other value acts as the power of two below it).
param frames = 16
param tokens = 1024
param w0 = 512
layout video = grid(frames, tokens)
pattern radial = where(video, qc1 == kc1 or log2(abs(qc1 - kc1) - 1) < log2(w0) - max(0, log2(abs(qc0 - kc0))))
pattern radial_causal = causal & radial
param side = 32
param s0 = 16
layout video2d = grid(frames, side, side)
pattern radial_2d = where(video2d, qc1 == kc1 and qc2 == kc2 or log2(max(abs(qc1 - kc1), abs(qc2 - kc2)) - 1) < log2(s0) - max(0, log2(abs(qc0 - kc0))))
