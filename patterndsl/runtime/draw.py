"""The draw behind `random(r, seed)`: a counter-based hash, identical on every run, machine and backend.

This is the one host definition of the draw. The reference mask, the interval classifier, the analysis and
the run-time CPU path call `random_keys`; the Triton kernels redraw the same words per query row
(`runtime.index.rdraw`), and a test holds the two equal.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on 64-bit words with full avalanche."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def counter_hash(seed: int, n: int, rows: np.ndarray, t: int) -> np.ndarray:
    """A pseudo-random 64-bit word for each (seed, n, row, t): a pure function, no global RNG."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + n) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        x = key ^ (rows.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))
        x = _mix64(x ^ _mix64(np.full_like(x, np.uint64(t & 0xFFFFFFFFFFFFFFFF)) + key))
    return x


def random_keys(rows: np.ndarray, n: int, r: int, seed: int) -> np.ndarray:
    """The keys `random(r, seed)` gives each query row: an int64 array [len(rows), min(r, n)].

    Floyd's sampling: for t = n - r .. n - 1, draw v uniform in [0, t]; take v unless it is already
    taken, then take t. Every row gets exactly min(r, n) distinct keys, and each step needs only the
    counter (seed, n, row, t), so any backend can rebuild any row alone.
    """
    rows = np.asarray(rows, dtype=np.int64)
    r = max(0, min(int(r), int(n)))
    keys = np.empty((rows.shape[0], r), dtype=np.int64)
    if r > 16:  # the same draw, with "already taken?" read from a bitmap instead of r comparisons
        block = max(1, (1 << 22) // max(1, n))
        for lo in range(0, rows.shape[0], block):
            part = rows[lo : lo + block]
            taken_map = np.zeros((part.shape[0], n), dtype=bool)
            at = np.arange(part.shape[0])
            for c, t in enumerate(range(n - r, n)):
                v = (counter_hash(seed, n, part, t) % np.uint64(t + 1)).astype(np.int64)
                chosen = np.where(taken_map[at, v], t, v)
                taken_map[at, chosen] = True
                keys[lo : lo + block, c] = chosen
        return keys
    for c, t in enumerate(range(n - r, n)):
        v = (counter_hash(seed, n, rows, t) % np.uint64(t + 1)).astype(np.int64)
        taken = (keys[:, :c] == v[:, None]).any(axis=1) if c else np.zeros(rows.shape[0], dtype=bool)
        keys[:, c] = np.where(taken, t, v)
    return keys
