"""Small pure building blocks: dense (with the LoRA hook), RMSNorm, rotary embeddings."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.model.config import ModelConfig


def dense(x_BTI: jax.Array, p: dict, lora_scale: float | None = None, lora_dropout: float = 0.0,
          dropout_rng: jax.Array | None = None) -> jax.Array:
    """`x @ kernel (+ bias) (+ lora_scale * (x @ lora_a) @ lora_b)`, computed in x's dtype.

    Params may be stored wider than the compute dtype; they are cast at use. The LoRA update goes
    through the rank-r bottleneck so W + AB is never materialized. With `dropout_rng`, the LoRA input
    (only) goes through inverted dropout of rate `lora_dropout`, as PEFT's `lora_dropout` does.
    """
    y_BTO = x_BTI @ p["kernel"].astype(x_BTI.dtype)
    if "bias" in p:
        y_BTO = y_BTO + p["bias"].astype(x_BTI.dtype)
    if "lora_a" in p:
        if lora_scale is None:
            raise ValueError("params hold lora_a/lora_b adapters but no lora_scale was given")
        a_IR = p["lora_a"].astype(x_BTI.dtype)
        b_RO = p["lora_b"].astype(x_BTI.dtype)
        if dropout_rng is not None and lora_dropout > 0:
            keep_BTI = jax.random.bernoulli(dropout_rng, 1.0 - lora_dropout, x_BTI.shape)
            x_BTI = jnp.where(keep_BTI, x_BTI / (1.0 - lora_dropout), 0).astype(x_BTI.dtype)
        elif x_BTI.dtype == jnp.float32:
            y_BTO = merged_lora_matmul(x_BTI, p["kernel"].astype(x_BTI.dtype), a_IR, b_RO, lora_scale)
            return y_BTO + p["bias"].astype(x_BTI.dtype) if "bias" in p else y_BTO
        y_BTO = y_BTO + lora_scale * lora_update(x_BTI, a_IR, b_RO)
    return y_BTO


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def merged_lora_matmul(x_BTI: jax.Array, kernel_IO: jax.Array, a_IR: jax.Array, b_RO: jax.Array,
                       scale: float) -> jax.Array:
    """`x @ (W + scale * A @ B)`: one matmul instead of the base product, a rank-r product writing a
    second [tokens, out] array, and their sum (on CPU the rank-r one ran at ~1 GB/s). The backward
    keeps LoRA's factored gradients for A and B, and gives W a gradient only if W is differentiated.
    Used in fp32, where the merged sum differs from the unmerged one only by fp32 rounding; in bf16,
    folding a small update into W's coarse mantissa would round differently, so lower precisions
    take the unmerged path, as PEFT computes it."""
    return x_BTI @ (kernel_IO + scale * (a_IR @ b_RO))


def _merged_fwd(x, kernel, a, b, scale):
    x_BTI, kernel_IO, a_IR, b_RO = x.value, kernel.value, a.value, b.value
    y_BTO = x_BTI @ (kernel_IO + scale * (a_IR @ b_RO))
    # The residuals' structure records (statically) whether the frozen kernel needs a gradient.
    return y_BTO, (x_BTI, kernel_IO, a_IR, b_RO, (None,) if kernel.perturbed else ())


def _merged_bwd(scale, res, g_BTO):
    x_BTI, kernel_IO, a_IR, b_RO, kernel_perturbed = res
    g_BTR = g_BTO @ b_RO.T
    grad_b_RO = scale * jnp.einsum("...r,...o->ro", x_BTI @ a_IR, g_BTO)
    grad_a_IR = scale * jnp.einsum("...r,...i->ri", g_BTR, x_BTI).T
    grad_x_BTI = g_BTO @ (kernel_IO + scale * (a_IR @ b_RO)).T
    grad_kernel_IO = jnp.einsum("...i,...o->io", x_BTI, g_BTO) if kernel_perturbed else None
    return grad_x_BTI, grad_kernel_IO, grad_a_IR, grad_b_RO


merged_lora_matmul.defvjp(_merged_fwd, _merged_bwd, symbolic_zeros=True)


@jax.custom_vjp
def lora_update(x_BTI: jax.Array, a_IR: jax.Array, b_RO: jax.Array) -> jax.Array:
    """`(x @ A) @ B`, with a backward pass that orders each product so the transposed operand is the
    small rank-r one: autodiff's `x^T @ g` makes XLA copy a transposed [tokens, in] activation first,
    which dominated LoRA's step time on CPU."""
    return (x_BTI @ a_IR) @ b_RO


def _lora_update_fwd(x_BTI, a_IR, b_RO):
    u_BTR = x_BTI @ a_IR
    return u_BTR @ b_RO, (x_BTI, a_IR, b_RO, u_BTR)


def _lora_update_bwd(res, g_BTO):
    x_BTI, a_IR, b_RO, u_BTR = res
    g_BTR = g_BTO @ b_RO.T
    grad_b_RO = jnp.einsum("...r,...o->ro", u_BTR, g_BTO)
    grad_a_IR = jnp.einsum("...r,...i->ri", g_BTR, x_BTI).T
    grad_x_BTI = g_BTR @ a_IR.T
    return grad_x_BTI, grad_a_IR, grad_b_RO


lora_update.defvjp(_lora_update_fwd, _lora_update_bwd)


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Hugging Face computes it: normalize in fp32, cast back, then scale."""
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale_D.astype(x_BTD.dtype) * x32.astype(x_BTD.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], float32, as transformers computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.rope_type == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    if rs.rope_type == "llama3":
        # transformers.modeling_rope_utils._compute_llama3_parameters, line for line.
        old_len = rs.original_max_position_embeddings
        low_freq_wavelen = old_len / rs.low_freq_factor
        high_freq_wavelen = old_len / rs.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / rs.factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {rs.rope_type!r}")


def rope_cos_sin(cfg: ModelConfig, positions_BT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] for per-token positions (computed in fp32, then cast)."""
    inv_freq_K = jnp.asarray(rope_inv_freq(cfg))
    freqs_BTK = positions_BT.astype(jnp.float32)[..., None] * inv_freq_K
    emb_BTD = jnp.concatenate([freqs_BTK, freqs_BTK], axis=-1)
    return jnp.cos(emb_BTD).astype(dtype), jnp.sin(emb_BTD).astype(dtype)


def apply_rope(x_BTHD: jax.Array, cos_BTD: jax.Array, sin_BTD: jax.Array) -> jax.Array:
    """HF's rotate_half convention: the two halves of head_dim form the rotated pairs."""
    half = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :half], x_BTHD[..., half:]
    rotated_BTHD = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTHD * cos_BTD[:, :, None, :] + rotated_BTHD * sin_BTD[:, :, None, :]
