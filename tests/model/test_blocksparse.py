"""Block-sparse flash attention (the CPU default for long packed rows) against the reference."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import packed_rows, qkv

from jaxsft.model import attention as attn
from jaxsft.model.blocksparse import _blocks, blocksparse_attention, live_pairs


def value_and_grads(fn, q, k, v, seg, pos, window, softcap=None):
    valid = (seg > 0)[..., None, None]
    cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), q.dtype)

    def loss(q, k, v):
        out = fn(q, k, v, seg, seg, pos, pos, window, softcap=softcap)
        return (jnp.where(valid, out, 0) * cotangent).astype(jnp.float32).sum(), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


@pytest.mark.parametrize("block, window, heads, softcap", [
    (64, None, (8, 2), None), (100, None, (4, 4), None), (128, 50, (6, 2), None), (32, None, (4, 1), None),
    (512, None, (4, 2), None), (64, 40, (4, 2), 1.5)])
def test_matches_reference_forward_and_grad(block, window, heads, softcap):
    """Packed rows with padding, an empty-ish row, blocks that do not divide the row, GQA, a sliding window,
    Gemma 2's logit soft-capping (forward and the hand-written backward)."""
    rng = np.random.default_rng(0)
    H, K = heads
    T = 300
    seg, pos = packed_rows([(100, 60, 80), (300,), (7, 5, 150, 2, 90), (20,)], T)
    q, k, v = qkv(4, T, H, K, 32, jnp.float32, rng)
    (_, ref), ref_grads = value_and_grads(attn._xla_impl, q, k, v, seg, pos, window, softcap)
    (_, out), grads = value_and_grads(lambda *a, softcap: blocksparse_attention(*a, block, block, softcap), q, k, v,
                                      seg, pos, window, softcap)
    valid = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5)
    assert (np.asarray(out)[~valid] == 0).all()  # padding attends to nothing here
    for g, g_ref in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=5e-5)


def test_bfloat16_inputs():
    rng = np.random.default_rng(1)
    seg, pos = packed_rows([(90, 120, 40), (256,)], 256)
    q, k, v = qkv(2, 256, 4, 2, 64, jnp.bfloat16, rng)
    (_, ref), ref_grads = value_and_grads(attn._xla_impl, q, k, v, seg, pos, None)
    (_, out), grads = value_and_grads(lambda *a, softcap: blocksparse_attention(*a, 64, 64, softcap), q, k, v, seg,
                                      pos, None)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    valid = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out, np.float32)[valid], np.asarray(ref, np.float32)[valid], atol=2e-2)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=5e-2, rtol=5e-2)


def test_decode_shaped_queries_against_a_cache():
    """Fewer queries than keys, positions given explicitly (a cache with empty slots: segment 0)."""
    rng = np.random.default_rng(2)
    B, T, S = 2, 3, 40
    q, _, _ = qkv(B, T, 4, 2, 16, jnp.float32, rng)
    _, k, v = qkv(B, S, 4, 2, 16, jnp.float32, rng)
    seg_kv = jnp.asarray(np.r_[np.ones(30), np.zeros(10)][None].repeat(B, 0), jnp.int32)
    pos_kv = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    seg_q = jnp.ones((B, T), jnp.int32)
    pos_q = jnp.broadcast_to(jnp.arange(27, 30, dtype=jnp.int32), (B, T))
    ref = attn._xla_impl(q, k, v, seg_q, seg_kv, pos_q, pos_kv, None)
    out = blocksparse_attention(q, k, v, seg_q, seg_kv, pos_q, pos_kv, None, 16, 16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


def test_live_pairs_cover_every_visible_pair_and_skip_the_rest():
    """Every (query block, key block) pair holding a visible key is listed, in (i, j) order; for packed
    rows nothing above the diagonal or between examples that cannot meet is."""
    rng = np.random.default_rng(3)
    T, block = 512, 64
    seg, pos = packed_rows([(64, 64, 200, 100), (512,), (30, 400), (5,)], T)
    blocks = [_blocks(x, block) for x in (seg, pos, seg, pos)]
    pairs, count = live_pairs(*blocks, sliding_window=None)
    n = T // block + 1
    mask = np.asarray(attn.attention_mask(seg, seg, pos, pos) & (seg > 0)[:, :, None])  # padding sees nothing
    visible = mask.reshape(4, T // block, block, T // block, block).any(axis=(2, 4))
    for b in range(4):
        listed = np.asarray(pairs[b, :int(count[b])])
        assert (np.diff(listed) > 0).all()  # (i, j) order, no repeats
        live = {(p // n, p % n) for p in listed}
        needed = {(i, j) for i, j in zip(*np.nonzero(visible[b]))}
        assert needed <= live
        assert all(j <= i for i, j in live)
        assert (np.asarray(pairs[b, int(count[b]):]) == n * n - 1).all()  # idle slots: the spare blocks
    # Row 0: blocks 0 and 1 each hold one whole example; they see only themselves.
    assert {(p // n, p % n) for p in np.asarray(pairs[0, :int(count[0])])} >= {(0, 0), (1, 1)}
    assert (1, 0) not in {(p // n, p % n) for p in np.asarray(pairs[0, :int(count[0])])}
    # The one-example row needs the whole causal triangle; the 5-token row (the rest padding) only
    # its first block.
    assert int(count[1]) == (T // block) * (T // block + 1) // 2
    assert int(count[3]) == 1


def test_is_the_cpu_default_for_long_rows_and_trains_through_the_model():
    """`attention(impl='xla_blocksparse')` under jit and grad, as the model calls it."""
    rng = np.random.default_rng(4)
    seg, pos = packed_rows([(300, 200, 12)], 512)
    q, k, v = qkv(1, 512, 4, 2, 32, jnp.float32, rng)

    @partial(jax.jit, static_argnums=0)
    def grads(impl):
        def loss(q):
            out = attn.attention(q, k, v, seg, seg, impl=impl, q_positions_BT=pos, kv_positions_BS=pos)
            return (out ** 2).sum()
        return jax.grad(loss)(q)

    np.testing.assert_allclose(np.asarray(grads("xla_blocksparse")), np.asarray(grads("xla")), atol=1e-4)
