"""Pure train and eval steps. `(state, frozen, batch) -> (state, metrics)`, jitted once by the loop.

State is a plain dict: `step` (updates done), `trainable` (flat param dict), `opt_state`, `rng`.
Frozen params travel beside it, never differentiated. A batch holds `[A, R, T]` arrays: A
micro-batches of R rows, accumulated inside the step with `lax.scan`. The loss is the sum of
cross entropy over label tokens divided by the label tokens of the whole global batch; a batch with
`weights` (per-token loss weights) gives `sum(w * ce) / sum(w)` over the global batch, and token accuracy
is weighted alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxsft.loss import chunked_loss_sums, chunked_token_losses, loss_sums, token_losses
from jaxsft.model.config import ModelConfig
from jaxsft.model.moe import load_balancing_loss
from jaxsft.model.transformer import hidden_states, lm_logits
from jaxsft.params import Flat, Partition, merge


NEFTUNE_STREAM = 1  # folded into a micro-batch's key: NEFTune's draws, apart from LoRA dropout's


@dataclasses.dataclass(frozen=True)
class ModelRunner:
    """Everything static the forward needs besides params and the batch."""
    model: ModelConfig
    partition: Partition
    attention_impl: str = "xla"
    remat_policy: str = "none"
    compute_dtype: Any = jnp.float32
    lora_scale: float | None = None
    lora_dropout: float = 0.0  # applied only when logits() gets a dropout rng (training)
    neftune_alpha: float = 0.0  # NEFTune noise on the embeddings, only when given a dropout rng (training)
    mesh: Any = None  # where the arrays live: fused attention kernels run per shard of it
    interpret_kernels: bool = False  # Pallas kernels through the interpreter (tests on CPU)

    # Positions per chunk of the loss (chunked_loss_sums); 0 computes whole rows' logits at once.
    loss_chunk: int = 512
    aux_loss_coef: float = 0.0  # MoE: weight of the router load-balancing loss in the objective

    def _hidden(self, trainable: Flat, frozen: Flat, batch: dict[str, jax.Array],
                dropout_rng: jax.Array | None = None) -> tuple[dict, jax.Array, dict]:
        """Merged params, final hidden states and the MoE router stats (empty for dense models)."""
        params = merge(trainable, frozen, self.partition)
        kwargs = {"lora_scale": self.lora_scale} if self.lora_scale is not None else {}
        if dropout_rng is not None and self.lora_dropout > 0:
            kwargs.update(lora_dropout=self.lora_dropout, dropout_rng=dropout_rng)
        if dropout_rng is not None and self.neftune_alpha > 0:
            kwargs.update(neftune=(self.neftune_alpha, jax.random.fold_in(dropout_rng, NEFTUNE_STREAM)))
        h_BTD = hidden_states(params, self.model, batch["input_ids"], batch["positions"], batch["segment_ids"],
                              attention_impl=self.attention_impl, remat_policy=self.remat_policy,
                              compute_dtype=self.compute_dtype, mesh=self.mesh,
                              interpret_kernels=self.interpret_kernels, router_stats=True, **kwargs)
        return params, *h_BTD

    def logits(self, trainable: Flat, frozen: Flat, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """Whole rows' logits [B, T, V] in fp32 (the train and eval steps never build these)."""
        params, h_BTD, _ = self._hidden(trainable, frozen, batch, dropout_rng)
        return lm_logits(params, self.model, h_BTD)

    def loss_sums(self, trainable: Flat, frozen: Flat, batch: dict[str, jax.Array],
                  dropout_rng: jax.Array | None = None, router_stats: bool = False):
        """Summed loss, label tokens and correct predictions of `batch["targets"]`, chunked; with
        `router_stats`, (those sums, the MoE router stats per layer)."""
        params, h_BTD, stats = self._hidden(trainable, frozen, batch, dropout_rng)
        replay_BT = batch.get("replay")  # replay runs: their tokens' loss is also summed apart
        weights_BT = batch.get("weights")  # answers with loss weights: sum(w * ce) / sum(w)
        if self.loss_chunk <= 0:
            sums = loss_sums(lm_logits(params, self.model, h_BTD), batch["targets"], replay_BT, weights_BT)
        else:
            sums = chunked_loss_sums(h_BTD, lambda h: lm_logits(params, self.model, h), batch["targets"],
                                     self.loss_chunk, replay_BT, weights_BT)
        return (sums, stats) if router_stats else sums

    def token_losses(self, trainable: Flat, frozen: Flat, batch: dict[str, jax.Array]):
        """Per-token loss, label mask and correctness [B, T], chunked."""
        params, h_BTD, _ = self._hidden(trainable, frozen, batch)
        if self.loss_chunk <= 0:
            return token_losses(lm_logits(params, self.model, h_BTD), batch["targets"])
        return chunked_token_losses(h_BTD, lambda h: lm_logits(params, self.model, h), batch["targets"],
                                    self.loss_chunk)


def init_state(trainable: Flat, optimizer: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _real_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    return (batch["segment_ids"] != 0).sum().astype(jnp.float32)


def _loss_weight(batch: dict[str, jax.Array]) -> jax.Array:
    """The denominator of the batch's loss: its label tokens, or the sum of their loss weights."""
    valid = batch["targets"] != -100
    if "weights" in batch:
        return jnp.where(valid, batch["weights"], 0.0).sum().astype(jnp.float32)
    return valid.sum().astype(jnp.float32)


def make_train_step(runner: ModelRunner, optimizer: optax.GradientTransformation, schedule: Callable,
                    skip_nonfinite: bool = False) -> Callable:
    """The MoE load-balancing loss (transformers' `load_balancing_loss_func` over the real tokens of the
    whole global batch, all layers) is a separate term: `aux_loss_coef x aux` joins the objective, and
    `aux_loss` and `expert_load` (share of top-k assignments per expert) are reported beside `loss`.
    Its value is exact over the global batch; its gradient, E x sum_e f_e x dP_e with f_e a frequency
    that gets no gradient, takes each micro-batch's own frequencies f_e (all of them with one
    micro-batch, where it is transformers' gradient exactly) and is weighted by real tokens, so
    packing and accumulation do not reweight it."""
    cfg = runner.model
    moe = cfg.is_moe
    stat_keys = ("loss_sum", "label_tokens", "correct") + (("router_rows",) if moe else ())

    def micro_loss(trainable, frozen, micro, dropout_rng, totals):
        if not moe:
            sums = runner.loss_sums(trainable, frozen, micro, dropout_rng)
            return sums["loss_sum"], sums
        sums, stats = runner.loss_sums(trainable, frozen, micro, dropout_rng, router_stats=True)
        tokens_E, prob_E = stats["expert_tokens"].sum(0), stats["expert_prob"].sum(0)
        rows = cfg.num_layers * _real_tokens(micro)
        sums = {**sums, "expert_tokens": tokens_E, "expert_prob": jax.lax.stop_gradient(prob_E), "router_rows": rows}
        objective = sums["loss_sum"]
        if runner.aux_loss_coef:
            label_total, rows_total = totals
            freq_E = jax.lax.stop_gradient(tokens_E / jnp.maximum(rows, 1.0))
            aux = cfg.num_experts * jnp.sum(freq_E * prob_E / rows_total)
            objective = objective + runner.aux_loss_coef * label_total * aux  # the step divides by label_total
        return objective, sums

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def train_step(state: dict, frozen: Flat, batch: dict[str, jax.Array]) -> tuple[dict, dict]:
        trainable = state["trainable"]

        def accumulate(carry, micro_and_key):
            micro, dropout_rng = micro_and_key
            grads, sums = grad_fn(trainable, frozen, micro, dropout_rng, totals)
            return _tree_add(carry, (grads, sums)), None

        zero_grads = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        weighted = "weights" in batch
        totals = (_loss_weight(batch).clip(1e-6 if weighted else 1.0), (cfg.num_layers * _real_tokens(batch)).clip(1.0))
        replay = "replay" in batch  # replay runs report the SFT and replay losses apart
        extra = (("weight_sum",) if weighted else ()) + (("replay_loss_sum", "replay_tokens") if replay else ()) \
            + (("replay_weight_sum",) if weighted and replay else ())
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in stat_keys + extra}
        if moe:
            zero_sums.update({k: jnp.zeros((cfg.num_experts,), jnp.float32) for k in ("expert_tokens", "expert_prob")})
        dropout_keys = None  # one key per micro-batch, only when there is dropout or noise to draw
        if runner.lora_dropout > 0 or runner.neftune_alpha > 0:
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 2)
            dropout_keys = jax.random.split(step_key, jax.tree_util.tree_leaves(batch)[0].shape[0])
        (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (batch, dropout_keys))
        # the loss's denominator: label tokens, or the sum of their weights
        label_tokens = jnp.maximum(sums["weight_sum"], 1e-6) if weighted else jnp.maximum(sums["label_tokens"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / label_tokens, grads)
        loss = sums["loss_sum"] / label_tokens
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_trainable = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new_trainable, trainable)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {"step": state["step"] + 1, "trainable": new_trainable, "opt_state": opt_state,
                     "rng": jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1))}
        if skip_nonfinite:  # a bad batch leaves params and optimizer untouched (the step still counts)
            keep_old = {**state, "step": new_state["step"], "rng": new_state["rng"]}
            new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, keep_old)
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / label_tokens,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "label_tokens": sums["label_tokens"],
            "finite": finite,
        }
        if replay:  # each part over its own denominator (label tokens, or their weights' sum)
            replay_den = sums["replay_weight_sum"] if weighted else sums["replay_tokens"]
            metrics.update(sft_loss=(sums["loss_sum"] - sums["replay_loss_sum"])
                           / jnp.maximum(label_tokens - replay_den, 1e-6 if weighted else 1.0),
                           replay_loss=sums["replay_loss_sum"] / jnp.maximum(replay_den, 1e-6 if weighted else 1.0),
                           replay_tokens=sums["replay_tokens"])
            if weighted:
                metrics["replay_weight_sum"] = sums["replay_weight_sum"]
        if weighted:  # steps are averaged by this in logs (the weighted objective's denominator)
            metrics["weight_sum"] = sums["weight_sum"]
        if moe:
            metrics["aux_loss"] = load_balancing_loss(sums["expert_tokens"], sums["expert_prob"], sums["router_rows"])
            metrics["expert_load"] = sums["expert_tokens"] / jnp.maximum(sums["router_rows"] * cfg.num_experts_per_tok, 1.0)
        return new_state, metrics

    return train_step


def make_eval_step(runner: ModelRunner) -> Callable:
    """Per-token loss, label mask and correctness [R, T]; the host groups them per example."""
    def eval_step(trainable: Flat, frozen: Flat, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        loss_BT, valid_BT, correct_BT = runner.token_losses(trainable, frozen, batch)
        return {"loss": loss_BT, "valid": valid_BT, "correct": correct_BT}
    return eval_step
