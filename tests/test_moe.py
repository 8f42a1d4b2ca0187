"""Mixture-of-experts models against transformers: the router's load-balancing loss (value and gradient),
padding routed nowhere, active-expert FLOPs, freeze / full / LoRA training, exports and a CLI run's log.
(Logits and packing are in tests/model/test_hf_parity.py with every family.)"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny_models import MOE_MODELS, save_tiny_model

from jaxsft import lora
from jaxsft.config_load import build_config
from jaxsft.errors import InputError
from jaxsft.export import export_hf, export_peft_adapter
from jaxsft.flops import matmul_params
from jaxsft.model import hf, transformer
from jaxsft.model.moe import load_balancing_loss
from jaxsft.params import Partition, flatten, full_partition, merge, split, unflatten
from jaxsft.runtime import ROUTER, _partition
from jaxsft.step import ModelRunner, init_state, make_train_step

REPO = Path(__file__).resolve().parents[1]
T = 12


@pytest.fixture(scope="module", params=MOE_MODELS)
def tiny(request, tmp_path_factory):
    name = request.param
    model, path = save_tiny_model(name, tmp_path_factory.mktemp(name))
    cfg = hf.load_hf_config(path)
    return name, model, path, cfg, hf.load_hf_params(path, cfg)


def _rows(lengths, seed=0):
    """ids, HF attention mask, segment ids, positions and shifted targets of right-padded rows."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(lengths), T), np.int64)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    ids = np.where(mask == 1, rng.integers(3, 256, mask.shape), 0)
    pos = (np.maximum(np.cumsum(mask, 1) - 1, 0) * mask).astype(np.int32)
    targets = np.where(np.roll(mask, -1, 1) * mask == 1, np.roll(ids, -1, 1), -100)
    targets[:, -1] = -100
    return ids, mask, mask.astype(np.int32), pos, targets.astype(np.int32)


def _our_aux(params, cfg, ids, seg, pos):
    _, stats = transformer.forward(params, cfg, ids, pos, seg, router_stats=True)
    rows = cfg.num_layers * float((seg != 0).sum())
    return float(load_balancing_loss(stats["expert_tokens"].sum(0), stats["expert_prob"].sum(0), rows)), stats


def test_config_reads_the_experts(tiny):
    name, model, _, cfg, params = tiny
    c = model.config
    assert cfg.num_experts == 4 and cfg.num_experts_per_tok == 2
    assert cfg.norm_topk_prob == (name in ("mixtral", "qwen3_moe"))
    assert cfg.moe_intermediate_size == 48
    assert cfg.shared_expert_intermediate_size == (96 if name == "qwen2_moe" else 0)
    assert cfg.router_aux_loss_coef == pytest.approx(c.router_aux_loss_coef)
    assert params["layers"]["mlp"]["experts"]["gate_proj"]["kernel"].shape == (2, 4, 64, 48)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_aux_loss_equals_transformers(tiny, padded):
    """transformers passes the attention mask to load_balancing_loss_func, which then counts only real
    tokens: our definition (padding routed nowhere) is the same, padded or not."""
    _, model, _, cfg, params = tiny
    ids, mask, seg, pos, _ = _rows([T, 9, 5] if padded else [T, T, T])
    ours, stats = _our_aux(params, cfg, ids, seg, pos)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask) if padded else None,
                    output_router_logits=True)
    assert abs(ours - float(out.aux_loss)) < 1e-5, (ours, float(out.aux_loss))
    # every real token reaches k experts; padding none
    np.testing.assert_array_equal(np.asarray(stats["expert_tokens"]).sum(1), 2 * mask.sum())


def test_padding_changes_neither_aux_loss_nor_expert_load(tiny):
    _, _, _, cfg, params = tiny
    ids, _, seg, pos, _ = _rows([7, 10])
    a, stats_a = _our_aux(params, cfg, ids, seg, pos)
    garbage = np.where(seg == 0, 77, ids)  # different pad ids: still routed nowhere
    b, stats_b = _our_aux(params, cfg, np.concatenate([garbage, np.full((1, T), 5)]),
                          np.concatenate([seg, np.zeros((1, T), np.int32)]), np.concatenate([pos, np.zeros((1, T), np.int32)]))
    assert a == pytest.approx(b, abs=1e-7)
    np.testing.assert_array_equal(stats_a["expert_tokens"], stats_b["expert_tokens"])


def _sgd_step(cfg, params, part, data, coef, scale=None):
    """One SGD (lr 1) step; returns (metrics, -gradient as a flat dict)."""
    trainable, frozen = split(flatten(params), part)
    runner = ModelRunner(cfg, part, lora_scale=scale, aux_loss_coef=coef)
    step = jax.jit(make_train_step(runner, optax.sgd(1.0), lambda s: 1.0))
    state, metrics = step(init_state(trainable, optax.sgd(1.0), 0), frozen, data)
    return metrics, {k: np.asarray(state["trainable"][k] - trainable[k]) for k in trainable}


def _batch(ids, seg, pos, targets, micro=1):
    arrays = dict(input_ids=ids, positions=pos, segment_ids=seg, targets=targets)
    return {k: jnp.asarray(v).reshape(micro, -1, T).astype(jnp.int32) for k, v in arrays.items()}


def test_train_step_gradient_equals_transformers_loss_plus_aux(tiny):
    """Full fine-tuning with the router trained: the step's loss, aux_loss and gradient are those of
    transformers' `loss` (mean CE + router_aux_loss_coef x aux_loss) on the same unpadded rows."""
    _, model, _, cfg, params = tiny
    ids, _, seg, pos, targets = _rows([T, T])
    coef = 0.3
    metrics, neg_grad = _sgd_step(cfg, params, full_partition(flatten(params)), _batch(ids, seg, pos, targets), coef)
    model.zero_grad()
    model.config.router_aux_loss_coef = coef
    model.router_aux_loss_coef = coef
    labels = np.concatenate([np.full((2, 1), -100), targets[:, :-1]], axis=1)  # HF shifts inside
    out = model(torch.tensor(ids), labels=torch.tensor(labels), output_router_logits=True)
    out.loss.backward()
    assert float(metrics["aux_loss"]) == pytest.approx(float(out.aux_loss.detach()), abs=1e-5)
    assert float(metrics["loss"]) + coef * float(metrics["aux_loss"]) == pytest.approx(float(out.loss.detach()), abs=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["expert_load"]).sum(), 1.0, rtol=1e-6)
    block = model.model.layers[0].mlp  # transformers 5 names Mixtral's block `mlp` in memory too
    router_grad = -neg_grad[ROUTER][0]
    ref = block.gate.weight.grad.numpy().T
    assert np.abs(ref).max() > 1e-4
    np.testing.assert_allclose(router_grad, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_aux_loss_unchanged_by_accumulation_and_padding(tiny):
    _, _, _, cfg, params = tiny
    part = Partition(trainable=frozenset({"layers/self_attn/q_proj/kernel"}))
    ids, _, seg, pos, targets = _rows([T, 8, 11, 5])
    one, g1 = _sgd_step(cfg, params, part, _batch(ids, seg, pos, targets), 0.1)
    two, g2 = _sgd_step(cfg, params, part, _batch(ids, seg, pos, targets, micro=2), 0.1)
    for key in ("loss", "aux_loss"):
        assert float(one[key]) == pytest.approx(float(two[key]), abs=1e-6), key
    np.testing.assert_allclose(one["expert_load"], two["expert_load"], atol=1e-7)
    # with the aux term on, its gradient is real; accumulation keeps it token-weighted (close, not equal:
    # each micro-batch's own expert frequencies weight it)
    key = "layers/self_attn/q_proj/kernel"
    _, g0 = _sgd_step(cfg, params, part, _batch(ids, seg, pos, targets), 0.0)
    _, g0_two = _sgd_step(cfg, params, part, _batch(ids, seg, pos, targets, micro=2), 0.0)
    np.testing.assert_allclose(g0_two[key], g0[key], atol=1e-6 * np.abs(g0[key]).max())  # LM part: exact
    aux1, aux2 = (g1[key] - g0[key]).ravel(), (g2[key] - g0_two[key]).ravel()
    assert np.abs(aux1).max() > 1e-7  # the aux term has a gradient
    cosine = aux1 @ aux2 / np.linalg.norm(aux1) / np.linalg.norm(aux2)
    ratio = np.linalg.norm(aux2) / np.linalg.norm(aux1)
    assert cosine > 0.6 and 0.5 < ratio < 2, (cosine, ratio)  # estimated frequencies: near, not equal


def test_flops_count_active_experts_only(tiny):
    """6 x the weights a token multiplies by: attention, the router, k of E experts, the shared expert."""
    _, model, _, cfg, _ = tiny
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "norm" in name or name.endswith("bias"):
            continue
        n = p.numel()
        if ".experts." in name or "experts.gate_up_proj" in name or "experts.down_proj" in name:
            n = n * cfg.num_experts_per_tok // cfg.num_experts
        total += n
    assert matmul_params(cfg) == total


def test_router_frozen_by_default():
    from jaxsft.model.config import ModelConfig

    cfg = ModelConfig(family="qwen3_moe", vocab_size=32, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=4)
    params = transformer.init_params(cfg, jax.random.key(0))
    flat = flatten(params)
    base = {"model_name_or_path": "x", "dataset": "x", "template": "llama3", "output_dir": "x"}
    for ft in ("full", "freeze"):
        part = _partition(flat, build_config({**base, "finetuning_type": ft}), cfg)
        assert ROUTER not in part.trainable | part.sliced and "layers/mlp/experts/up_proj/kernel" in part.trainable | part.sliced
    with_lora = flatten(lora.add_adapters(params, lora.target_modules(params, "all"), 2, jax.random.key(0)))
    lora_cfg = build_config({**base, "finetuning_type": "lora", "additional_target": "gate"})
    assert ROUTER not in _partition(with_lora, lora_cfg, cfg).trainable
    full = _partition(flat, build_config({**base, "finetuning_type": "full", "train_router": True}), cfg)
    assert ROUTER in full.trainable and "layers/mlp/experts/down_proj/kernel" in full.trainable


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _load(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def test_full_training_merged_export_loads_in_transformers(tiny, tmp_path):
    _, _, path, cfg, params = tiny
    ids, _, seg, pos, targets = _rows([T, T])
    part = full_partition(flatten(params))
    _, neg = _sgd_step(cfg, params, part, _batch(ids, seg, pos, targets), 0.01)
    tuned = merge({k: flatten(params)[k] + 30 * neg[k] for k in neg}, {}, part)
    want = np.asarray(transformer.forward(tuned, cfg, ids, pos, seg))
    assert np.abs(want - np.asarray(transformer.forward(params, cfg, ids, pos, seg))).max() > 0.05
    shutil.copyfile(REPO / "tests" / "fixtures" / "byte_tokenizer" / "tokenizer.json", path / "tokenizer.json")
    export_hf(tuned, cfg, path, tmp_path / "out", dtype="float32")
    with safe_open(path / "model.safetensors", "np") as src, safe_open(tmp_path / "out" / "model.safetensors", "np") as out:
        assert set(out.keys()) == set(src.keys())  # per-expert tensors, as transformers saves them
    assert np.abs(_torch_logits(_load(tmp_path / "out"), ids) - want).max() < 1e-4


def test_lora_on_attention_and_shared_expert_exports_to_peft(tiny, tmp_path):
    name, _, path, cfg, params = tiny
    targets_all = lora.target_modules(params, "all")
    assert "gate" not in targets_all and "w1" not in targets_all
    expected = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"]
                                                          if name == "qwen2_moe" else [])
    assert targets_all == expected
    adapted = lora.add_adapters(params, targets_all, 4, jax.random.key(0))
    part = lora.lora_partition(flatten(adapted))
    scale = lora.lora_scale(8, 4)
    ids, _, seg, pos, targets = _rows([T, T])
    _, neg = _sgd_step(cfg, adapted, part, _batch(ids, seg, pos, targets), 0.01, scale)
    tuned = merge({k: flatten(adapted)[k] + 30 * neg[k] for k in neg}, split(flatten(adapted), part)[1], part)
    want = np.asarray(transformer.forward(tuned, cfg, ids, pos, seg, lora_scale=scale))
    assert np.abs(want - np.asarray(transformer.forward(params, cfg, ids, pos, seg))).max() > 0.05
    export_peft_adapter(tuned, cfg, tmp_path / "adapter", rank=4, alpha=8, targets=targets_all)
    peft_model = PeftModel.from_pretrained(_load(path), str(tmp_path / "adapter")).eval()
    assert np.abs(_torch_logits(peft_model, ids) - want).max() < 1e-4
    export_hf(tuned, cfg, path, tmp_path / "merged", dtype="float32", lora_scale=scale)
    assert np.abs(_torch_logits(_load(tmp_path / "merged"), ids) - want).max() < 1e-4


def test_lora_on_experts_exports_to_peft_target_parameters(tiny, tmp_path):
    """LoRA on the routed experts (lora_target `experts`), trained one step: the PEFT adapter (transformers'
    fused 3-D expert parameters, PEFT's target_parameters) and the merged export give our logits."""
    name, _, path, cfg, params = tiny
    targets = lora.target_modules(params, "q_proj,experts")
    assert targets == ["q_proj", "experts"] and "experts" not in lora.target_modules(params, "all")
    adapted = lora.add_adapters(params, targets, 4, jax.random.key(0))
    experts = adapted["layers"]["mlp"]["experts"]
    assert experts["gate_up_proj"]["lora_a"].shape == (2, 4, 64, 4)
    assert experts["gate_up_proj"]["lora_b"].shape == (2, 4, 4, 96)
    assert experts["down_proj"]["lora_a"].shape == (2, 4, 48, 4)
    part = lora.lora_partition(flatten(adapted))
    assert "layers/mlp/experts/down_proj/lora_b" in part.trainable and ROUTER not in part.trainable
    scale = lora.lora_scale(8, 4)
    ids, _, seg, pos, targets_ = _rows([T, T])
    _, neg = _sgd_step(cfg, adapted, part, _batch(ids, seg, pos, targets_), 0.01, scale)
    for leaf in ("gate_up_proj/lora_b", "down_proj/lora_b"):  # every expert's adapter got a gradient
        g = np.asarray(neg[f"layers/mlp/experts/{leaf}"])
        assert (np.abs(g).reshape(g.shape[0] * g.shape[1], -1).max(-1) > 0).all()
    tuned = merge({k: flatten(adapted)[k] + 30 * neg[k] for k in neg}, split(flatten(adapted), part)[1], part)
    want = np.asarray(transformer.forward(tuned, cfg, ids, pos, seg, lora_scale=scale))
    only_q = unflatten({k: v for k, v in flatten(tuned).items() if "experts/" not in k or "lora" not in k})
    assert np.abs(want - np.asarray(transformer.forward(only_q, cfg, ids, pos, seg, lora_scale=scale))).max() > 0.05
    export_peft_adapter(tuned, cfg, tmp_path / "adapter", rank=4, alpha=8, targets=targets)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"]
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_model = PeftModel.from_pretrained(_load(path), str(tmp_path / "adapter")).eval()
    assert np.abs(_torch_logits(peft_model, ids) - want).max() < 1e-4
    export_hf(tuned, cfg, path, tmp_path / "merged", dtype="float32", lora_scale=scale)
    assert np.abs(_torch_logits(_load(tmp_path / "merged"), ids) - want).max() < 1e-4
    loaded, loaded_scale = lora.load_peft_adapter(tmp_path / "adapter", params, cfg)  # and read back
    assert loaded_scale == scale and lora.adapted_modules(loaded) == targets
    for k, v in flatten(tuned).items():
        np.testing.assert_array_equal(np.asarray(flatten(loaded)[k]), np.asarray(v), err_msg=k)
    from jaxsft.config import ConfigError
    from jaxsft.runtime import _add_lora

    run_cfg = build_config({"model_name_or_path": str(path), "dataset": "x", "template": "llama3", "output_dir": "x",
                            "finetuning_type": "lora", "adapter_name_or_path": str(tmp_path / "adapter"),
                            "lora_dropout": 0.1})
    with pytest.raises(ConfigError, match="adapts the experts, where lora_dropout is not supported"):
        _add_lora(params, run_cfg, cfg, jnp.float32)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": [
        "mlp.experts.down_proj"]}))
    with pytest.raises(InputError, match=r"target_parameters=\['mlp.experts.down_proj'\] is not supported"):
        lora.load_peft_adapter(tmp_path / "adapter", params, cfg)


@pytest.mark.parametrize("key", [{"lora_dropout": 0.1}, {"use_dora": True}, {"pissa_init": True}])
def test_lora_on_experts_refuses_what_peft_cannot_load(key):
    """PEFT's adapters on expert parameters refuse dropout, DoRA and PiSSA; so does the config, by key."""
    from jaxsft.config import ConfigError

    base = {"model_name_or_path": "x", "dataset": "x", "template": "llama3", "output_dir": "x",
            "finetuning_type": "lora", "lora_target": "q_proj,experts"}
    with pytest.raises(ConfigError, match=f"key '{next(iter(key))}' cannot be combined with LoRA on the experts"):
        build_config({**base, **key})
    assert build_config({**base, "lora_target": "q_proj", **key}).lora_target == "q_proj"


def test_lora_target_experts_on_a_dense_model_is_refused():
    from jaxsft.config import ConfigError
    from jaxsft.model.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ConfigError, match="'experts' names the routed experts.*this model has none"):
        lora.target_modules(transformer.init_params(cfg, jax.random.key(0)), "all,experts")


def test_cli_run_logs_aux_loss_and_expert_load(tmp_path):
    """A LoRA run (attention and experts) of a tiny Qwen3-MoE through run(): trainer_log.jsonl has aux_loss and
    expert_load, and the exported adapter holds the trained experts' adapters in PEFT's layout."""
    from jaxsft.main import run

    _, path = save_tiny_model("qwen3_moe", tmp_path / "model", vocab_size=1024)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REPO / "examples" / "tiny-llama" / f, path / f)
    cfg = build_config({
        "model_name_or_path": str(path), "dataset": "identity", "dataset_dir": str(REPO / "examples" / "data"),
        "template": "llama3", "cutoff_len": 128, "packing": True, "do_train": True, "finetuning_type": "lora",
        "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1, "report_to": "none",
        "moe_aux_loss_coef": 0.01, "output_dir": str(tmp_path / "out"), "lora_target": "all,experts",
        "export_dir": str(tmp_path / "adapter"), "export_adapter": True})
    run(cfg)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "np") as f:
        b = f.get_tensor("base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight")
        assert b.shape == (96, 4 * 8) and np.abs(b).max() > 0  # [2F, r * E], trained from zero
    lines = [json.loads(x) for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert len(train) == 2
    for r in train:
        assert r["aux_loss"] > 0 and len(r["expert_load"]) == 4
        assert sum(r["expert_load"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("bad", [{"decoder_sparse_step": 2}, {"mlp_only_layers": [0]}])
def test_dense_layers_among_sparse_ones_are_refused_by_name(bad):
    from jaxsft.model.config import ModelConfig

    hf_cfg = {"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 2, "num_attention_heads": 1, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 4, **bad}
    with pytest.raises(ValueError, match="qwen3_moe: decoder_sparse_step.*not supported"):
        ModelConfig.from_hf(hf_cfg)
    ok = ModelConfig.from_hf({**hf_cfg, "decoder_sparse_step": 1, "mlp_only_layers": []})
    assert ok.num_experts == 4
