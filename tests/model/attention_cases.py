"""Packed attention inputs shared by the attention tests."""

import jax.numpy as jnp
import numpy as np


def packed_rows(lengths_per_row, T):
    """Segment ids and per-segment positions of rows packed with examples of the given lengths;
    the rest of each row is padding (segment 0)."""
    seg = np.zeros((len(lengths_per_row), T), np.int32)
    pos = np.zeros((len(lengths_per_row), T), np.int32)
    for b, lengths in enumerate(lengths_per_row):
        at = 0
        for s, n in enumerate(lengths, start=1):
            seg[b, at:at + n], pos[b, at:at + n] = s, np.arange(n)
            at += n
    return jnp.asarray(seg), jnp.asarray(pos)


def qkv(B, T, H, K, D, dtype, rng):
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))
