"""Masked cross entropy and token accuracy over already-shifted targets (see docs/internals.md).

Both return sums, never means: the train step divides by the number of label tokens in the whole
global batch (all micro-batches), so packing and gradient accumulation leave the objective unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross entropy (fp32), label mask and argmax-correctness, all [B, T]."""
    valid_BT = targets_BT != IGNORE_INDEX
    safe_targets_BT = jnp.where(valid_BT, targets_BT, 0)
    logits_BTV = logits_BTV.astype(jnp.float32)
    # One max serves the log-sum-exp and the accuracy: XLA:CPU's argmax (a (value, index) reduce)
    # costs several times a plain max over [B, T, V].
    max_BT = jax.lax.stop_gradient(logits_BTV.max(axis=-1))
    logz_BT = max_BT + jnp.log(jnp.exp(logits_BTV - max_BT[..., None]).sum(axis=-1))
    target_logit_BT = jnp.take_along_axis(logits_BTV, safe_targets_BT[..., None], axis=-1)[..., 0]
    loss_BT = jnp.where(valid_BT, logz_BT - target_logit_BT, 0.0)
    # argmax == target, ties going to the lowest index as argmax's do: the target holds the max and
    # no lower index does.
    vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=safe_targets_BT.dtype)
    earlier_max_BT = ((logits_BTV == max_BT[..., None]) & (vocab_V < safe_targets_BT[..., None])).any(axis=-1)
    correct_BT = (target_logit_BT == max_BT) & ~earlier_max_BT & valid_BT
    return loss_BT, valid_BT, correct_BT


def loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array) -> dict[str, jax.Array]:
    """Sum of CE over label tokens, the label-token count and the number predicted right."""
    loss_BT, valid_BT, correct_BT = token_losses(logits_BTV, targets_BT)
    return {
        "loss_sum": loss_BT.sum(),
        "label_tokens": valid_BT.sum().astype(jnp.float32),
        "correct": correct_BT.sum().astype(jnp.float32),
    }
