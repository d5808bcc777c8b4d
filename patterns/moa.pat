# MoA (Fu et al., 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model
# Compression"): every head gets its own causal sliding window plus attention sinks, with an "elastic"
# span alpha + beta * N that grows with the input length; a profiler picks (alpha, beta) per head and
# layer. Modelled with head groups sharing a span: `moa` (16 heads, fixed spans) and `moa_elastic`
# (32 heads, spans alpha + N // m). The per-head values here are illustrative, not the profiled ones.
param sinks = 64
pattern moa = heads {
    0:4 => causal & (window(255) | sink(sinks))
    4:12 => causal & (window(2047) | sink(sinks))
    12:16 => causal & (window(127) | sink(sinks))
}
pattern moa_elastic = heads {
    0:8 => causal & (window(127 + N // 16) | sink(sinks))
    8:24 => causal & (window(511 + N // 8) | sink(sinks))
    24:32 => causal & (window(1023 + N // 4) | sink(sinks))
}
