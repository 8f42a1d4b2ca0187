"""Tiny random Hugging Face models of each supported family, saved as safetensors, for tests.

    from tests.tiny_models import save_tiny_model
    model, path = save_tiny_model("qwen2", tmp_dir)   # torch model (eval mode) and its directory
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# Shared small shapes: hidden 64, 2 layers, vocab 256.
_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_S, _F = "sliding_attention", "full_attention"

# name -> (config class, model class, overrides). Together they cover GQA and MHA, tied and untied
# embeddings, Llama-3.1 / YaRN / dynamic-NTK / longrope rope scaling with partial rotary dims, sliding
# windows on every layer (Mistral, Phi-3) and on some (Qwen2 max_window_layers, Gemma's interleaved
# local/global layers with their own rope base), Qwen2 biases, q/k norms, Gemma's (1 + w) norms,
# sandwich norms, GeGLU, scaled embeddings, query_pre_attn_scalar and soft-caps, Phi-3's fused
# projections, and a multimodal Gemma 3 checkpoint's text tower. Windows (6) are shorter than the
# test rows (16) and original_max_position_embeddings (8) is exceeded, so every feature is live.
TINY_MODELS = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        # original_max_position_embeddings=8 puts the frequencies in all three llama3 bands.
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
            rope_theta=500000.0,
        ),
    ),
    "llama_tied_mha": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "llama_dynamic": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(rope_scaling=dict(rope_type="dynamic", factor=4.0), max_position_embeddings=8),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=6, head_dim=16),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(tie_word_embeddings=True, rope_theta=1000000.0),
    ),
    # Qwen2.5's long-context setup: YaRN, and sliding windows on the layers from max_window_layers on.
    "qwen2_yarn_window": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
             max_position_embeddings=32, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1),  # head_dim != hidden / heads
    ),
    "gemma": (
        transformers.GemmaConfig,
        transformers.GemmaForCausalLM,
        dict(head_dim=16, hidden_act="gelu_pytorch_tanh"),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
             final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, num_hidden_layers=3,
             layer_types=[_S, _F, _S], tie_word_embeddings=False,
             rope_parameters={_F: dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                              _S: dict(rope_type="default", rope_theta=1e4)}),
    ),
    # Gemma3ForConditionalGeneration: the text tower of a multimodal checkpoint (tiny vision tower).
    "gemma3": (
        transformers.Gemma3Config,
        transformers.Gemma3ForConditionalGeneration,
        dict(text_config=dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=16, layer_types=[_F, _S],
                              bos_token_id=1, eos_token_id=2, pad_token_id=0),
             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14),
             mm_tokens_per_image=4, boi_token_index=250, eoi_token_index=251, image_token_index=252),
    ),
    # Phi-3/4: fused qkv_proj and gate_up_proj, longrope (short and long factors), partial rotary dims
    # (Phi-4-mini), a window on every layer (Phi-3-mini).
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(max_position_embeddings=32, original_max_position_embeddings=8, sliding_window=6,
             rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                  short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.2, 2.0, 3.5, 6.0])),
    ),
    # Mixtures of experts (top-2 of 4, every layer sparse): Qwen3-MoE with and without renormalized top-k
    # weights, Qwen2-MoE's sigmoid-gated shared expert (and q/k/v biases), Mixtral's w1/w2/w3 experts.
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, head_dim=16),
    ),
    "qwen3_moe_unnormed": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False, head_dim=16),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=96),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    ),
}

MOE_MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_unnormed")

# Models whose rope depends on the sequence length (dynamic NTK, longrope): transformers keys it on the
# longest row of a batch (and dynamic keeps what it grew to), jaxsft on each example's own length.
LENGTH_DEPENDENT_ROPE = ("llama_dynamic", "phi3")


def reset_rope(model) -> None:
    """Put a torch model's dynamic rope back in its initial state (dynamic NTK caches what it grew to)."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
            module.inv_freq = module.original_inv_freq.clone()
            module.max_seq_len_cached = module.original_max_seq_len


def build_tiny_model(name: str, *, seed: int = 0, std: float = 0.1, num_layers: int | None = None,
                     **config_overrides):
    """A tiny random torch model in eval mode (eager attention). Every weight, including norms and
    biases, is random so no part of the math can hide behind ones or zeros. `config_overrides` change
    the shared shapes (e.g. vocab_size to fit a tokenizer)."""
    config_cls, model_cls, overrides = TINY_MODELS[name]
    if "text_config" in overrides:  # multimodal: the shared shapes are the text tower's
        text = {**_BASE, **overrides["text_config"], **config_overrides}
        if num_layers is not None:
            text["num_hidden_layers"] = num_layers
            text.pop("layer_types", None)
        kwargs = {**overrides, "text_config": text}
    else:
        kwargs = {**_BASE, **overrides, **config_overrides}
        if num_layers is not None:
            kwargs["num_hidden_layers"] = num_layers
            kwargs.pop("layer_types", None)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", "layernorm.weight")):
                # Gemma's norms scale by (1 + w): random w around 0 is the same spread of scales
                plus_one = "gemma" in config.model_type
                p.copy_((0.0 if plus_one else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def save_tiny_model(name: str, directory: str | Path, **kwargs):
    """Build, save with safetensors into `directory`, and return (model, directory)."""
    model = build_tiny_model(name, **kwargs)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory
