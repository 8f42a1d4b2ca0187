"""Decoder-only transformer (llama, mistral, qwen2, qwen3) over the plain param tree.

The tree layout is the contract in docs/internals.md. Layers are stacked on a leading axis and run
under `jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsft.model.attention import attention
from jaxsft.model.config import ModelConfig
from jaxsft.model.layers import apply_rope, dense, rms_norm, rope_cos_sin

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # `full`, except that attention kernels which name their outputs (the CPU block-sparse one: its
    # output and log-sum-exp) keep them: the backward then reruns no attention forward, for one more
    # [T, H*D] tensor per layer. The default.
    "full_keep_attention": jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep weight-matmul outputs, but in pinned host memory instead of device memory (GPU/TPU).
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random params in the contract's layout (for benchmarks and tests): N(0, std) kernels, unit norms."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Q, KV, Dh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    keys = iter(jax.random.split(rng, 16))

    def normal(*shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def ones(*shape):
        return jnp.ones(shape, dtype)

    attn = {
        "q_proj": {"kernel": normal(L, D, Q)},
        "k_proj": {"kernel": normal(L, D, KV)},
        "v_proj": {"kernel": normal(L, D, KV)},
        "o_proj": {"kernel": normal(L, Q, D)},
    }
    if cfg.qkv_bias:
        for name, width in (("q_proj", Q), ("k_proj", KV), ("v_proj", KV)):
            attn[name]["bias"] = normal(L, width)
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": ones(L, Dh)}
        attn["k_norm"] = {"scale": ones(L, Dh)}
    params = {
        "embed_tokens": {"embedding": normal(V, D)},
        "layers": {
            "input_layernorm": {"scale": ones(L, D)},
            "self_attn": attn,
            "post_attention_layernorm": {"scale": ones(L, D)},
            "mlp": {
                "gate_proj": {"kernel": normal(L, D, F)},
                "up_proj": {"kernel": normal(L, D, F)},
                "down_proj": {"kernel": normal(L, F, D)},
            },
        },
        "norm": {"scale": ones(D)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": normal(D, V)}
    return params


def decoder_layer(
    x_BTD: jax.Array,
    layer: dict,
    cfg: ModelConfig,
    rope: tuple[jax.Array, jax.Array],
    seg_BT: jax.Array,
    pos_BT: jax.Array,
    *,
    attention_impl: str = "xla",
    lora_scale: float | None = None,
    kv_cache: dict | None = None,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm block. Returns (x_BTD, (k, v)) where k, v are what later tokens attend to.

    Without a cache, tokens attend to each other. With `kv_cache` = {k_BSKD, v_BSKD, seg_BS, pos_BS,
    index} the new keys/values are written at slot `index` and queries attend to the whole cache
    (its seg/pos already include the new tokens); the updated cache k, v are returned.
    """
    B, T, _ = x_BTD.shape
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = layer["self_attn"]
    keys = iter(jax.random.split(dropout_rng, 7) if dropout_rng is not None else [None] * 7)

    def lin(x, p):  # one dense of this layer, with its own LoRA-dropout key
        return dense(x, p, lora_scale, lora_dropout, next(keys))

    h_BTD = rms_norm(x_BTD, layer["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q_BTHD = lin(h_BTD, attn["q_proj"]).reshape(B, T, H, Dh)
    k_BTKD = lin(h_BTD, attn["k_proj"]).reshape(B, T, K, Dh)
    v_BTKD = lin(h_BTD, attn["v_proj"]).reshape(B, T, K, Dh)
    if cfg.qk_norm:  # qwen3: per-head RMSNorm before RoPE
        q_BTHD = rms_norm(q_BTHD, attn["q_norm"]["scale"], cfg.rms_norm_eps)
        k_BTKD = rms_norm(k_BTKD, attn["k_norm"]["scale"], cfg.rms_norm_eps)
    cos_BTD, sin_BTD = rope
    q_BTHD = apply_rope(q_BTHD, cos_BTD, sin_BTD)
    k_BTKD = apply_rope(k_BTKD, cos_BTD, sin_BTD)

    if kv_cache is None:
        k_BSKD, v_BSKD, seg_kv_BS, pos_kv_BS = k_BTKD, v_BTKD, seg_BT, pos_BT
    else:
        start = (0, kv_cache["index"], 0, 0)
        k_BSKD = jax.lax.dynamic_update_slice(kv_cache["k"], k_BTKD.astype(kv_cache["k"].dtype), start)
        v_BSKD = jax.lax.dynamic_update_slice(kv_cache["v"], v_BTKD.astype(kv_cache["v"].dtype), start)
        seg_kv_BS, pos_kv_BS = kv_cache["seg"], kv_cache["pos"]
    o_BTHD = attention(
        q_BTHD,
        k_BSKD.astype(q_BTHD.dtype),
        v_BSKD.astype(q_BTHD.dtype),
        seg_BT,
        seg_kv_BS,
        impl=attention_impl,
        q_positions_BT=pos_BT,
        kv_positions_BS=pos_kv_BS,
        sliding_window=cfg.sliding_window,
    )
    x_BTD = x_BTD + lin(o_BTHD.reshape(B, T, H * Dh), attn["o_proj"])

    mlp = layer["mlp"]
    h_BTD = rms_norm(x_BTD, layer["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    gate_BTF = jax.nn.silu(lin(h_BTD, mlp["gate_proj"]))
    up_BTF = lin(h_BTD, mlp["up_proj"])
    x_BTD = x_BTD + lin(gate_BTF * up_BTF, mlp["down_proj"])
    return x_BTD, (k_BSKD, v_BSKD)


def embed(params: dict, input_ids_BT: jax.Array, compute_dtype) -> jax.Array:
    return jnp.take(params["embed_tokens"]["embedding"], input_ids_BT, axis=0).astype(compute_dtype)


def hidden_states(
    params: dict,
    cfg: ModelConfig,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    attention_impl: str = "xla",
    remat_policy: str = "none",
    compute_dtype=jnp.float32,
    lora_scale: float | None = None,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] in compute_dtype. LoRA dropout runs only given `dropout_rng`."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    rope = rope_cos_sin(cfg, positions_BT, compute_dtype)

    def body(x_BTD, layer_and_key):
        layer, key = layer_and_key
        x_BTD, _ = decoder_layer(
            x_BTD,
            layer,
            cfg,
            rope,
            segment_ids_BT,
            positions_BT,
            attention_impl=attention_impl,
            lora_scale=lora_scale,
            lora_dropout=lora_dropout,
            dropout_rng=key,
        )
        return x_BTD, None

    if remat_policy != "none":
        # prevent_cse=False is safe (and faster) under scan.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    x_BTD = embed(params, input_ids_BT, compute_dtype)
    use_dropout = dropout_rng is not None and lora_dropout > 0
    keys_L = jax.random.split(dropout_rng, cfg.num_layers) if use_dropout else None
    x_BTD, _ = jax.lax.scan(body, x_BTD, (params["layers"], keys_L))
    return rms_norm(x_BTD, params["norm"]["scale"], cfg.rms_norm_eps)


def lm_logits(params: dict, cfg: ModelConfig, h_BTD: jax.Array) -> jax.Array:
    """Logits [B, T, V] in float32 (the matmul runs in h's dtype, accumulating in fp32)."""
    if cfg.tie_word_embeddings:
        w_DV = params["embed_tokens"]["embedding"].T
    else:
        w_DV = params["lm_head"]["kernel"]
    return jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)


def forward(
    params: dict,
    cfg: ModelConfig,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array,
    **kwargs,
) -> jax.Array:
    """Logits [B, T, V] (float32). kwargs go to `hidden_states`."""
    h_BTD = hidden_states(params, cfg, input_ids_BT, positions_BT, segment_ids_BT, **kwargs)
    return lm_logits(params, cfg, h_BTD)


# Logical axes of each leaf, by its path in the tree. Norm scales and biases' feature axes follow
# the kernels they belong to; norms are small and stay replicated.
_KERNEL_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def _leaf_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    stacked = path[0] == "layers"
    prefix = ("layers",) if stacked else ()
    module, leaf = path[-2], path[-1]
    if path == ("embed_tokens", "embedding"):
        axes = ("vocab", "embed")
    elif path == ("lm_head", "kernel"):
        axes = ("embed", "vocab")
    elif leaf == "scale":
        axes = prefix + (None,) * (ndim - len(prefix))
    elif module in _KERNEL_AXES:
        in_axis, out_axis = _KERNEL_AXES[module]
        axes = prefix + {
            "kernel": (in_axis, out_axis),
            "bias": (out_axis,),
            "lora_a": (in_axis, "lora_rank"),
            "lora_b": ("lora_rank", out_axis),
        }[leaf]
    else:
        raise ValueError(f"no logical axes known for param {'/'.join(path)}")
    if len(axes) != ndim:
        raise ValueError(f"param {'/'.join(path)} has {ndim} dims but logical axes {axes}")
    return axes


def param_logical_axes(params: dict) -> dict:
    """Same-structure tree of tuples of logical axis names (None = replicated) for each leaf."""

    def axes(path, leaf):
        return _leaf_axes(tuple(k.key for k in path), leaf.ndim)

    return jax.tree_util.tree_map_with_path(axes, params)
