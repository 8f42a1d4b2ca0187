"""Transformer mechanics on random params: compile time vs depth, remat, LoRA hook, logical axes."""

import dataclasses
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.model import transformer
from jaxsft.model.config import ModelConfig
from jaxsft.model.layers import dense

CFG = ModelConfig(
    family="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
B, T = 2, 16


def _batch(seed=0):
    ids_BT = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T))
    pos_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return ids_BT, pos_BT, np.ones((B, T), np.int32)


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(0), std=0.1)


def _compile_seconds(cfg: ModelConfig) -> float:
    shapes = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    fn = jax.jit(lambda p, i, po, s: transformer.forward(p, cfg, i, po, s))  # fresh: no cache hit
    start = time.perf_counter()
    fn.lower(shapes, ids, ids, ids).compile()
    return time.perf_counter() - start


def test_compile_time_does_not_grow_with_depth():
    # min of two tries each: the machine is shared, and only the scan structure should matter.
    shallow = min(_compile_seconds(dataclasses.replace(CFG, num_layers=2)) for _ in range(2))
    deep = min(_compile_seconds(dataclasses.replace(CFG, num_layers=16)) for _ in range(2))
    assert deep < 1.5 * shallow, (shallow, deep)


def _gemma3(num_layers: int) -> ModelConfig:
    """Gemma 3's layer pattern (five sliding-window layers with their own rope base, then a global one)
    at the shapes of CFG; two layers are one of each kind."""
    types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]
    if num_layers == 2:
        types = ["sliding_attention", "full_attention"]
    return ModelConfig.from_hf(dict(model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, sliding_window=4, layer_types=types))


def test_compile_time_flat_in_depth_for_mixed_layer_patterns():
    """Sliding and global layers stay under one scan (a lax.switch per layer), so 16 layers of Gemma 3's
    pattern compile about as fast as 2."""
    assert len(_gemma3(16).layer_kinds) == 2 and _gemma3(16).layer_kind_index[:6] == (0, 0, 0, 0, 0, 1)
    shallow = min(_compile_seconds(_gemma3(2)) for _ in range(2))
    deep = min(_compile_seconds(_gemma3(16)) for _ in range(2))
    assert deep < 1.5 * shallow, (shallow, deep)


def test_init_params_matches_contract(params):
    L, D, V, F = CFG.num_layers, CFG.hidden_size, CFG.vocab_size, CFG.intermediate_size
    assert params["embed_tokens"]["embedding"].shape == (V, D)
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (L, D, 4 * 16)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (L, D, 2 * 16)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (L, F, D)
    assert params["lm_head"]["kernel"].shape == (D, V)
    assert "bias" not in params["layers"]["self_attn"]["q_proj"]
    qwen3 = transformer.init_params(
        dataclasses.replace(CFG, qk_norm=True, qkv_bias=True, tie_word_embeddings=True), jax.random.key(0)
    )
    assert qwen3["layers"]["self_attn"]["q_norm"]["scale"].shape == (L, 16)
    assert qwen3["layers"]["self_attn"]["v_proj"]["bias"].shape == (L, 2 * 16)
    assert "lm_head" not in qwen3


@pytest.mark.parametrize("policy, attention_impl", [("full", "xla"), ("dots_saveable", "xla"),
                                                    ("dots_with_no_batch_dims_saveable", "xla"),
                                                    ("offload_dots", "xla"),
                                                    ("full", "xla_blocksparse"),
                                                    ("full_keep_attention", "xla_blocksparse")])
def test_remat_policies_give_same_grads(params, policy, attention_impl):
    ids_BT, pos_BT, seg_BT = _batch()

    def loss(p, remat_policy):
        logits_BTV = transformer.forward(p, CFG, ids_BT, pos_BT, seg_BT, remat_policy=remat_policy,
                                         attention_impl=attention_impl)
        return jax.nn.log_softmax(logits_BTV).mean()

    ref = jax.jit(jax.grad(lambda p: loss(p, "none")))(params)
    got = jax.jit(jax.grad(lambda p: loss(p, policy)))(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _count_while_loops(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "while"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_while_loops(sub)
    return count


def test_full_keep_attention_runs_no_attention_forward_twice(params):
    """Under `full`, the backward reruns each layer's block-sparse attention loop; under
    `full_keep_attention` (the default) it keeps the attention output and log-sum-exp instead."""
    ids_BT, pos_BT, seg_BT = _batch()

    def grad_jaxpr(remat_policy):
        def loss(p):
            logits_BTV = transformer.forward(p, CFG, ids_BT, pos_BT, seg_BT, remat_policy=remat_policy,
                                             attention_impl="xla_blocksparse")
            return logits_BTV.mean()
        return jax.make_jaxpr(jax.grad(loss))(params).jaxpr

    loops = {policy: _count_while_loops(grad_jaxpr(policy)) for policy in ("none", "full", "full_keep_attention")}
    # Each loop appears once in the scanned layer body: forward and backward, plus the rerun forward.
    assert loops["none"] == loops["full_keep_attention"] == loops["full"] - 1


def test_unknown_remat_policy_lists_names(params):
    ids_BT, pos_BT, seg_BT = _batch()
    with pytest.raises(ValueError, match="dots_with_no_batch_dims_saveable"):
        transformer.forward(params, CFG, ids_BT, pos_BT, seg_BT, remat_policy="everything")


def test_fp32_params_bf16_compute(params):
    ids_BT, pos_BT, seg_BT = _batch()
    h_BTD = transformer.hidden_states(params, CFG, ids_BT, pos_BT, seg_BT, compute_dtype=jnp.bfloat16)
    assert h_BTD.dtype == jnp.bfloat16 and h_BTD.shape == (B, T, CFG.hidden_size)
    assert transformer.lm_logits(params, CFG, h_BTD).dtype == jnp.float32


def test_dense_lora_hook_equals_merged_weight():
    rng = np.random.default_rng(0)
    x_BTI = rng.normal(size=(2, 3, 8)).astype(np.float32)
    p = {
        "kernel": rng.normal(size=(8, 5)).astype(np.float32),
        "bias": rng.normal(size=(5,)).astype(np.float32),
        "lora_a": rng.normal(size=(8, 2)).astype(np.float32),
        "lora_b": rng.normal(size=(2, 5)).astype(np.float32),
    }
    merged_IO = p["kernel"] + 0.5 * p["lora_a"] @ p["lora_b"]
    np.testing.assert_allclose(dense(x_BTI, p, lora_scale=0.5), x_BTI @ merged_IO + p["bias"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lora_scale"):
        dense(x_BTI, p)
    plain = {k: p[k] for k in ("kernel",)}
    np.testing.assert_allclose(dense(x_BTI, plain), x_BTI @ p["kernel"], rtol=1e-6)


def test_forward_applies_lora_adapters(params):
    """An adapter on q_proj changes logits exactly as merging it into the kernel would."""
    ids_BT, pos_BT, seg_BT = _batch()
    L, D = CFG.num_layers, CFG.hidden_size
    out = params["layers"]["self_attn"]["q_proj"]["kernel"].shape[-1]
    a_LDR = 0.1 * jax.random.normal(jax.random.key(1), (L, D, 4))
    b_LRO = 0.1 * jax.random.normal(jax.random.key(2), (L, 4, out))
    adapted = jax.tree.map(lambda x: x, params)
    adapted["layers"]["self_attn"]["q_proj"] = {"kernel": params["layers"]["self_attn"]["q_proj"]["kernel"],
                                                "lora_a": a_LDR, "lora_b": b_LRO}
    merged = jax.tree.map(lambda x: x, params)
    merged["layers"]["self_attn"]["q_proj"] = {
        "kernel": params["layers"]["self_attn"]["q_proj"]["kernel"] + 2.0 * a_LDR @ b_LRO
    }
    got = transformer.forward(adapted, CFG, ids_BT, pos_BT, seg_BT, lora_scale=2.0)
    want = transformer.forward(merged, CFG, ids_BT, pos_BT, seg_BT)
    base = transformer.forward(params, CFG, ids_BT, pos_BT, seg_BT)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(got - base)).max() > 1e-3  # the adapter did something


def test_param_logical_axes():
    cfg = dataclasses.replace(CFG, qkv_bias=True, qk_norm=True)
    params = transformer.init_params(cfg, jax.random.key(0))
    params["layers"]["mlp"]["down_proj"]["lora_a"] = jnp.zeros((2, 128, 4))
    params["layers"]["mlp"]["down_proj"]["lora_b"] = jnp.zeros((2, 4, 64))
    axes = transformer.param_logical_axes(params)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    # same structure, one name (or None) per dim
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
        assert len(names) == leaf.ndim
    attn, mlp = axes["layers"]["self_attn"], axes["layers"]["mlp"]
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")
    assert attn["q_proj"]["kernel"] == ("layers", "embed", "heads")
    assert attn["k_proj"]["bias"] == ("layers", "kv_heads")
    assert attn["o_proj"]["kernel"] == ("layers", "heads", "embed")
    assert attn["q_norm"]["scale"] == ("layers", None)
    assert mlp["down_proj"]["lora_a"] == ("layers", "mlp", "lora_rank")
    assert mlp["down_proj"]["lora_b"] == ("layers", "lora_rank", "embed")
    assert axes["norm"]["scale"] == (None,)
    fused = transformer.param_logical_axes(transformer.init_params(
        dataclasses.replace(CFG, fused_qkv=True, fused_gate_up=True, sandwich_norms=True), jax.random.key(0)))
    assert fused["layers"]["self_attn"]["qkv_proj"]["kernel"] == ("layers", "embed", "heads")
    assert fused["layers"]["mlp"]["gate_up_proj"]["kernel"] == ("layers", "embed", "mlp")
    assert fused["layers"]["post_feedforward_layernorm"]["scale"] == ("layers", None)
