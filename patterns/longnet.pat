# LongNet (Ding et al., 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens"): dilated
# attention. The sequence is cut into segments of w tokens and every r-th token of a segment attends to
# the other kept tokens of its segment; a geometric mix of (w, r) = (2048, 1), (4096, 2), (8192, 4) is
# combined, causal for language modelling. Head groups use different offsets (token t is kept for
# offset o when t % r == o) so that every token is covered by some head. Simplification: LongNet merges
# the configurations by weighting their outputs with their softmax denominators, which equals attention
# over the union of keys only when the configurations' key sets are disjoint; here it is the union.
param w = 2048
let seg1 = where(q // w == k // w)
let seg2_0 = where(q // (2 * w) == k // (2 * w) and q % 2 == 0 and k % 2 == 0)
let seg2_1 = where(q // (2 * w) == k // (2 * w) and q % 2 == 1 and k % 2 == 1)
let seg4_0 = where(q // (4 * w) == k // (4 * w) and q % 4 == 0 and k % 4 == 0)
let seg4_1 = where(q // (4 * w) == k // (4 * w) and q % 4 == 1 and k % 4 == 1)
let seg4_2 = where(q // (4 * w) == k // (4 * w) and q % 4 == 2 and k % 4 == 2)
let seg4_3 = where(q // (4 * w) == k // (4 * w) and q % 4 == 3 and k % 4 == 3)
let dilated_0 = seg2_0 | seg4_0
pattern longnet = causal & (seg1 | dilated_0)
pattern longnet_heads = heads {
    0:4 => causal & (seg1 | dilated_0)
    4:8 => causal & (seg1 | (seg2_1 | seg4_1))
    8:12 => causal & (seg1 | (seg2_0 | seg4_2))
    12:16 => causal & (seg1 | (seg2_1 | seg4_3))
}
