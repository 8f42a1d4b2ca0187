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
    if "lora_magnitude" in p:
        return dora_dense(x_BTI, p, lora_scale, lora_dropout, dropout_rng)
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


def dora_column_norm(kernel_IO: jax.Array, a_IR: jax.Array, b_RO: jax.Array, scale: float) -> jax.Array:
    """||W + scale * A @ B|| per output column [O], in fp32 (PEFT's `get_weight_norm`, dim 1 of [out, in])."""
    w_IO = kernel_IO.astype(jnp.float32) + scale * jnp.matmul(a_IR.astype(jnp.float32), b_RO.astype(jnp.float32),
                                                              precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.sum(w_IO * w_IO, axis=-2))


def dora_dense(x_BTI: jax.Array, p: dict, lora_scale: float | None, lora_dropout: float = 0.0,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """DoRA as PEFT computes it: with g = magnitude / ||W + s A B|| per output column (the norm is not
    differentiated, PEFT detaches it), `y = x W + (g - 1) * (x' W) + g * s * (x' A) B (+ bias)`, where x'
    is the dropped-out input (x itself without dropout, which makes it g * x (W + s A B))."""
    if lora_scale is None:
        raise ValueError("params hold DoRA adapters but no lora_scale was given")
    dtype = x_BTI.dtype
    kernel_IO, a_IR, b_RO = p["kernel"].astype(dtype), p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
    norm_O = jax.lax.stop_gradient(dora_column_norm(p["kernel"], p["lora_a"], p["lora_b"], lora_scale))
    g_O = (p["lora_magnitude"].astype(jnp.float32) / norm_O).astype(dtype)
    if dropout_rng is not None and lora_dropout > 0:
        keep_BTI = jax.random.bernoulli(dropout_rng, 1.0 - lora_dropout, x_BTI.shape)
        dropped_BTI = jnp.where(keep_BTI, x_BTI / (1.0 - lora_dropout), 0).astype(dtype)
        y_BTO = x_BTI @ kernel_IO + (g_O - 1) * (dropped_BTI @ kernel_IO) \
            + g_O * (lora_scale * lora_update(dropped_BTI, a_IR, b_RO))
    else:
        y_BTO = g_O * (x_BTI @ kernel_IO + lora_scale * lora_update(x_BTI, a_IR, b_RO))
    return y_BTO + p["bias"].astype(dtype) if "bias" in p else y_BTO


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


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm as Hugging Face computes it: normalize in fp32; Llama casts back, then scales by w;
    Gemma (`plus_one`) scales by (1 + w) in fp32, then casts back."""
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (x32 * (1.0 + scale_D.astype(jnp.float32))).astype(x_BTD.dtype)
    return scale_D.astype(x_BTD.dtype) * x32.astype(x_BTD.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
}


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None, long: bool = False) -> np.ndarray:
    """Per-pair inverse frequencies [rotary_dim // 2], float32, as transformers computes them. `theta`
    overrides the base (Gemma 3's local layers, unscaled); `long` picks longrope's long factors."""
    dim = cfg.rotary_dim
    if theta is not None:
        return _default_inv_freq(theta, dim)
    inv_freq = _default_inv_freq(cfg.rope_theta, dim)
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "dynamic":  # dynamic: the base moves with the length (rope_cos_sin)
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
    if rs.rope_type == "yarn":
        # _compute_yarn_parameters: interpolate low frequencies, keep high ones, ramp between.
        def correction_dim(rotations):
            return (dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(cfg.rope_theta))

        low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = (cfg.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rs.factor * pos_freqs)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        keep = (1 - ramp).astype(np.float32)
        return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)
    if rs.rope_type == "longrope":
        factors = np.asarray(rs.long_factor if long else rs.short_factor, np.float32)
        shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        return (1.0 / (factors * cfg.rope_theta ** shape)).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {rs.rope_type!r}")


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor transformers multiplies cos and sin by (yarn's mscale, longrope's), else 1."""
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type not in ("yarn", "longrope"):
        return 1.0
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.rope_type == "longrope":
        if rs.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(rs.factor) / math.log(rs.original_max_position_embeddings))

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.mscale and rs.mscale_all_dim:
        return float(mscale(rs.factor, rs.mscale) / mscale(rs.factor, rs.mscale_all_dim))
    return mscale(rs.factor)


def _segment_lengths(positions_BT: jax.Array, segment_ids_BT: jax.Array | None) -> jax.Array:
    """Per token, its example's length so far (the largest position of its segment in the row, + 1): the
    `seq_len` transformers' dynamic and longrope ropes key on, per example so packing changes nothing."""
    if segment_ids_BT is None:
        return jnp.broadcast_to(positions_BT.max(-1, keepdims=True) + 1, positions_BT.shape)
    T = positions_BT.shape[1]

    def row(pos_T, seg_T):
        return jax.ops.segment_max(pos_T, seg_T, num_segments=T + 1)[seg_T] + 1

    return jax.vmap(row)(positions_BT, segment_ids_BT.astype(jnp.int32))


def rope_cos_sin(cfg: ModelConfig, positions_BT: jax.Array, dtype, *, local: bool = False,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] for per-token positions (computed in fp32, then cast). `local`: the
    sliding layers' own base (Gemma 3)."""
    pos_BT = positions_BT.astype(jnp.float32)
    rs = cfg.rope_scaling
    if local:
        freqs_BTK = pos_BT[..., None] * jnp.asarray(rope_inv_freq(cfg, theta=cfg.local_rope_theta))
    elif rs is not None and rs.rope_type == "dynamic":
        # _compute_dynamic_ntk_parameters at seq_len = max(length, max_position_embeddings).
        dim, max_pos = cfg.rotary_dim, cfg.max_position_embeddings
        seq_BT = jnp.maximum(_segment_lengths(positions_BT, segment_ids_BT), max_pos).astype(jnp.float32)
        base_BT = cfg.rope_theta * ((rs.factor * seq_BT / max_pos) - (rs.factor - 1)) ** (dim / (dim - 2))
        exponent_K = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
        freqs_BTK = pos_BT[..., None] * (1.0 / (base_BT[..., None] ** exponent_K))
    elif rs is not None and rs.rope_type == "longrope":
        long_BT = _segment_lengths(positions_BT, segment_ids_BT) > rs.original_max_position_embeddings
        inv_BTK = jnp.where(long_BT[..., None], jnp.asarray(rope_inv_freq(cfg, long=True)),
                            jnp.asarray(rope_inv_freq(cfg)))
        freqs_BTK = pos_BT[..., None] * inv_BTK
    else:
        freqs_BTK = pos_BT[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb_BTD = jnp.concatenate([freqs_BTK, freqs_BTK], axis=-1)
    factor = 1.0 if local else rope_attention_factor(cfg)
    return (jnp.cos(emb_BTD) * factor).astype(dtype), (jnp.sin(emb_BTD) * factor).astype(dtype)


def apply_rope(x_BTHD: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """HF's rotate_half convention: the two halves of the first R (rotary) dims form the rotated pairs;
    dims past R (partial_rotary_factor < 1) pass through."""
    R = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTHD[..., :R], x_BTHD[..., R:]
    half = R // 2
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated_BTHR = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos_BTR[:, :, None, :] + rotated_BTHR * sin_BTR[:, :, None, :]
    return out if R == x_BTHD.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)
