"""The optax optimizer: LR schedule (Hugging Face semantics), clipping, AdamW / Adafactor / SGD.

Only trainable params reach the optimizer (frozen ones are split off before, see `jaxsft.params`),
so frozen weights get neither gradients nor optimizer state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxsft.config import Config, ConfigError


def warmup_steps(cfg: Config, total_steps: int) -> int:
    """warmup_steps wins over warmup_ratio, as in Hugging Face's trainer."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(total_steps * cfg.warmup_ratio)


def learning_rate_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    """lr(step) for update number `step` (0-based), matching transformers' get_scheduler."""
    peak, kind = cfg.learning_rate, cfg.lr_scheduler_type
    warmup = warmup_steps(cfg, total_steps)
    if kind == "constant":
        return optax.constant_schedule(peak)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = jnp.clip(progress, 0.0, 1.0)
        if kind == "constant_with_warmup":
            decayed = 1.0
        elif kind == "linear":
            decayed = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup))
        elif kind == "cosine":
            decayed = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "cosine_with_min_lr":
            rate = _min_lr_rate(cfg)
            decayed = rate + (1 - rate) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            raise ConfigError(f"lr_scheduler_type {kind!r} is not supported")
        return peak * jnp.where(step < warmup, warm, decayed)

    return schedule


def _min_lr_rate(cfg: Config) -> float:
    kwargs = cfg.lr_scheduler_kwargs
    if "min_lr_rate" in kwargs:
        return float(kwargs["min_lr_rate"])
    if "min_lr" in kwargs:
        return float(kwargs["min_lr"]) / cfg.learning_rate
    raise ConfigError("lr_scheduler_type cosine_with_min_lr needs lr_scheduler_kwargs: {min_lr: ...} "
                      "or {min_lr_rate: ...}")


def decay_mask(params) -> dict:
    """Weight decay on matrices (kernels, embeddings, adapters), never on norms and biases."""
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1])).rsplit("/", 1)[-1]
        return name in ("kernel", "embedding", "lora_a", "lora_b", "lora_magnitude")  # HF decays DoRA's too
    return jax.tree_util.tree_map_with_path(decays, params)


def loraplus_factors(params, ratio: float) -> dict:
    """LoRA+ (LLaMA-Factory's param groups): `lora_b` and the 1-D trainable params (norm scales, biases:
    `param.ndim == 1` in torch, the layer axis of stacked leaves aside; DoRA's magnitudes too) learn at `ratio` x the learning
    rate; `lora_a` and fully trained matrices (additional_target) at the learning rate."""
    def factor(path, _):
        name = str(getattr(path[-1], "key", path[-1])).rsplit("/", 1)[-1]
        return ratio if name in ("lora_b", "scale", "bias", "lora_magnitude") else 1.0
    return jax.tree_util.tree_map_with_path(factor, params)


def scale_per_leaf(factors_of) -> optax.GradientTransformation:
    """Multiply each leaf's update by a constant factor (`factors_of(params) -> tree of floats`). After
    AdamW/Adafactor/SGD, whose updates end with `-lr * (...)` (decoupled weight decay included), this is
    exactly a per-group learning rate, as torch param groups give it."""
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        factors = factors_of(updates)
        return jax.tree_util.tree_map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates,
                                      factors), state

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg: Config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.optim.startswith("adamw"):
        core = optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                           weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optim == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                               weight_decay_mask=decay_mask)
    elif cfg.optim == "sgd":
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), optax.sgd(schedule))
    else:
        raise ConfigError(f"optim {cfg.optim!r} is not supported; use adamw_torch, adafactor or sgd")
    if cfg.loraplus_lr_ratio is not None:
        core = optax.chain(core, scale_per_leaf(lambda tree: loraplus_factors(tree, cfg.loraplus_lr_ratio)))
    if cfg.max_grad_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), core)
    return core, schedule
