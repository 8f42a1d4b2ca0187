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
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, safe_targets_BT[..., None], axis=-1)[..., 0]
    loss_BT = jnp.where(valid_BT, logz_BT - target_logit_BT, 0.0)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == safe_targets_BT) & valid_BT
    return loss_BT, valid_BT, correct_BT


def loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array) -> dict[str, jax.Array]:
    """Sum of CE over label tokens, the label-token count and the number predicted right."""
    loss_BT, valid_BT, correct_BT = token_losses(logits_BTV, targets_BT)
    return {
        "loss_sum": loss_BT.sum(),
        "label_tokens": valid_BT.sum().astype(jnp.float32),
        "correct": correct_BT.sum().astype(jnp.float32),
    }
