"""ModelConfig.from_hf for each family, both config.json layouts, and its errors."""

import pytest
import transformers

from jaxsft.model.config import ModelConfig, RopeScaling

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)


def test_families():
    llama = ModelConfig.from_hf(transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 2}).to_dict())
    assert (llama.family, llama.num_kv_heads, llama.head_dim, llama.qkv_bias, llama.qk_norm) == ("llama", 2, 16, False, False)
    qwen2 = ModelConfig.from_hf(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True).to_dict())
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.tie_word_embeddings and qwen2.sliding_window is None
    qwen3 = ModelConfig.from_hf(transformers.Qwen3Config(**SMALL, head_dim=32).to_dict())
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 32
    mistral = ModelConfig.from_hf(transformers.MistralConfig(**SMALL, sliding_window=4096).to_dict())
    assert mistral.sliding_window == 4096 and mistral.family == "mistral"


def test_legacy_rope_scaling_layout():
    """transformers 4.x config.json: rope_theta at the top, rope_scaling with 'type' or 'rope_type'."""
    hf = dict(
        model_type="llama", **SMALL, rope_theta=500000.0, eos_token_id=[1, 2],
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    )
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (1, 2)
    hf["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf(hf).rope_scaling == RopeScaling("linear", 2.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="model_type 'gemma'.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf({"model_type": "gemma", **SMALL})
    with pytest.raises(ValueError, match="rope scaling type 'yarn'.*llama3"):
        ModelConfig.from_hf(dict(model_type="llama", **SMALL, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf(transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8).to_dict())
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf(transformers.LlamaConfig(**SMALL, attention_bias=True).to_dict())
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf(dict(model_type="llama", **{**SMALL, "num_key_value_heads": 3}))
