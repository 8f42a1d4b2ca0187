"""LoRA transforms: targets match PEFT's, PEFT adapters load with PEFT's logits, only adapters train."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from peft import LoraConfig, get_peft_model
from tiny_models import build_tiny_model, save_tiny_model

from jaxsft import lora
from jaxsft.config import ConfigError
from jaxsft.config_load import build_config
from jaxsft.errors import InputError, MissingPath
from jaxsft.model import families, hf, transformer
from jaxsft.optim import build_optimizer
from jaxsft.params import flatten, merge, split
from jaxsft.sharding import make_mesh, tree_shardings
from jaxsft.step import ModelRunner, init_state, make_train_step

B, T = 2, 12
TOL = 1e-4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (model dir, ModelConfig, params) for the tiny llama (untied, GQA) and qwen2 (tied, biases)."""
    out = {}
    for name in ("llama", "qwen2"):
        _, path = save_tiny_model(name, tmp_path_factory.mktemp(name))
        cfg = hf.load_hf_config(path)
        out[name] = (path, cfg, hf.load_hf_params(path, cfg))
    return out


def batch(seed=0):
    ids_BT = np.random.default_rng(seed).integers(3, 256, (B, T)).astype(np.int32)
    return ids_BT, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), np.ones((B, T), np.int32)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3"])
def test_target_all_is_peft_all_linear(name, tmp_path):
    """`all` is PEFT's all-linear, and the family table's module names (phi3: the fused qkv_proj/gate_up_proj)."""
    _, path = save_tiny_model(name, tmp_path)
    cfg = hf.load_hf_config(path)
    params = hf.load_hf_params(path, cfg)
    peft_model = get_peft_model(build_tiny_model(name), LoraConfig(r=2, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    modules = lora.target_modules(params, "all")
    with_adapters = lora.add_adapters(params, modules, 2, jax.random.key(0))
    ours = {name.removesuffix(".lora_A.weight").removeprefix(lora.PEFT_PREFIX)
            for name in lora.peft_state_dict(with_adapters, cfg) if name.endswith("lora_A.weight")}
    assert ours == peft_names and len(ours) == len(families.linear_modules(cfg.family)) * cfg.num_layers
    assert tuple(modules) == families.linear_modules(cfg.family)


def test_target_lists_and_errors(bases):
    params = bases["llama"][2]
    assert lora.target_modules(params, "v_proj, q_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"module 'qproj' not found.*q_proj, k_proj, v_proj, o_proj, gate_proj"):
        lora.target_modules(params, "qproj")
    with pytest.raises(ConfigError, match="additional_target: lm_head"):
        lora.target_modules(params, "q_proj,lm_head")


def test_add_adapters_init_like_peft(bases):
    _, cfg, params = bases["llama"]
    adapted = lora.add_adapters(params, ["q_proj", "down_proj"], 8, jax.random.key(1))
    assert "lora_a" not in params["layers"]["self_attn"]["q_proj"]  # input untouched
    down = adapted["layers"]["mlp"]["down_proj"]
    assert down["lora_a"].shape == (2, 128, 8) and down["lora_b"].shape == (2, 8, 64)
    assert not np.any(down["lora_b"])
    bound = 1 / np.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    a = np.asarray(down["lora_a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    ids, pos, seg = batch()
    np.testing.assert_array_equal(transformer.forward(adapted, cfg, ids, pos, seg, lora_scale=2.0),
                                  transformer.forward(params, cfg, ids, pos, seg))


def test_scale():
    assert lora.lora_scale(16, 8) == 2.0
    assert lora.lora_scale(16, 16, use_rslora=True) == 4.0


# (model, target_modules, use_rslora, modules_to_save)
PEFT_CASES = [
    ("llama", "all-linear", False, None),
    ("llama", ["q_proj", "v_proj", "down_proj"], True, ["embed_tokens", "lm_head"]),
    ("qwen2", "all-linear", True, ["embed_tokens"]),  # tied: PEFT keeps lm_head tied via ensure_weight_tying
]


@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: f"{c[0]}-rslora{c[2]}-save{bool(c[3])}")
def test_peft_adapter_loads_with_peft_logits(case, bases, tmp_path):
    name, targets, rslora, to_save = case
    path, cfg, params = bases[name]
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                        modules_to_save=to_save, ensure_weight_tying=cfg.tie_word_embeddings and bool(to_save))
    peft_model = get_peft_model(build_tiny_model(name), config)
    with torch.no_grad():  # make the saved modules differ from the base ones
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path)
    ids, pos, seg = batch()
    with torch.no_grad():
        want = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()

    adapted, scale = lora.load_peft_adapter(tmp_path, params, cfg)
    assert scale == pytest.approx(12 / (np.sqrt(4) if rslora else 4))
    got = np.asarray(transformer.forward(adapted, cfg, ids, pos, seg, lora_scale=scale))
    base = np.asarray(transformer.forward(params, cfg, ids, pos, seg))
    assert np.abs(base - want).max() > 0.1  # the adapter matters
    assert np.abs(got - want).max() < TOL
    merged = lora.merge_adapters(adapted, scale)
    assert not lora.has_adapters(merged)
    assert np.abs(np.asarray(transformer.forward(merged, cfg, ids, pos, seg)) - want).max() < TOL


def test_peft_adapter_errors(bases, tmp_path):
    path, cfg, params = bases["llama"]
    with pytest.raises(MissingPath, match="no adapter_config.json"):
        lora.load_peft_adapter(tmp_path, params, cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_bias": True}))
    with pytest.raises(InputError, match="lora_bias=True is not supported"):
        lora.load_peft_adapter(tmp_path, params, cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(MissingPath, match="no adapter_model.safetensors"):
        lora.load_peft_adapter(tmp_path, params, cfg)


def test_partition_and_errors(bases):
    params = lora.add_adapters(bases["llama"][2], ["q_proj", "v_proj"], 4, jax.random.key(0))
    flat = flatten(params)
    part = lora.lora_partition(flat, "embed_tokens,model.norm")
    assert part.trainable == {"layers/self_attn/q_proj/lora_a", "layers/self_attn/q_proj/lora_b",
                              "layers/self_attn/v_proj/lora_a", "layers/self_attn/v_proj/lora_b",
                              "embed_tokens/embedding", "norm/scale"}
    # PEFT's modules_to_save suffix rule, as LLaMA-Factory passes additional_target: `norm` is every norm.
    assert lora.lora_partition(flat, "norm").trainable - part.trainable == {
        "layers/input_layernorm/scale", "layers/post_attention_layernorm/scale"}
    with pytest.raises(ConfigError, match="module 'embed' not found; choose from .*embed_tokens"):
        lora.lora_partition(flat, "embed")
    with pytest.raises(ConfigError, match="selects layers/self_attn/q_proj, which LoRA adapts"):
        lora.lora_partition(flat, "q_proj")
    tied = flatten(lora.add_adapters(bases["qwen2"][2], ["q_proj"], 4, jax.random.key(0)))
    with pytest.raises(ConfigError, match="ties lm_head to embed_tokens"):
        lora.lora_partition(tied, "lm_head")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.lora_partition(flatten(bases["llama"][2]))


@pytest.fixture(scope="module")
def lora_training(bases):
    """LoRA on every linear layer of the tiny llama: cfg, flat params, partition, split, optimizer, batch,
    and jitted train steps by lora_dropout (compiled once for the module)."""
    _, cfg, params = bases["llama"]
    flat = flatten(lora.add_adapters(params, lora.target_modules(params, "all"), 4, jax.random.key(0)))
    part = lora.lora_partition(flat)
    trainable, frozen = split(flat, part)
    optimizer, schedule = build_optimizer(build_config({"learning_rate": 1e-2, "weight_decay": 0.1}), 10)
    ids, pos, seg = batch()
    targets = np.concatenate([ids[:, 1:], np.full((B, 1), -100, np.int32)], axis=1)
    data = {k: jnp.asarray(v)[None] for k, v in dict(input_ids=ids, positions=pos, segment_ids=seg,
                                                         targets=targets).items()}
    steps = {rate: jax.jit(make_train_step(ModelRunner(cfg, part, lora_scale=2.0, lora_dropout=rate), optimizer,
                                           schedule)) for rate in (0.0, 0.5)}
    return dict(cfg=cfg, flat=flat, part=part, trainable=trainable, frozen=frozen, optimizer=optimizer,
                data=data, steps=steps)


def test_adapter_training_touches_only_adapters(lora_training):
    t = lora_training
    flat, part, frozen, step = t["flat"], t["part"], t["frozen"], t["steps"][0.0]
    frozen_before = {k: np.array(v) for k, v in frozen.items()}
    state, data = init_state(t["trainable"], t["optimizer"], seed=0), t["data"]
    losses = []
    for _ in range(3):
        state, metrics = step(state, frozen, data)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert set(state["trainable"]) == {p for p in flat if p.endswith(("lora_a", "lora_b"))}
    assert all(np.any(state["trainable"][p]) for p in state["trainable"] if p.endswith("lora_b"))
    after = flatten(merge(state["trainable"], frozen, part))
    for path, before in frozen_before.items():
        assert np.array_equal(np.asarray(after[path]), before), path
    # Optimizer state: one moment per adapter leaf, keyed by adapter paths; nothing shaped like a base weight.
    opt_leaves = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    keyed = {p[-1].key: leaf.shape for p, leaf in opt_leaves if hasattr(p[-1], "key")}
    assert set(keyed) == set(state["trainable"])
    assert all(keyed[k] == state["trainable"][k].shape for k in keyed)
    array_leaves = [leaf for _, leaf in opt_leaves if leaf.ndim > 0]
    assert len(array_leaves) == 2 * len(state["trainable"])  # adam mu and nu
    assert sum(leaf.size for leaf in array_leaves) == 2 * sum(v.size for v in state["trainable"].values())


def test_adapter_sharding_follows_logical_axes(bases):
    params = lora.add_adapters(bases["llama"][2], ["q_proj", "down_proj"], 4, jax.random.key(0))
    flat = flatten(params)
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    shardings = tree_shardings(flat, flatten(transformer.param_logical_axes(params)), mesh)
    assert shardings["layers/self_attn/q_proj/lora_a"].spec == P(None, "fsdp", None)
    assert shardings["layers/self_attn/q_proj/lora_b"].spec == P(None, None, "tensor")
    assert shardings["layers/mlp/down_proj/lora_a"].spec == P(None, "tensor", None)
    assert shardings["layers/mlp/down_proj/lora_b"].spec == P(None, None, "fsdp")
    placed = jax.device_put(flat, shardings)
    assert len(placed["layers/self_attn/q_proj/lora_b"].sharding.device_set) == 8


def test_lora_dropout_only_in_training(lora_training):
    from jaxsft.model.layers import dense

    dense = jax.jit(dense, static_argnums=(2, 3))
    rng = np.random.default_rng(0)
    x_BTI = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    p = {"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
         "lora_a": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
         "lora_b": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}
    clean = dense(x_BTI, p, 0.5)
    np.testing.assert_array_equal(dense(x_BTI, p, 0.5, 0.3), clean)  # no rng: no dropout
    one = dense(x_BTI, p, 0.5, 0.3, jax.random.key(0))
    assert np.abs(one - clean).max() > 1e-3
    np.testing.assert_array_equal(dense(x_BTI, p, 0.5, 0.3, jax.random.key(0)), one)  # same key, same mask
    np.testing.assert_array_equal(dense(x_BTI, {**p, "lora_b": 0 * p["lora_b"]}, 0.5, 0.3, jax.random.key(0)),
                                  dense(x_BTI, {**p, "lora_b": 0 * p["lora_b"]}, 0.5))  # base path untouched
    # Inverted dropout keeps the expectation: the mean over many masks is the clean output.
    many = jax.jit(jax.vmap(lambda k: dense(x_BTI, p, 0.5, 0.3, k)))(jax.random.split(jax.random.key(1), 4000))
    assert np.abs(many.mean(0) - clean).max() < 0.05 * np.abs(clean).max()

    # In the train step: dropout changes the updates, deterministically (same rng state, same masks).
    t = lora_training

    def two_steps(rate):
        state = init_state(t["trainable"], t["optimizer"], seed=0)
        for _ in range(2):
            state, metrics = t["steps"][rate](state, t["frozen"], t["data"])
        return state["trainable"]["layers/self_attn/q_proj/lora_b"], float(metrics["loss"])

    (plain, plain_loss), (dropped, dropped_loss) = two_steps(0.0), two_steps(0.5)
    assert plain_loss != dropped_loss and np.abs(plain - dropped).max() > 1e-6
    np.testing.assert_array_equal(two_steps(0.5)[0], dropped)
