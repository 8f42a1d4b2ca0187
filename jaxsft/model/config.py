"""Model hyperparameters: one frozen dataclass, built from a Hugging Face `config.json` dict.

What each family sets, and how its config.json is read, is the family table in `families.py`; the
decoder reads only the resolved fields below, never the family name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, with the fields transformers' `rope_parameters` use for each type:
    `linear` divides every frequency by `factor`; `llama3` is Llama-3.1's; `yarn`, `dynamic` (NTK,
    by sequence length) and `longrope` (Phi-3's short/long factors) as in transformers' rope utils."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    # A token sees only keys with position > its own position - sliding_window: on every layer when
    # `layer_types` is None (Mistral, Phi-3), else on the layers marked `sliding_attention`.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Per layer `sliding_attention` / `full_attention` (Gemma 2/3, Qwen2 max_window_layers).
    layer_types: tuple[str, ...] | None = None
    # Rope base of the sliding layers when it differs from the global one (Gemma 3: 10k vs 1M).
    local_rope_theta: float | None = None
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"
    # Gemma: RMSNorm scales by (1 + w), in fp32 before the cast back.
    norm_plus_one: bool = False
    # Gemma: embeddings times sqrt(hidden_size).
    scale_embeddings: bool = False
    # Gemma 2/3: norms after attention and MLP as well as before (pre/post_feedforward_layernorm).
    sandwich_norms: bool = False
    # Attention logits scale query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Phi-3: one qkv_proj [D, Q+2KV] and one gate_up_proj [D, 2F], kept fused as in the checkpoint.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # Where the decoder's tensors sit in the checkpoint ("model." or a multimodal text tower's prefix)
    # and the module prefix PEFT sees on the loaded torch model.
    hf_prefix: str = "model."
    peft_prefix: str = "model."
    # Mixture of experts (every layer sparse when num_experts > 0): a softmax router picks
    # num_experts_per_tok experts of width moe_intermediate_size per token (weights renormalized to sum
    # to 1 when norm_topk_prob); Qwen2-MoE adds a shared expert gated by sigmoid(shared_expert_gate).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    # config.json's load-balancing loss coefficient, and whether transformers would add it in training.
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    # Checkpoint names of the sparse block and of each expert's gate/up/down projections.
    moe_block: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        from jaxsft.model.families import SUPPORTED_ACTIVATIONS, SUPPORTED_ROPE_TYPES

        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_scaling.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
            if unknown:
                raise ValueError(f"layer_types {unknown} are not supported; supported: {SLIDING}, {FULL}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Leading head dims that RoPE rotates (all of them unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_kinds(self) -> tuple[tuple[int | None, bool], ...]:
        """The distinct (sliding window or None, uses the local rope base) of the layers, in a fixed order."""
        return tuple(sorted(set(self._kind(i) for i in range(self.num_layers)), key=str))

    @property
    def layer_kind_index(self) -> tuple[int, ...]:
        """Per layer, its index into `layer_kinds`."""
        kinds = self.layer_kinds
        return tuple(kinds.index(self._kind(i)) for i in range(self.num_layers))

    def _kind(self, layer: int) -> tuple[int | None, bool]:
        if self.layer_types is None:
            return self.sliding_window, False
        sliding = self.layer_types[layer] == SLIDING
        return (self.sliding_window if sliding else None), sliding and self.local_rope_theta is not None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4.x `rope_scaling`/`rope_theta`
        or 5.x `rope_parameters` layouts), per the family table."""
        from jaxsft.model.families import config_from_hf

        return cls(**config_from_hf(hf))
