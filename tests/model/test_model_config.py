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
    # a config.json without rope_theta gets transformers' default for the family
    assert ModelConfig.from_hf({"model_type": "qwen2", **SMALL}).rope_theta == 10000.0
    assert ModelConfig.from_hf({"model_type": "gemma3_text", **SMALL}).rope_theta == 1e6


def test_layer_patterns():
    """Which layers slide: Qwen2 from max_window_layers on (only with use_sliding_window), Gemma 2 every other
    layer, Gemma 3 five local to one global (sliding_window_pattern in older configs), each with a kind."""
    qwen2 = ModelConfig.from_hf(transformers.Qwen2Config(**{**SMALL, "num_hidden_layers": 4}, use_sliding_window=True,
                                                         sliding_window=8, max_window_layers=2).to_dict())
    assert qwen2.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2 and qwen2.sliding_window == 8
    assert qwen2.layer_kinds == ((8, False), (None, False)) and qwen2.layer_kind_index == (1, 1, 0, 0)
    off = ModelConfig.from_hf(transformers.Qwen2Config(**SMALL, sliding_window=8).to_dict())
    assert off.sliding_window is None and off.layer_kinds == ((None, False),)
    gemma2 = ModelConfig.from_hf(transformers.Gemma2Config(**SMALL, sliding_window=8).to_dict())
    assert gemma2.layer_types == ("sliding_attention", "full_attention")
    assert gemma2.attn_logit_softcap == 50.0 and gemma2.final_logit_softcap == 30.0 and gemma2.tie_word_embeddings
    legacy = dict(model_type="gemma3_text", **{**SMALL, "num_hidden_layers": 8}, sliding_window=8,
                  sliding_window_pattern=4, rope_theta=1e6, rope_local_base_freq=1e4,
                  rope_scaling={"rope_type": "linear", "factor": 8.0})
    gemma3 = ModelConfig.from_hf(legacy)
    assert gemma3.layer_types == (("sliding_attention",) * 3 + ("full_attention",)) * 2
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.rope_scaling) == (1e6, 1e4, RopeScaling("linear", 8.0))
    assert gemma3.layer_kinds == ((8, True), (None, False)) and gemma3.qk_norm and gemma3.norm_plus_one
    phi3 = ModelConfig.from_hf(dict(model_type="phi3", **SMALL, max_position_embeddings=64,
                                    original_max_position_embeddings=16, partial_rotary_factor=0.75,
                                    rope_scaling={"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}))
    assert phi3.fused_qkv and phi3.fused_gate_up and phi3.rotary_dim == 12
    assert (phi3.rope_scaling.rope_type, phi3.rope_scaling.factor, phi3.rope_scaling.long_factor) == (
        "longrope", 4.0, (2.0,) * 6)


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
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama, mistral, qwen2, qwen3, gemma, gemma2, "
                                         "gemma3_text, gemma3, phi3, qwen2_moe, qwen3_moe, mixtral"):
        ModelConfig.from_hf({"model_type": "gpt2", **SMALL})
    with pytest.raises(ValueError, match="rope scaling type 'mrope'.*llama3, yarn, dynamic, longrope"):
        ModelConfig.from_hf(dict(model_type="llama", **SMALL, rope_scaling={"rope_type": "mrope", "factor": 2.0}))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported; supported: silu"):
        ModelConfig.from_hf(dict(model_type="llama", **SMALL, hidden_act="relu"))
    with pytest.raises(ValueError, match="gemma2: hidden_activation 'silu'.*gelu_pytorch_tanh"):
        ModelConfig.from_hf(dict(model_type="gemma2", **SMALL, hidden_activation="silu"))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_hf(transformers.Gemma3TextConfig(**SMALL, use_bidirectional_attention=True).to_dict())
    with pytest.raises(ValueError, match="sliding windows are not supported"):
        ModelConfig.from_hf(dict(model_type="llama", **SMALL, use_sliding_window=True, sliding_window=8))
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf(transformers.LlamaConfig(**SMALL, attention_bias=True).to_dict())
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf(dict(model_type="llama", **{**SMALL, "num_key_value_heads": 3}))
