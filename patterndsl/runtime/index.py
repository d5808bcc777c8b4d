"""Triton helpers that rendered predicates call (a generated module imports them by name).

Triton's `//` and `%` truncate toward zero; the language floors, so `fdiv` and `fmod` floor. `rkey` and
`rdraw` redraw `random(r, seed)`'s keys per query row from the same counter hash as the host's
`runtime.draw.random_keys` (SplitMix64 finaliser, Floyd's sampling), so the kernel needs no table.
"""

import triton
import triton.language as tl


@triton.jit
def fdiv(a, b):
    """Floor division."""
    q = a // b
    return q - ((q * b != a) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def fmod(a, b):
    """Floor modulo: the result has the divisor's sign, as in Python."""
    return a - fdiv(a, b) * b


@triton.jit
def mix64(x):
    """SplitMix64's finaliser on uint64 words."""
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def rkey(n, SEEDG: tl.constexpr):
    """The draw's key for a sequence of n tokens (SEEDG: the seed times the golden-ratio constant, mod 2**64)."""
    return mix64(n.to(tl.uint64) + SEEDG)


@triton.jit
def rdraw(key, row, t):
    """Floyd's step-t candidate for `row`: uniform in [0, t] (t >= 0)."""
    x = key ^ (row.to(tl.uint64) * 0xD1B54A32D192ED03)
    h = mix64(x ^ mix64(tl.maximum(t, 0).to(tl.uint64) + key))
    return (h % (tl.maximum(t, 0) + 1).to(tl.uint64)).to(tl.int64)
