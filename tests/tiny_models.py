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

# name -> (config class, model class, overrides). Together they cover GQA and MHA, tied and untied
# embeddings, Llama-3.1 rope scaling, Mistral's sliding window, Qwen2 biases and Qwen3 q/k norms.
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
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1),  # head_dim != hidden / heads
    ),
}


def build_tiny_model(name: str, *, seed: int = 0, std: float = 0.1, num_layers: int | None = None,
                     **config_overrides):
    """A tiny random torch model in eval mode (eager attention). Every weight, including norms and
    biases, is random so no part of the math can hide behind ones or zeros. `config_overrides` change
    the shared shapes (e.g. vocab_size to fit a tokenizer)."""
    config_cls, model_cls, overrides = TINY_MODELS[name]
    kwargs = {**_BASE, **overrides, **config_overrides}
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def save_tiny_model(name: str, directory: str | Path, **kwargs):
    """Build, save with safetensors into `directory`, and return (model, directory)."""
    model = build_tiny_model(name, **kwargs)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory
