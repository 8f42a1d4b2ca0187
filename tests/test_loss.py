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
