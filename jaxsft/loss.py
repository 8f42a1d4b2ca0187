"""Masked cross entropy and token accuracy over already-shifted targets (see docs/internals.md).

The chunked forms take the final hidden states and the model's hidden -> logits function instead of
logits, and never hold the [B, T, V] fp32 logits of whole rows (2 GiB per 4k row at Llama-3's 128k
vocab).

Both return sums, never means: the train step divides by the number of label tokens in the whole
global batch (all micro-batches), so packing and gradient accumulation leave the objective unchanged.
With per-token loss weights `w` (answers marked `weight: w` in the data), the sums are `sum(w * ce)`,
`sum(w * correct)` and `sum(w)` (`weight_sum`): the objective is `sum(w * ce) / sum(w)` over the global batch.
"""

from __future__ import annotations

from typing import Callable

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


def loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array, replay_BT: jax.Array | None = None,
              weights_BT: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sum of CE over label tokens, the label-token count and the number predicted right. With per-token
    `weights_BT`, the CE and the right predictions are weighted and `weight_sum` is added; with `replay_BT`
    (1 on replay tokens), also the replay tokens' share of the loss sum and count (`replay_loss_sum`,
    `replay_tokens`, and `replay_weight_sum` when weighted)."""
    loss_BT, valid_BT, correct_BT = token_losses(logits_BTV, targets_BT)
    if weights_BT is None:
        sums = {
            "loss_sum": loss_BT.sum(),
            "label_tokens": valid_BT.sum().astype(jnp.float32),
            "correct": correct_BT.sum().astype(jnp.float32),
        }
    else:
        w_BT = jnp.where(valid_BT, weights_BT.astype(jnp.float32), 0.0)
        loss_BT = w_BT * loss_BT
        sums = {
            "loss_sum": loss_BT.sum(),
            "label_tokens": valid_BT.sum().astype(jnp.float32),
            "correct": jnp.where(correct_BT, w_BT, 0.0).sum(),
            "weight_sum": w_BT.sum(),
        }
    if replay_BT is not None:
        replay_BT = replay_BT.astype(bool) & valid_BT
        sums["replay_loss_sum"] = jnp.where(replay_BT, loss_BT, 0.0).sum()
        sums["replay_tokens"] = replay_BT.sum().astype(jnp.float32)
        if weights_BT is not None:
            sums["replay_weight_sum"] = jnp.where(replay_BT, w_BT, 0.0).sum()
    return sums


def _chunked(x_BT: jax.Array, c: int, fill) -> jax.Array:
    """[N, B, c]: the row cut into N chunks of c positions, the last padded with `fill`."""
    B, T = x_BT.shape
    N = -(-T // c)
    return jnp.pad(x_BT, ((0, 0), (0, N * c - T)), constant_values=fill).reshape(B, N, c).swapaxes(0, 1)


def _chunks(h_BTD: jax.Array, targets_BT: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """[N, B, c, D] hidden states and [N, B, c] targets: the row cut into N chunks of c positions, the
    last padded with unlabelled positions."""
    B, T, D = h_BTD.shape
    c = min(chunk, T)
    N = -(-T // c)
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, N * c - T), (0, 0)))
    return h_BTD.reshape(B, N, c, D).swapaxes(0, 1), _chunked(targets_BT, c, IGNORE_INDEX)


def chunked_loss_sums(h_BTD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets_BT: jax.Array,
                      chunk: int, replay_BT: jax.Array | None = None, weights_BT: jax.Array | None = None
                      ) -> dict[str, jax.Array]:
    """`loss_sums` of the logits `logits_fn(h)` ([B, c, D] -> [B, c, V] fp32), computed `chunk` positions
    at a time: only one chunk's fp32 logits exist at once, forward and backward (each chunk is
    rematerialized in the backward pass, which recomputes its logits instead of keeping them)."""
    h_NBcD, targets_NBc = _chunks(h_BTD, targets_BT, chunk)
    c = min(chunk, h_BTD.shape[1])
    # the replay marker and the weights, chunked like the targets (their padding is unlabelled: adds nothing)
    replay_NBc = None if replay_BT is None else _chunked(replay_BT, c, 0)
    weights_NBc = None if weights_BT is None else _chunked(weights_BT, c, 0.0)

    @jax.checkpoint
    def one_chunk(sums, chunk_in):
        h_BcD, targets_Bc, replay_Bc, weights_Bc = chunk_in
        chunk_sums = loss_sums(logits_fn(h_BcD), targets_Bc, replay_Bc, weights_Bc)
        return jax.tree_util.tree_map(jnp.add, sums, chunk_sums), None

    keys = ("loss_sum", "label_tokens", "correct") + (() if weights_BT is None else ("weight_sum",))
    if replay_BT is not None:
        keys += ("replay_loss_sum", "replay_tokens") + (() if weights_BT is None else ("replay_weight_sum",))
    zero = {k: jnp.zeros((), jnp.float32) for k in keys}
    sums, _ = jax.lax.scan(one_chunk, zero, (h_NBcD, targets_NBc, replay_NBc, weights_NBc))
    return sums


def chunked_token_losses(h_BTD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets_BT: jax.Array,
                         chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`token_losses` of the logits `logits_fn(h)`, `chunk` positions at a time (evaluation: no gradient)."""
    T = h_BTD.shape[1]
    h_NBcD, targets_NBc = _chunks(h_BTD, targets_BT, chunk)
    per_chunk = jax.lax.map(lambda x: token_losses(logits_fn(x[0]), x[1]), (h_NBcD, targets_NBc))

    def unchunk(x_NBc):
        N, B, c = x_NBc.shape
        return x_NBc.swapaxes(0, 1).reshape(B, N * c)[:, :T]

    loss_BT, valid_BT, correct_BT = (unchunk(x) for x in per_chunk)
    return loss_BT, valid_BT, correct_BT
