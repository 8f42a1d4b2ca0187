"""Model FLOPs and device peak FLOP/s, for MFU (shared by the training log and tools/bench.py)."""

from __future__ import annotations

import jax

from jaxsft.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "B200": 2250e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (embedding lookup excluded, lm_head included). In a
    mixture of experts only the k experts a token is routed to count (plus the router and any shared
    expert), so MFU compares with a dense model of the same active parameters."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * dh * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * dh * d
    mlp = 3 * d * f
    if cfg.is_moe:
        mlp = (cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size + d * cfg.num_experts
               + (3 * d * cfg.shared_expert_intermediate_size + d if cfg.shared_expert_intermediate_size else 0))
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x matmul params, plus causal attention: QK^T and AV are 2 matmuls x 2 FLOPs per key x 3
    (forward + backward), over seq_len / 2 keys on average. Packed rows attend to fewer keys; this
    counts a row as one sequence, the usual convention."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2
    return 6.0 * matmul_params(cfg) + attention


def peak_flops_per_device(device=None, override: float | None = None) -> float | None:
    if override:
        return override
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops
    return None  # CPU and unknown devices: MFU is not reported
