"""NEFTune: uniform noise alpha / sqrt(L * d) on the input embeddings, L each example's own length, in the
training forward only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsft.config_load import build_config
from jaxsft.model.config import ModelConfig
from jaxsft.model.transformer import embed, final_norm, hidden_states, init_params, neftune_noise, run_layers
from jaxsft.optim import build_optimizer
from jaxsft.params import flatten, full_partition, split
from jaxsft.step import ModelRunner, init_state, make_eval_step, make_train_step

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
ALPHA, D = 5.0, 64


def _packed_segments():
    """Two rows: examples of 40, 100 and 7 tokens packed, then padding; one example of 160 tokens alone."""
    seg = np.zeros((2, 160), np.int32)
    seg[0, :40], seg[0, 40:140], seg[0, 140:147] = 1, 2, 3
    seg[1, :] = 1
    return seg


def test_noise_scale_per_example_matches_the_formula():
    seg = _packed_segments()
    noise = np.asarray(neftune_noise(jax.random.key(0), jnp.asarray(seg), D, ALPHA))
    for r, spans in ((0, [(0, 40), (40, 140), (140, 147)]), (1, [(0, 160)])):
        for a, b in spans:
            bound = ALPHA / np.sqrt((b - a) * D)  # the example's own length, not the row's
            x = noise[r, a:b]
            assert np.abs(x).max() <= bound * (1 + 1e-6)
            assert np.abs(x).max() > 0.97 * bound  # uniform over the whole interval
            assert abs(x.mean()) < 0.1 * bound
            assert x.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)  # U(-b, b): std b / sqrt(3)
    assert (noise[0, 147:] == 0).all()  # padding gets none
    again = np.asarray(neftune_noise(jax.random.key(0), jnp.asarray(seg), D, ALPHA))
    np.testing.assert_array_equal(noise, again)  # deterministic from the key
    other = np.asarray(neftune_noise(jax.random.key(1), jnp.asarray(seg), D, ALPHA))
    assert not np.allclose(noise, other)


def test_an_unpadded_example_gets_transformers_scale():
    """With one example filling the row (no padding, L = the row length) the scale is transformers' own:
    its hook's noise and ours have the same bound, alpha / sqrt(L * d)."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    module = torch.nn.Embedding(10, D)
    module.neftune_noise_alpha = ALPHA
    module.train()
    torch.manual_seed(0)
    hf = neftune_post_forward_hook(module, None, torch.zeros(1, 160, D)).numpy()
    ours = np.asarray(neftune_noise(jax.random.key(0), jnp.ones((1, 160), jnp.int32), D, ALPHA))
    bound = ALPHA / np.sqrt(160 * D)
    for x in (hf, ours):
        assert bound * 0.97 < np.abs(x).max() <= bound * (1 + 1e-6)
        assert x.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_hidden_states_add_exactly_that_noise_to_the_embeddings():
    params = init_params(TINY, jax.random.key(0), std=0.2)
    seg = jnp.asarray(_packed_segments()[:, :64].clip(0, 2))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, size=seg.shape), jnp.int32)
    pos = jnp.zeros_like(ids)
    key = jax.random.key(3)
    noisy = jax.jit(lambda p: hidden_states(p, TINY, ids, pos, seg, neftune=(ALPHA, key)))(params)

    @jax.jit
    def reference(p):
        x = embed(p, ids, jnp.float32, TINY) + neftune_noise(key, seg, D, ALPHA)
        return final_norm(p, TINY, run_layers(p, TINY, x, seg, pos)[0])

    np.testing.assert_allclose(np.asarray(noisy), np.asarray(reference(params)), atol=1e-6)
    clean = jax.jit(lambda p: hidden_states(p, TINY, ids, pos, seg))(params)
    assert not np.allclose(np.asarray(noisy), np.asarray(clean), atol=1e-4)


def _batch():
    rng = np.random.default_rng(0)
    seg = np.zeros((2, 32), np.int32)
    seg[0, :12], seg[0, 12:27], seg[1, :20] = 1, 2, 1
    ids = np.where(seg > 0, rng.integers(1, 128, size=seg.shape), 0).astype(np.int32)
    targets = np.where(seg > 0, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    pos = np.concatenate([np.arange(12), np.arange(15), np.zeros(5)]).astype(np.int32)
    positions = np.stack([pos, np.where(seg[1] > 0, np.arange(32), 0)]).astype(np.int32)
    return {"input_ids": ids, "targets": targets, "segment_ids": seg, "positions": positions}


def test_noise_only_in_training_and_deterministic_from_the_step_rng():
    cfg = build_config({"learning_rate": 1e-2, "optim": "sgd"})
    flat = flatten(init_params(TINY, jax.random.key(0), std=0.2))
    part = full_partition(flat)
    trainable, frozen = split(flat, part)
    optimizer, schedule = build_optimizer(cfg, total_steps=10)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    plain, noisy = ModelRunner(TINY, part), ModelRunner(TINY, part, neftune_alpha=ALPHA)
    # eval: the key changes nothing
    ev_plain = jax.jit(make_eval_step(plain))(trainable, frozen, batch)
    ev_noisy = jax.jit(make_eval_step(noisy))(trainable, frozen, batch)
    np.testing.assert_array_equal(np.asarray(ev_plain["loss"]), np.asarray(ev_noisy["loss"]))
    # training: the loss of the noisy forward differs, the same rng gives the same step, another rng another
    step_plain = jax.jit(make_train_step(plain, optimizer, schedule))
    step_noisy = jax.jit(make_train_step(noisy, optimizer, schedule))
    micro = {k: v[None] for k, v in batch.items()}
    state = init_state(trainable, optimizer, seed=0)
    _, m_plain = step_plain(state, frozen, micro)
    s1, m1 = step_noisy(state, frozen, micro)
    _, m1_again = step_noisy(state, frozen, micro)
    _, m2 = step_noisy(init_state(trainable, optimizer, seed=1), frozen, micro)
    assert float(m1["loss"]) == float(m1_again["loss"])
    assert float(m1["loss"]) != float(m2["loss"])
    assert 1e-6 < abs(float(m1["loss"]) - float(m_plain["loss"])) < 0.5  # noise, small at alpha 5
    _, m_next = step_noisy(s1, frozen, micro)  # the state's rng moves on: fresh noise each step
    assert float(m_next["loss"]) != float(m1["loss"])
