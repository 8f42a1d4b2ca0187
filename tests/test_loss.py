"""Cross entropy and token accuracy against their textbook definitions."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.loss import IGNORE_INDEX, loss_sums, token_losses


def test_matches_log_softmax_and_argmax_including_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
    targets[0, :2] = IGNORE_INDEX
    # Ties: argmax picks the lowest index, so a target tied with an earlier max is wrong, one tied with
    # a later max is right.
    logits[1, 0] = 0.0; logits[1, 0, [3, 7]] = 5.0; targets[1, 0] = 7  # noqa: E702
    logits[1, 1] = 0.0; logits[1, 1, [3, 7]] = 5.0; targets[1, 1] = 3  # noqa: E702
    logits[1, 2] = 1.0; targets[1, 2] = 0  # noqa: E702 - all tied: index 0 is the argmax
    logits[1, 3, 4] = 50.0; targets[1, 3] = 4  # noqa: E702
    loss, valid, correct = token_losses(jnp.asarray(logits), jnp.asarray(targets))
    ok = targets != IGNORE_INDEX
    safe = np.where(ok, targets, 0)
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    expected_loss = np.where(ok, -np.take_along_axis(log_probs, safe[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(np.asarray(loss), expected_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), ok)
    np.testing.assert_array_equal(np.asarray(correct), (logits.argmax(-1) == safe) & ok)
    assert not bool(correct[1, 0]) and bool(correct[1, 1]) and bool(correct[1, 2]) and bool(correct[1, 3])


def test_gradient_is_softmax_minus_one_hot_on_label_tokens():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 4, 7)).astype(np.float32))
    targets = jnp.asarray([[2, IGNORE_INDEX, 6, 0]], jnp.int32)
    grad = jax.grad(lambda x: loss_sums(x, targets)["loss_sum"])(logits)
    expected = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(jnp.where(targets >= 0, targets, 0), 7)
    expected = jnp.where((targets != IGNORE_INDEX)[..., None], expected, 0.0)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-6)
    sums = loss_sums(logits, targets)
    assert float(sums["label_tokens"]) == 3.0


def test_chunked_loss_equals_whole_row_loss_and_gradients():
    """Chunks of 16 positions over rows of 50 (the last chunk padded): the same sums, per-token values
    and gradients (hidden states and output projection) as the whole rows' logits."""
    from jaxsft.loss import chunked_loss_sums, chunked_token_losses

    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(3, 50, 8)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(8, 40)).astype(np.float32))
    targets = rng.integers(0, 40, size=(3, 50)).astype(np.int32)
    targets[:, :7] = IGNORE_INDEX
    targets[2] = IGNORE_INDEX  # a row with no labels
    targets = jnp.asarray(targets)

    def whole(h, w):
        return loss_sums(jnp.einsum("btd,dv->btv", h, w), targets)

    def chunked(h, w):
        return chunked_loss_sums(h, lambda h_c: jnp.einsum("bcd,dv->bcv", h_c, w), targets, chunk=16)

    ref, got = whole(h, w), chunked(h, w)
    for key in ref:
        np.testing.assert_allclose(float(got[key]), float(ref[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    assert float(got["correct"]) > 0 and float(got["label_tokens"]) == 2 * 43
    g_ref = jax.grad(lambda h, w: whole(h, w)["loss_sum"], argnums=(0, 1))(h, w)
    g = jax.jit(jax.grad(lambda h, w: chunked(h, w)["loss_sum"], argnums=(0, 1)))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    per_token = chunked_token_losses(h, lambda h_c: jnp.einsum("bcd,dv->bcv", h_c, w), targets, chunk=16)
    for a, b in zip(per_token, token_losses(jnp.einsum("btd,dv->btv", h, w), targets)):
        assert a.shape == (3, 50)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_chunked_loss_never_holds_whole_row_logits():
    """Compiled for a long row and a big vocab, the chunked loss and its gradient need a fraction of the
    memory of whole-row logits: temp bytes stay below one [T, V] fp32 array."""
    from jaxsft.loss import chunked_loss_sums

    T, D, V = 2048, 64, 8192
    h = jax.ShapeDtypeStruct((1, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, T), jnp.int32)

    def temp_bytes(chunk):
        def loss(h, w, t):
            if chunk:
                return chunked_loss_sums(h, lambda h_c: jnp.einsum("bcd,dv->bcv", h_c, w), t, chunk)["loss_sum"]
            return loss_sums(jnp.einsum("btd,dv->btv", h, w), t)["loss_sum"]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole_row_logits = T * V * 4
    assert temp_bytes(0) >= whole_row_logits
    assert temp_bytes(256) < whole_row_logits / 2


def test_replay_tokens_are_summed_apart_chunked_or_not():
    """Replay runs: `replay_loss_sum` / `replay_tokens` are the replay tokens' part of the sums, the same
    whole-row and chunked (the marker is chunked like the targets)."""
    from jaxsft.loss import chunked_loss_sums

    rng = np.random.default_rng(0)
    h_BTD = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(8, 17)), jnp.float32)
    targets_BT = jnp.asarray(np.where(rng.random((2, 11)) < 0.3, IGNORE_INDEX, rng.integers(0, 17, (2, 11))),
                             jnp.int32)
    replay_BT = jnp.asarray(rng.random((2, 11)) < 0.5, jnp.int32)
    loss_BT, valid_BT, _ = token_losses(h_BTD @ w_DV, targets_BT)
    mask = np.asarray(replay_BT, bool) & np.asarray(valid_BT)
    whole = loss_sums(h_BTD @ w_DV, targets_BT, replay_BT)
    np.testing.assert_allclose(whole["replay_loss_sum"], np.asarray(loss_BT)[mask].sum(), rtol=1e-6)
    assert whole["replay_tokens"] == mask.sum() > 0
    chunked = chunked_loss_sums(h_BTD, lambda h: h @ w_DV, targets_BT, 4, replay_BT)
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-6, err_msg=key)
    assert "replay_tokens" not in loss_sums(h_BTD @ w_DV, targets_BT)  # no marker, no extra sums


def test_weighted_sums_chunked_and_whole_and_ones_equal_unweighted():
    from jaxsft.loss import chunked_loss_sums

    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 10, 8)).astype(np.float32))
    w_out = jnp.asarray(rng.normal(size=(8, 13)).astype(np.float32))
    targets = rng.integers(0, 13, size=(2, 10)).astype(np.int32)
    targets[:, :3] = IGNORE_INDEX
    weights = np.where(targets != IGNORE_INDEX, rng.choice([0.5, 1.0, 3.0], size=targets.shape), 7.0)  # 7: ignored
    logits = h @ w_out
    whole = loss_sums(logits, jnp.asarray(targets), weights_BT=jnp.asarray(weights, jnp.float32))
    loss, valid, correct = (np.asarray(x, np.float64) for x in token_losses(logits, jnp.asarray(targets)))
    w = np.where(valid > 0, weights, 0.0)
    np.testing.assert_allclose(float(whole["loss_sum"]), (w * loss).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(whole["correct"]), (w * correct).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(whole["weight_sum"]), w.sum(), rtol=1e-6)
    assert float(whole["label_tokens"]) == valid.sum()  # still a count
    chunked = chunked_loss_sums(h, lambda x: x @ w_out, jnp.asarray(targets), 4,
                                weights_BT=jnp.asarray(weights, jnp.float32))
    for k in whole:
        np.testing.assert_allclose(float(chunked[k]), float(whole[k]), rtol=1e-6, err_msg=k)
    ones = loss_sums(logits, jnp.asarray(targets), weights_BT=jnp.ones(targets.shape, jnp.float32))
    plain = loss_sums(logits, jnp.asarray(targets))
    for k in plain:
        assert float(ones[k]) == float(plain[k]), k
    assert float(ones["weight_sum"]) == float(plain["label_tokens"])


def test_weighted_replay_sums_split_the_weighted_objective():
    from jaxsft.loss import chunked_loss_sums

    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
    w_out = jnp.asarray(rng.normal(size=(8, 17)), jnp.float32)
    targets = jnp.asarray(np.where(rng.random((2, 11)) < 0.3, IGNORE_INDEX, rng.integers(0, 17, (2, 11))), jnp.int32)
    replay = jnp.asarray(rng.random((2, 11)) < 0.5, jnp.int32)
    weights = jnp.asarray(np.where(np.asarray(replay) == 1, 1.0, rng.choice([0.5, 2.0], size=(2, 11))), jnp.float32)
    whole = loss_sums(h @ w_out, targets, replay, weights)
    loss, valid, _ = (np.asarray(x, np.float64) for x in token_losses(h @ w_out, targets))
    w = np.where(valid > 0, np.asarray(weights), 0.0)
    mask = (np.asarray(replay) == 1) & (valid > 0)
    np.testing.assert_allclose(float(whole["replay_loss_sum"]), (w * loss)[mask].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(whole["replay_weight_sum"]), w[mask].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(whole["loss_sum"] - whole["replay_loss_sum"]), (w * loss)[~mask].sum(),
                               rtol=1e-5)
    chunked = chunked_loss_sums(h, lambda x: x @ w_out, targets, 4, replay, weights)
    assert set(chunked) == set(whole)
    for key in whole:
        np.testing.assert_allclose(float(chunked[key]), float(whole[key]), rtol=1e-6, err_msg=key)
