"""The sparse MLP of mixture-of-experts layers (Qwen2/3-MoE, Mixtral), routed as transformers routes it.

Router softmax (fp32), top-k, optional renormalization of the k weights (`norm_topk_prob`). Every real
token reaches its k experts: there is no capacity and nothing is dropped. The (token, expert) pairs are
sorted by expert and each expert's FFN runs as one grouped matmul (`jax.lax.ragged_dot`) over its rows,
so compute is k of E experts per token, never all of them and never padded to a capacity. Padding
tokens (segment id 0) are routed nowhere: they sort past the last group, where ragged_dot writes zeros,
and count in neither the load statistics nor the load-balancing loss.

Param layout per layer (stacked on [L] like every layer leaf, experts on a second axis):
`gate/kernel [D, E]` (the router), `experts/{gate_proj,up_proj}/kernel [E, D, F]`,
`experts/down_proj/kernel [E, F, D]`, and for Qwen2-MoE `shared_expert/{gate,up,down}_proj` and
`shared_expert_gate/kernel [D, 1]`. LoRA on the experts (PEFT's target_parameters layout, jaxsft/lora.py):
`experts/gate_up_proj/{lora_a [E, D, r], lora_b [E, r, 2F]}` and `experts/down_proj/{lora_a, lora_b}`; their
updates run as grouped matmuls too, through the rank-r bottleneck.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxsft.model.config import ModelConfig

EXPERT_MODULES = ("gate_proj", "up_proj", "down_proj")


def route(x_ND: jax.Array, router_DE: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router probabilities [N, E] (fp32), top-k weights [N, k] (in x's dtype) and expert indices [N, k]."""
    logits_NE = x_ND @ router_DE.astype(x_ND.dtype)
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    top_w_NK, top_i_NK = jax.lax.top_k(probs_NE, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top_w_NK = top_w_NK / top_w_NK.sum(axis=-1, keepdims=True)
    return probs_NE, top_w_NK.astype(x_ND.dtype), top_i_NK


def moe_mlp(h_BTD: jax.Array, mlp: dict, cfg: ModelConfig, valid_BT: jax.Array, act: Callable,
            lin: Callable, lora_scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sparse block's output [B, T, D] and this layer's router statistics over real tokens:
    `expert_tokens [E]` (top-k assignments per expert) and `expert_prob [E]` (summed router probability),
    the two sums transformers' `load_balancing_loss_func` is made of. `lin` runs the shared expert's
    dense layers (with their LoRA)."""
    B, T, D = h_BTD.shape
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    x_ND = h_BTD.reshape(B * T, D)
    valid_N = valid_BT.reshape(B * T)
    probs_NE, top_w_NK, top_i_NK = route(x_ND, mlp["gate"]["kernel"], cfg)

    # (token, slot) pairs sorted by expert; padding's pairs get group E, past the last real group.
    expert_M = jnp.where(valid_N[:, None], top_i_NK, E).reshape(-1)
    order_M = jnp.argsort(expert_M, stable=True)
    token_M = order_M // K
    group_sizes_E = jnp.bincount(expert_M, length=E + 1)[:E].astype(jnp.int32)
    xs_MD = x_ND[token_M]
    experts = mlp["experts"]

    def ragged(x, w):
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes_E)

    def lora_update(x, node):  # scale * (x @ A_e) @ B_e for each row's expert e
        if lora_scale is None:
            raise ValueError("the experts hold LoRA adapters but no lora_scale was given")
        return lora_scale * ragged(ragged(x, node["lora_a"]), node["lora_b"])

    gate_MF, up_MF = ragged(xs_MD, experts["gate_proj"]["kernel"]), ragged(xs_MD, experts["up_proj"]["kernel"])
    if "gate_up_proj" in experts:  # one adapter on the fused [gate | up] projection, as PEFT's
        d_gate_MF, d_up_MF = jnp.split(lora_update(xs_MD, experts["gate_up_proj"]), 2, axis=-1)
        gate_MF, up_MF = gate_MF + d_gate_MF, up_MF + d_up_MF
    h_MF = act(gate_MF) * up_MF
    y_MD = ragged(h_MF, experts["down_proj"]["kernel"])
    if "lora_a" in experts["down_proj"]:
        y_MD = y_MD + lora_update(h_MF, experts["down_proj"])
    y_MD = y_MD * top_w_NK.reshape(-1)[order_M][:, None]
    out_ND = jnp.zeros_like(x_ND).at[token_M].add(y_MD)

    if "shared_expert" in mlp:  # Qwen2-MoE
        shared = mlp["shared_expert"]
        s_ND = lin(act(lin(x_ND, shared["gate_proj"])) * lin(x_ND, shared["up_proj"]), shared["down_proj"])
        gate_N1 = jax.nn.sigmoid(x_ND @ mlp["shared_expert_gate"]["kernel"].astype(x_ND.dtype))
        out_ND = out_ND + gate_N1 * s_ND

    real_N = valid_N.astype(jnp.float32)
    stats = {
        "expert_tokens": group_sizes_E.astype(jnp.float32),
        "expert_prob": (probs_NE * real_N[:, None]).sum(axis=0),
    }
    return out_ND.reshape(B, T, D), stats


def load_balancing_loss(expert_tokens_E: jax.Array, expert_prob_E: jax.Array, rows: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func` from its sums over layers and real tokens: `rows` is
    layers x real tokens; E * sum_e (top-k assignments to e / rows) * (router probability of e / rows)."""
    rows = jnp.maximum(rows, 1.0)
    return expert_tokens_E.shape[-1] * jnp.sum((expert_tokens_E / rows) * (expert_prob_E / rows))
