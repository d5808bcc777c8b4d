# BigBird (Zaheer et al., 2020), the BigBird-ITC form: attention on blocks of b = 64 tokens. Each query
# block sees its own block and one neighbour on each side (3 sliding blocks), g = 2 global blocks (the
# first tokens, which see and are seen by everything) and r = 3 random key blocks. Simplifications: the
# random blocks are drawn among all key blocks (the paper draws them outside the window and global
# blocks, so here a row may get fewer than r extra blocks); BigBird-ETC's extra global tokens are not
# modelled. `bigbird_causal` is the causal restriction for decoders (not in the paper).
param b = 64
param g = 2
param r = 3
param seed = 0
let fixed_blocks = window(1) | global(0:g)
pattern bigbird = blockwise(b, fixed_blocks | random(r, seed=seed))
pattern bigbird_causal = causal & bigbird
