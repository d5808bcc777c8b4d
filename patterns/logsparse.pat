# LogSparse Transformer (Li, Jin, Xuan, Zhou, Chen, Wang and Yan, 2019, "Enhancing the Locality and
# Breaking the Memory Bottleneck of Transformer on Time Series Forecasting"): each cell attends to itself
# and to the cells 1, 2, 4, 8, ... steps back, O(log N) keys per query; O(log N) layers connect every
# pair. `logsparse_local` is the paper's "local attention + LogSparse" variant with the last `local` cells
# kept densely. Simplification: the paper counts the exponential hops from the edge of the local window; here
# they are counted from the query (hops(2) has no offset), so a few hops fall inside the window.
param local = 16
pattern logsparse = causal & hops(2)
pattern logsparse_local = causal & (window(local) | hops(2))
