"""The sparse MLP of mixture-of-experts layers (Qwen2/3-MoE, Mixtral), routed as transformers routes it.

Router softmax (fp32), top-k, optional renormalization of the k weights (`norm_topk_prob`). Every real
token reaches its k experts: there is no capacity and nothing is dropped. The (token, expert) pairs are
sorted by expert and each expert's FFN runs as one grouped matmul over its rows (`jax.lax.ragged_dot` on TPU,
where XLA has a grouped kernel; `jaxsft.model.grouped` elsewhere, where XLA expands ragged_dot to every
expert's weights), so compute is k of E experts per token, never all of them and never padded to a capacity.
Padding tokens (segment id 0) are routed nowhere: they sort past the last group, where the grouped matmul
writes zeros, and count in neither the load statistics nor the load-balancing loss.

Param layout per layer (stacked on [L] like every layer leaf, experts on a second axis):
`gate/kernel [D, E]` (the router), `experts/{gate_proj,up_proj}/kernel [E, D, F]`,
`experts/down_proj/kernel [E, F, D]`, and for Qwen2-MoE `shared_expert/{gate,up,down}_proj` and
`shared_expert_gate/kernel [D, 1]`. LoRA on the experts (PEFT's target_parameters layout, jaxsft/lora.py):
`experts/gate_up_proj/{lora_a [E, D, r], lora_b [E, r, 2F]}` and `experts/down_proj/{lora_a, lora_b}`; their
updates run as grouped matmuls too, through the rank-r bottleneck.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsft.model.config import ModelConfig
from jaxsft.model.grouped import grouped_matmul

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
            lin: Callable, lora_scale: float | None = None,
            mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sparse block's output [B, T, D] and this layer's router statistics over real tokens:
    `expert_tokens [E]` (top-k assignments per expert) and `expert_prob [E]` (summed router probability),
    the two sums transformers' `load_balancing_loss_func` is made of. `lin` runs the shared expert's
    dense layers (with their LoRA). With a `mesh`, the experts run per shard (`_expert_parallel`)."""
    B, T, D = h_BTD.shape
    E = cfg.num_experts
    x_ND = h_BTD.reshape(B * T, D)
    valid_N = valid_BT.reshape(B * T)
    probs_NE, top_w_NK, top_i_NK = route(x_ND, mlp["gate"]["kernel"], cfg)
    experts = mlp["experts"]
    matmul = grouped_matmul_for(mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    if mesh is None or mesh.size == 1:
        out_ND = _local_experts(x_ND, top_w_NK, top_i_NK, valid_N, experts, act, lora_scale, 0, matmul)
    else:
        out_ND = _expert_parallel(x_ND, top_w_NK, top_i_NK, valid_N, experts, act, lora_scale, mesh, B, matmul)

    if "shared_expert" in mlp:  # Qwen2-MoE
        shared = mlp["shared_expert"]
        s_ND = lin(act(lin(x_ND, shared["gate_proj"])) * lin(x_ND, shared["up_proj"]), shared["down_proj"])
        gate_N1 = jax.nn.sigmoid(x_ND @ mlp["shared_expert_gate"]["kernel"].astype(x_ND.dtype))
        out_ND = out_ND + gate_N1 * s_ND

    real_N = valid_N.astype(jnp.float32)
    expert_M = jnp.where(valid_N[:, None], top_i_NK, E).reshape(-1)
    stats = {
        "expert_tokens": jnp.bincount(expert_M, length=E + 1)[:E].astype(jnp.float32),
        "expert_prob": (probs_NE * real_N[:, None]).sum(axis=0),
    }
    return out_ND.reshape(B, T, D), stats


def grouped_matmul_for(platform: str) -> Callable:
    """The grouped matmul for a backend: XLA's ragged_dot on TPU, the blocked one elsewhere (measured on CPU:
    forward + backward 3-5x faster than ragged_dot, which expands to every group's weights there and, in
    jaxlib 0.10, on GPU too unless cuDNN's ragged-dot fusion is enabled)."""
    return jax.lax.ragged_dot if platform == "tpu" else grouped_matmul


def _local_experts(x_ND: jax.Array, top_w_NK: jax.Array, top_i_NK: jax.Array, valid_N: jax.Array, experts: dict,
                   act: Callable, lora_scale: float | None, first: jax.Array | int,
                   matmul: Callable) -> jax.Array:
    """Sum over each token's k experts that `experts` holds (leaves [E_local, ...], experts `first` to
    `first + E_local - 1`) of weight x FFN (with the experts' LoRA); the other experts' pairs, and padding's,
    contribute nothing."""
    E_local = experts["gate_proj"]["kernel"].shape[0]
    K = top_i_NK.shape[1]
    # (token, slot) pairs sorted by local expert; pairs of padding or of other experts get group E_local,
    # past the last real group, where ragged_dot writes zeros.
    local_NK = top_i_NK - first
    mine_NK = valid_N[:, None] & (local_NK >= 0) & (local_NK < E_local)
    expert_M = jnp.where(mine_NK, local_NK, E_local).reshape(-1)
    order_M = jnp.argsort(expert_M, stable=True)
    token_M = order_M // K
    group_sizes_E = jnp.bincount(expert_M, length=E_local + 1)[:E_local].astype(jnp.int32)
    xs_MD = x_ND[token_M]

    def ragged(x, w):
        return matmul(x, w.astype(x.dtype), group_sizes_E)

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
    return jnp.zeros_like(x_ND).at[token_M].add(y_MD)


def _expert_parallel(x_ND, top_w_NK, top_i_NK, valid_N, experts, act, lora_scale, mesh: Mesh,
                     rows: int, matmul: Callable) -> jax.Array:
    """The experts per device: each device keeps its own rows (over the batch axes that divide the batch)
    and its experts (over `expert`). Within an expert group the devices all-gather their tokens, each
    runs its experts on the pairs routed to them, and a reduce-scatter sums the k contributions back
    to each token's device. Without an expert axis this is data parallelism with local sorting (GSPMD
    would sort the global batch and run every expert on every device)."""
    from jaxsft.sharding import BATCH_AXES, EXPERT_AXIS

    batch_axes = [a for a in BATCH_AXES if mesh.shape[a] > 1]
    while batch_axes and rows % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes.pop()
    ep = mesh.shape[EXPERT_AXIS]
    spec_rows = P(tuple(batch_axes) or None)
    spec_experts = jax.tree.map(lambda w: P(EXPERT_AXIS if ep > 1 else None, *(None,) * (w.ndim - 1)), experts)

    def per_shard(x, w, i, valid, local_experts):
        first = 0
        if ep > 1:
            first = jax.lax.axis_index(EXPERT_AXIS) * local_experts["gate_proj"]["kernel"].shape[0]
            if EXPERT_AXIS in batch_axes:  # the expert group's tokens
                x, w, i, valid = (jax.lax.all_gather(a, EXPERT_AXIS, tiled=True) for a in (x, w, i, valid))
        out = _local_experts(x, w, i, valid, local_experts, act, lora_scale, first, matmul)
        if ep == 1:
            return out
        if EXPERT_AXIS in batch_axes:
            return jax.lax.psum_scatter(out, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, EXPERT_AXIS)

    run = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec_rows, spec_rows, spec_rows, spec_rows, spec_experts),
                        out_specs=spec_rows)
    return run(x_ND, top_w_NK, top_i_NK, valid_N, experts)


def load_balancing_loss(expert_tokens_E: jax.Array, expert_prob_E: jax.Array, rows: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func` from its sums over layers and real tokens: `rows` is
    layers x real tokens; E * sum_e (top-k assignments to e / rows) * (router probability of e / rows)."""
    rows = jnp.maximum(rows, 1.0)
    return expert_tokens_E.shape[-1] * jnp.sum((expert_tokens_E / rows) * (expert_prob_E / rows))
