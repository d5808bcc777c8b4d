# Sparse Transformer (Child, Gray, Radford and Sutskever, 2019): factorized attention with stride
# l ~ sqrt(N). "strided": the previous l tokens plus every l-th token before (for data with a period,
# images, audio); "fixed": the query's own block of l tokens plus the last c tokens of every block (the
# "summary" columns, for text). Written as the merged head (union of both factors); the paper also
# interleaves the factors over heads (`strided_heads`) and gives head groups different summary columns
# (`fixed_heads`, here 4 head groups, each taking its own c columns of every block).
param l = 128
param c = 8
pattern strided = causal & (window(l - 1) | stride(l))
pattern fixed = causal & (blockwise(l, window(0)) | where(k % l >= l - c))
pattern strided_heads = heads {
    0:4 => causal & window(l - 1)
    4:8 => causal & stride(l)
}
pattern fixed_heads = heads {
    0:2 => causal & (blockwise(l, window(0)) | where(k % l >= l - c))
    2:4 => causal & (blockwise(l, window(0)) | where(k % l >= l - 2 * c and k % l < l - c))
    4:6 => causal & (blockwise(l, window(0)) | where(k % l >= l - 3 * c and k % l < l - 2 * c))
    6:8 => causal & (blockwise(l, window(0)) | where(k % l >= l - 4 * c and k % l < l - 3 * c))
}
