# Sliding Tile Attention (Zhang et al., 2025, "Fast Video Generation with Sliding Tile Attention"): the
# tokens of an image or video latent are stored tile by tile (tile-major order: every token of a tile of
# th x tw or tt x th x tw tokens before the next tile), and a query attends to whole key tiles, the k x k
# (x k) tiles around its own; near a border the window of tiles is shifted inward, not cut, so every
# query sees the same number of tiles (even kernels included), as in attention-gym's
# generate_sta_mask_mod_2d / _3d. A tile-major order is a grid of twice the axes: first the tile's place
# (tiles along H and W, or T, H and W), then the token's place inside its tile; the rule is a
# neighborhood whose kernel counts tiles on the outer axes and spans the whole tile on the inner ones.
# 2-D: a 64 x 64 image in 8 x 8 tiles, 3 x 3 tiles around each query. 3-D: a 16 x 32 x 32 video latent in
# 4 x 8 x 8 tiles, 3 x 3 x 3 tiles around each query.
param tiles_h = 8
param tiles_w = 8
param th = 8
param tw = 8
param kh = 3
param kw = 3
layout image = grid(tiles_h, tiles_w, th, tw)
pattern sta_2d = neighborhood(image, kernel=(kh, kw, th, tw))
param tiles_t = 4
param tiles_h3 = 4
param tiles_w3 = 4
param tt = 4
param kt = 3
layout video = grid(tiles_t, tiles_h3, tiles_w3, tt, th, tw)
pattern sta_3d = neighborhood(video, kernel=(kt, kh, kw, tt, th, tw))
