"""Decoder-only transformer over the plain param tree, for every family of `families.py`.

The tree layout is the contract in docs/internals.md. Layers are stacked on a leading axis and run
under `jax.lax.scan`, so compile time does not grow with depth. Families that mix layer kinds (Gemma's
sliding and global layers) scan over the same stack and `lax.switch` per layer to one traced body per
kind, so each kind's window and rope are static for the attention kernels and compile time stays flat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsft.model.attention import attention
from jaxsft.model.config import ModelConfig
from jaxsft.model.layers import ACTIVATIONS, apply_rope, dense, rms_norm, rope_cos_sin
from jaxsft.model.moe import moe_mlp

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
    keys = iter(jax.random.split(rng, 32))

    def normal(*shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def ones(*shape):
        return jnp.ones(shape, dtype)

    def norm(*shape):  # (1 + w) norms start at w = 0, as HF initializes them
        return jnp.zeros(shape, dtype) if cfg.norm_plus_one else ones(*shape)

    if cfg.fused_qkv:
        attn = {"qkv_proj": {"kernel": normal(L, D, Q + 2 * KV)}, "o_proj": {"kernel": normal(L, Q, D)}}
    else:
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
        attn["q_norm"] = {"scale": norm(L, Dh)}
        attn["k_norm"] = {"scale": norm(L, Dh)}
    if cfg.is_moe:
        E, Fe, Fs = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        mlp = {"gate": {"kernel": normal(L, D, E)},
               "experts": {"gate_proj": {"kernel": normal(L, E, D, Fe)}, "up_proj": {"kernel": normal(L, E, D, Fe)},
                           "down_proj": {"kernel": normal(L, E, Fe, D)}}}
        if Fs:
            mlp["shared_expert"] = {"gate_proj": {"kernel": normal(L, D, Fs)}, "up_proj": {"kernel": normal(L, D, Fs)},
                                    "down_proj": {"kernel": normal(L, Fs, D)}}
            mlp["shared_expert_gate"] = {"kernel": normal(L, D, 1)}
    elif cfg.fused_gate_up:
        mlp = {"gate_up_proj": {"kernel": normal(L, D, 2 * F)}, "down_proj": {"kernel": normal(L, F, D)}}
    else:
        mlp = {
            "gate_proj": {"kernel": normal(L, D, F)},
            "up_proj": {"kernel": normal(L, D, F)},
            "down_proj": {"kernel": normal(L, F, D)},
        }
    layers = {
        "input_layernorm": {"scale": norm(L, D)},
        "self_attn": attn,
        "post_attention_layernorm": {"scale": norm(L, D)},
        "mlp": mlp,
    }
    if cfg.sandwich_norms:
        layers["pre_feedforward_layernorm"] = {"scale": norm(L, D)}
        layers["post_feedforward_layernorm"] = {"scale": norm(L, D)}
    params = {"embed_tokens": {"embedding": normal(V, D)}, "layers": layers, "norm": {"scale": norm(D)}}
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
    sliding_window: int | None = None,
    mesh=None,
    interpret_kernels: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], dict[str, jax.Array]]:
    """One block (pre-norm; Gemma's sandwich norms when cfg says). Returns (x_BTD, (k, v), router stats)
    where k, v are what later tokens attend to and the stats are `moe_mlp`'s (empty for dense layers).
    `sliding_window` is this layer's window (None: full attention).
    `mesh` and `interpret_kernels` go to `attention` (fused kernels run per shard of the mesh).

    Without a cache, tokens attend to each other. With `kv_cache` = {k_BSKD, v_BSKD, seg_BS, pos_BS,
    index} the new keys/values are written at slot `index` and queries attend to the whole cache
    (its seg/pos already include the new tokens); the updated cache k, v are returned.
    """
    B, T, _ = x_BTD.shape
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = layer["self_attn"]
    keys = iter(jax.random.split(dropout_rng, 10) if dropout_rng is not None else [None] * 10)

    def lin(x, p):  # one dense of this layer, with its own LoRA-dropout key
        return dense(x, p, lora_scale, lora_dropout, next(keys))

    def norm(x, p):
        return rms_norm(x, p["scale"], cfg.rms_norm_eps, cfg.norm_plus_one)

    h_BTD = norm(x_BTD, layer["input_layernorm"])
    if cfg.fused_qkv:  # Phi-3: [q | k | v] along the output axis
        qkv_BTO = lin(h_BTD, attn["qkv_proj"])
        q_BTHD = qkv_BTO[..., : H * Dh].reshape(B, T, H, Dh)
        k_BTKD = qkv_BTO[..., H * Dh : (H + K) * Dh].reshape(B, T, K, Dh)
        v_BTKD = qkv_BTO[..., (H + K) * Dh :].reshape(B, T, K, Dh)
    else:
        q_BTHD = lin(h_BTD, attn["q_proj"]).reshape(B, T, H, Dh)
        k_BTKD = lin(h_BTD, attn["k_proj"]).reshape(B, T, K, Dh)
        v_BTKD = lin(h_BTD, attn["v_proj"]).reshape(B, T, K, Dh)
    if cfg.qk_norm:  # qwen3, gemma3: per-head RMSNorm before RoPE
        q_BTHD = norm(q_BTHD, attn["q_norm"])
        k_BTKD = norm(k_BTKD, attn["k_norm"])
    cos_BTR, sin_BTR = rope
    q_BTHD = apply_rope(q_BTHD, cos_BTR, sin_BTR)
    k_BTKD = apply_rope(k_BTKD, cos_BTR, sin_BTR)

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
        sliding_window=sliding_window,
        scale=None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5,
        softcap=cfg.attn_logit_softcap,
        mesh=mesh,
        interpret=interpret_kernels,
    )
    o_BTD = lin(o_BTHD.reshape(B, T, H * Dh), attn["o_proj"])
    mlp = layer["mlp"]
    act = ACTIVATIONS[cfg.hidden_act]
    if cfg.sandwich_norms:  # gemma: norm the sublayer outputs too, and a separate pre-MLP norm
        x_BTD = x_BTD + norm(o_BTD, layer["post_attention_layernorm"])
        h_BTD = norm(x_BTD, layer["pre_feedforward_layernorm"])
    else:
        x_BTD = x_BTD + o_BTD
        h_BTD = norm(x_BTD, layer["post_attention_layernorm"])
    stats = {}
    if cfg.is_moe:
        m_BTD, stats = moe_mlp(h_BTD, mlp, cfg, seg_BT != 0, act, lin, lora_scale, mesh)
    else:
        if cfg.fused_gate_up:  # Phi-3: [gate | up] along the output axis
            gate_BTF, up_BTF = jnp.split(lin(h_BTD, mlp["gate_up_proj"]), 2, axis=-1)
        else:
            gate_BTF, up_BTF = lin(h_BTD, mlp["gate_proj"]), lin(h_BTD, mlp["up_proj"])
        m_BTD = lin(act(gate_BTF) * up_BTF, mlp["down_proj"])
    if cfg.sandwich_norms:
        m_BTD = norm(m_BTD, layer["post_feedforward_layernorm"])
    return x_BTD + m_BTD, (k_BSKD, v_BSKD), stats


def run_layers(
    params: dict,
    cfg: ModelConfig,
    x_BTD: jax.Array,
    seg_BT: jax.Array,
    pos_BT: jax.Array,
    *,
    attention_impl: str = "xla",
    remat_policy: str = "none",
    lora_scale: float | None = None,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    cache: dict | None = None,
    mesh=None,
    interpret_kernels: bool = False,
    router_stats: bool = False,
) -> tuple:
    """The layer stack under one scan: embedded x_BTD in, last layer's output out (not final-normed).
    Returns (x_BTD, kv); with `router_stats`, (x_BTD, kv, per-layer router stats [L, E] of `moe_mlp`).

    With `cache` = {k, v [L, B, S, K, D], seg, pos [B, S], index} (decoding), returns the updated k, v.
    Layers of different kinds (window, rope base) go through `lax.switch` on a per-layer kind index."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    kinds = cfg.layer_kinds
    ropes = {local: rope_cos_sin(cfg, pos_BT, x_BTD.dtype, local=local, segment_ids_BT=seg_BT)
             for local in sorted({local for _, local in kinds})}

    def layer_fn(kind, x_BTD, layer, key, kv_cache):
        window, local = kind
        return decoder_layer(x_BTD, layer, cfg, ropes[local], seg_BT, pos_BT, attention_impl=attention_impl,
                             lora_scale=lora_scale, kv_cache=kv_cache, lora_dropout=lora_dropout,
                             dropout_rng=key, sliding_window=window, mesh=mesh,
                             interpret_kernels=interpret_kernels)

    def body(x_BTD, xs):
        layer, key, kind, k_BSKD, v_BSKD = xs
        kv_cache = None if cache is None else {"k": k_BSKD, "v": v_BSKD, "seg": cache["seg"],
                                               "pos": cache["pos"], "index": cache["index"]}
        if len(kinds) == 1:
            x_BTD, kv, stats = layer_fn(kinds[0], x_BTD, layer, key, kv_cache)
        else:
            branches = [lambda *a, k=k: layer_fn(k, *a) for k in kinds]
            x_BTD, kv, stats = jax.lax.switch(kind, branches, x_BTD, layer, key, kv_cache)
        return x_BTD, ((kv if cache is not None else None), stats)

    if remat_policy != "none":
        # prevent_cse=False is safe (and faster) under scan.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    use_dropout = dropout_rng is not None and lora_dropout > 0
    keys_L = jax.random.split(dropout_rng, cfg.num_layers) if use_dropout else None
    kind_L = jnp.asarray(cfg.layer_kind_index, jnp.int32) if len(kinds) > 1 else None
    k_L, v_L = (cache["k"], cache["v"]) if cache is not None else (None, None)
    x_BTD, (kv, stats) = jax.lax.scan(body, x_BTD, (params["layers"], keys_L, kind_L, k_L, v_L))
    return (x_BTD, kv, stats) if router_stats else (x_BTD, kv)


def embed(params: dict, input_ids_BT: jax.Array, compute_dtype, cfg: ModelConfig | None = None) -> jax.Array:
    x_BTD = jnp.take(params["embed_tokens"]["embedding"], input_ids_BT, axis=0).astype(compute_dtype)
    if cfg is not None and cfg.scale_embeddings:  # gemma: times sqrt(hidden), rounded to the compute dtype
        x_BTD = x_BTD * jnp.asarray(cfg.hidden_size ** 0.5, compute_dtype)
    return x_BTD


def neftune_noise(key: jax.Array, segment_ids_BT: jax.Array, hidden_size: int, alpha: float) -> jax.Array:
    """NEFTune (Jain et al. 2023) noise [B, T, D] fp32: U(-1, 1) * alpha / sqrt(L * d) per token, with L the
    length of the token's own example (its segment: packed examples each get their own scale) and d the
    hidden size; 0 on padding (segment 0). transformers' hook uses the padded length of the batch instead
    and noises padding too."""
    B, T = segment_ids_BT.shape
    counts_BS = jax.vmap(lambda s: jnp.bincount(s, length=T + 1))(segment_ids_BT)
    length_BT = jnp.take_along_axis(counts_BS, segment_ids_BT, axis=1).astype(jnp.float32)
    scale_BT = jnp.where(segment_ids_BT > 0, alpha / jnp.sqrt(jnp.maximum(length_BT, 1.0) * hidden_size), 0.0)
    u_BTD = jax.random.uniform(key, (B, T, hidden_size), jnp.float32, minval=-1.0, maxval=1.0)
    return u_BTD * scale_BT[..., None]


def final_norm(params: dict, cfg: ModelConfig, x_BTD: jax.Array) -> jax.Array:
    return rms_norm(x_BTD, params["norm"]["scale"], cfg.rms_norm_eps, cfg.norm_plus_one)


def hidden_states(
    params: dict,
    cfg: ModelConfig,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    compute_dtype=jnp.float32,
    router_stats: bool = False,
    neftune: tuple[float, jax.Array] | None = None,
    **kwargs,
):
    """Final-normed hidden states [B, T, D] in compute_dtype (with `router_stats`, also the MoE router
    stats [L, E]). kwargs (attention_impl, remat_policy, lora_scale, lora_dropout, dropout_rng, mesh,
    interpret_kernels) go to `run_layers`; LoRA dropout runs only given `dropout_rng`; fused attention
    kernels run per shard of `mesh`. `neftune` = (alpha, key): NEFTune noise on the embeddings
    (`neftune_noise`; training only, the step passes it)."""
    x_BTD = embed(params, input_ids_BT, compute_dtype, cfg)
    if neftune is not None:
        alpha, key = neftune
        x_BTD = (x_BTD + neftune_noise(key, segment_ids_BT, x_BTD.shape[-1], alpha)).astype(compute_dtype)
    x_BTD, _, stats = run_layers(params, cfg, x_BTD, segment_ids_BT, positions_BT, router_stats=True, **kwargs)
    h_BTD = final_norm(params, cfg, x_BTD)
    return (h_BTD, stats) if router_stats else h_BTD


def lm_logits(params: dict, cfg: ModelConfig, h_BTD: jax.Array) -> jax.Array:
    """Logits [B, T, V] in float32 (the matmul runs in h's dtype, accumulating in fp32)."""
    if cfg.tie_word_embeddings:
        w_DV = params["embed_tokens"]["embedding"].T
    else:
        w_DV = params["lm_head"]["kernel"]
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap is not None:  # gemma 2
        logits_BTV = jnp.tanh(logits_BTV / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits_BTV


def forward(
    params: dict,
    cfg: ModelConfig,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array,
    router_stats: bool = False,
    **kwargs,
):
    """Logits [B, T, V] (float32); with `router_stats`, (logits, MoE router stats). kwargs go to
    `hidden_states`."""
    h_BTD, stats = hidden_states(params, cfg, input_ids_BT, positions_BT, segment_ids_BT, router_stats=True,
                                 **kwargs)
    logits_BTV = lm_logits(params, cfg, h_BTD)
    return (logits_BTV, stats) if router_stats else logits_BTV


# Logical axes of each leaf, by its path in the tree. Norm scales and biases' feature axes follow
# the kernels they belong to; norms are small and stay replicated.
_KERNEL_AXES = {
    "q_proj": ("embed", "heads"),
    "qkv_proj": ("embed", "heads"),  # fused [q | k | v]: split after the matmul
    "gate_up_proj": ("embed", "mlp"),
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
    if "experts" in path[:-2]:  # [L, E, in, out]: experts on their own axis
        prefix = prefix + ("expert",)
    if path[-2:] == ("gate", "kernel"):  # the MoE router [D, E]
        axes = prefix + ("embed", None)
    elif path[-2:] == ("shared_expert_gate", "kernel"):
        axes = prefix + ("embed", None)
    elif path == ("embed_tokens", "embedding"):
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
            "lora_magnitude": (out_axis,),
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
