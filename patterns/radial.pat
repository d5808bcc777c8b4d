# Radial Attention (Li et al., 2025, "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
# Long Video Generation"): attention scores decay with temporal distance, so the spatial band a token
# attends to in another frame halves each time the frame distance doubles: frames 2**m or more apart
# keep only spatial offsets up to w0 // 2**m (frame distance 0 or 1: up to w0). As in the paper, the
# tokens of a frame are one flattened axis (grid(frames, tokens)). Simplification: the paper thins out
# far frames once the band is narrower than one token; here the band just stops at the same position,
# and the halving is written out up to 2**4 frames apart. `radial_2d` is a variant on a 2-D frame where
# the square spatial neighbourhood shrinks instead; `radial_causal` is the causal restriction.
param frames = 16
param tokens = 1024
param w0 = 512
layout video = grid(frames, tokens)
pattern radial = where(video, abs(qc1 - kc1) <= w0 and (abs(qc0 - kc0) < 2 or 2 * abs(qc1 - kc1) <= w0) and (abs(qc0 - kc0) < 4 or 4 * abs(qc1 - kc1) <= w0) and (abs(qc0 - kc0) < 8 or 8 * abs(qc1 - kc1) <= w0) and (abs(qc0 - kc0) < 16 or 16 * abs(qc1 - kc1) <= w0))
pattern radial_causal = causal & radial
param side = 32
param s0 = 16
layout video2d = grid(frames, side, side)
pattern radial_2d = where(video2d, max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0 and (abs(qc0 - kc0) < 2 or 2 * max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0) and (abs(qc0 - kc0) < 4 or 4 * max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0) and (abs(qc0 - kc0) < 8 or 8 * max(abs(qc1 - kc1), abs(qc2 - kc2)) <= s0))
