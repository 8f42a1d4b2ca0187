"""RoPE frequencies and RMSNorm against transformers' own functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxsft.model.config import ModelConfig
from jaxsft.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq

ROPE_CASES = {
    "default": {"rope_theta": 500000.0},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


def _hf_llama_config(**kwargs):
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, intermediate_size=64,
        num_hidden_layers=1, max_position_embeddings=131072, **kwargs
    )


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_inv_freq_matches_transformers(case):
    hf = _hf_llama_config(**ROPE_CASES[case])
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(hf)[0]
    else:
        want = ROPE_INIT_FUNCTIONS[rope_type](hf)[0]
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert cfg.head_dim == 128
    np.testing.assert_allclose(rope_inv_freq(cfg), want.numpy(), rtol=1e-6)
    if case != "default":  # the scaling really changes something
        assert not np.allclose(rope_inv_freq(cfg), rope_inv_freq(ModelConfig.from_hf(_hf_llama_config().to_dict())))


def test_apply_rope_matches_transformers():
    hf = _hf_llama_config(**ROPE_CASES["llama3"])
    cfg = ModelConfig.from_hf(hf.to_dict())
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    rng = np.random.default_rng(0)
    q_BTHD = rng.normal(size=(2, 5, 3, 128)).astype(np.float32)
    small_BT = np.array([[0, 1, 2, 3, 4], [7, 9, 30, 63, 0]])
    large_BT = np.array([[0, 1000, 2000, 3000, 4000], [7, 100, 5000, 20000, 0]])
    # torch's and numpy's fp32 pow differ in the last ulp of some inv_freq; at position p that is an
    # angle error near p * 6e-8, so large positions get a proportionally looser tolerance.
    for pos_BT, atol in ((small_BT, 1e-5), (large_BT, 5e-3)):
        cos_ref, sin_ref = rotary(torch.zeros(1), torch.tensor(pos_BT))
        want = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
            torch.tensor(q_BTHD), torch.tensor(q_BTHD), cos_ref, sin_ref, unsqueeze_dim=2
        )[0].numpy()
        cos, sin = rope_cos_sin(cfg, pos_BT, np.float32)
        np.testing.assert_allclose(apply_rope(q_BTHD, cos, sin), want, rtol=0, atol=atol)


def test_rms_norm_matches_transformers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    w = rng.normal(size=(16,)).astype(np.float32)
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(w))
        want = norm(torch.tensor(x)).numpy()
    np.testing.assert_allclose(rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)


def test_lora_update_gradients_equal_autodiff():
    """The hand-ordered backward of the LoRA bottleneck gives autodiff's gradients."""
    from jaxsft.model.layers import lora_update

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)

    def plain(x, a, b):
        return (((x @ a) @ b) * w).sum()

    def custom(x, a, b):
        return (lora_update(x, a, b) * w).sum()

    expected = jax.grad(plain, argnums=(0, 1, 2))(x, a, b)
    got = jax.grad(custom, argnums=(0, 1, 2))(x, a, b)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora_update(x, a, b), (x @ a) @ b, rtol=1e-6)


@pytest.mark.parametrize("kernel_trained", [False, True])
def test_merged_lora_matmul_equals_the_unmerged_layer(kernel_trained):
    """fp32 LoRA runs `x @ (W + s A B)` in one matmul; values and gradients equal PEFT's unmerged
    `x @ W + s (x @ A) @ B`, and the frozen kernel gets a gradient only when differentiated."""
    from jaxsft.model.layers import dense

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    p = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
         for name, shape in (("kernel", (8, 6)), ("lora_a", (8, 3)), ("lora_b", (3, 6)), ("bias", (6,)))}
    w = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    scale = 0.5

    def unmerged(x, p):
        return (((x @ p["kernel"] + p["bias"]) + scale * (x @ p["lora_a"]) @ p["lora_b"]) * w).sum()

    def merged(x, p):
        return (dense(x, p, lora_scale=scale) * w).sum()

    assert "merged_lora_matmul" in str(jax.make_jaxpr(merged)(x, p))  # fp32 takes the merged path
    np.testing.assert_allclose(merged(x, p), unmerged(x, p), rtol=1e-5)
    trained = ("kernel", "lora_a", "lora_b", "bias") if kernel_trained else ("lora_a", "lora_b")

    def grads(fn):
        def loss(x, trainable):
            return fn(x, {**p, **trainable})
        return jax.grad(loss, argnums=(0, 1))(x, {k: p[k] for k in trained})

    (gx_ref, gp_ref), (gx, gp) = grads(unmerged), grads(merged)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert set(gp) == set(trained)
    for k in trained:
        np.testing.assert_allclose(gp[k], gp_ref[k], rtol=1e-5, atol=1e-5)
    # A frozen kernel gets no [in, out] gradient product at all (the backward skips it).
    from jaxsft.model.layers import _merged_bwd
    g = jnp.ones((2, 5, 6), jnp.float32)
    frozen = _merged_bwd(scale, (x, p["kernel"], p["lora_a"], p["lora_b"], ()), g)
    trained_kernel = _merged_bwd(scale, (x, p["kernel"], p["lora_a"], p["lora_b"], (None,)), g)
    assert frozen[1] is None and trained_kernel[1].shape == (8, 6)


def test_bf16_lora_keeps_the_unmerged_path():
    from jaxsft.model.layers import dense

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.bfloat16)
    p = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
         for name, shape in (("kernel", (8, 6)), ("lora_a", (8, 3)), ("lora_b", (3, 6)))}
    jaxpr = str(jax.make_jaxpr(lambda x: dense(x, p, lora_scale=2.0))(x))
    assert "merged_lora_matmul" not in jaxpr
    expected = x @ p["kernel"].astype(jnp.bfloat16) + 2.0 * ((x @ p["lora_a"].astype(jnp.bfloat16))
                                                             @ p["lora_b"].astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(dense(x, p, lora_scale=2.0), np.float32), np.asarray(expected, np.float32),
                               rtol=2e-2, atol=2e-2)
