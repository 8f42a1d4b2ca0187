"""Exports load in transformers and PEFT and give jaxsft's logits: merged, adapter, sharded, bf16, checkpoint."""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from tiny_models import save_tiny_model

from jaxsft import lora
from jaxsft.checkpoint import Checkpoints
from jaxsft.config_load import build_config
from jaxsft.export import export_from_config, export_hf, export_peft_adapter, run_export
from jaxsft.model import hf, transformer
from jaxsft.optim import build_optimizer
from jaxsft.params import flatten, full_partition, merge, split
from jaxsft.step import ModelRunner, init_state, make_train_step

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import convert_checkpoint  # noqa: E402

B, T = 2, 12
TOL = 1e-4
TOKENIZER = Path(__file__).parent / "fixtures" / "byte_tokenizer" / "tokenizer.json"


def batch(seed=0):
    ids_BT = np.random.default_rng(seed).integers(3, 256, (B, T)).astype(np.int32)
    return ids_BT, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), np.ones((B, T), np.int32)


def torch_logits(model, ids_BT):
    with torch.no_grad():
        return model(torch.tensor(ids_BT, dtype=torch.long)).logits.float().numpy()


def load_hf(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()


def jax_logits(params, cfg, ids_BT, scale=None):
    pos, seg = np.broadcast_to(np.arange(ids_BT.shape[1], dtype=np.int32), ids_BT.shape), np.ones_like(ids_BT)
    return np.asarray(transformer.forward(params, cfg, ids_BT, pos, seg, lora_scale=scale))


def base_model(name, directory):
    _, path = save_tiny_model(name, directory)
    shutil.copyfile(TOKENIZER, path / "tokenizer.json")
    cfg = hf.load_hf_config(path)
    return path, cfg, hf.load_hf_params(path, cfg)


# (model, additional_target): untied llama trains lm_head fully; tied qwen2 / gemma2 train embed_tokens (= their
# lm_head); the multimodal gemma3 checkpoint trains only adapters (its vision tower has norms and embeddings too).
TRAIN_CASES = [("llama", "lm_head"), ("qwen2", "embed_tokens"), ("gemma2", "embed_tokens"),
               ("gemma3_text", "lm_head"), ("gemma3", ""), ("phi3", "lm_head")]


def train_steps(cfg, params, part, scale=None, steps=4, attention_impl="xla"):
    """A few high-LR steps on one batch; returns the merged tree."""
    trainable, frozen = split(flatten(params), part)
    optimizer, schedule = build_optimizer(build_config({"learning_rate": 3e-2, "lr_scheduler_type": "constant"}),
                                          steps + 1)
    runner = ModelRunner(cfg, part, lora_scale=scale, attention_impl=attention_impl)
    step = jax.jit(make_train_step(runner, optimizer, schedule))
    state = init_state(trainable, optimizer, seed=0)
    ids, pos, seg = batch(1)
    targets = np.concatenate([ids[:, 1:], np.full((B, 1), -100, np.int32)], axis=1)
    data = {k: jnp.asarray(v)[None] for k, v in dict(input_ids=ids, positions=pos, segment_ids=seg,
                                                         targets=targets).items()}
    for _ in range(steps):
        state, metrics = step(state, frozen, data)
        assert np.isfinite(float(metrics["loss"]))
    return merge(state["trainable"], frozen, part)


@pytest.fixture(scope="module", params=TRAIN_CASES, ids=lambda c: c[0])
def trained(request, tmp_path_factory):
    """A tiny model after a few high-LR LoRA steps: (source dir, ModelConfig, params with adapters, scale, extra)."""
    name, extra = request.param
    path, cfg, params = base_model(name, tmp_path_factory.mktemp(name))
    params = lora.add_adapters(params, lora.target_modules(params, "all"), 4, jax.random.key(0))
    part = lora.lora_partition(flatten(params), extra)
    scale = lora.lora_scale(16, 4, use_rslora=True)
    params = train_steps(cfg, params, part, scale)
    adapted = lora.target_modules(params, "all")[0]  # q_proj, or phi3's fused qkv_proj
    assert np.abs(params["layers"]["self_attn"][adapted]["lora_b"]).max() > 1e-3
    return path, cfg, params, scale, extra


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3", "qwen2_yarn_window"])
def test_freeze_training_then_merged_export(name, tmp_path):
    """Freeze tuning (last layer, plus the final norm) through the block-sparse kernel (windows, soft-caps):
    the first layer stays bit-identical, and the merged export gives transformers jaxsft's logits."""
    from jaxsft.params import freeze_partition

    path, cfg, params = base_model(name, tmp_path / "base")
    run = build_config({"finetuning_type": "freeze", "freeze_trainable_layers": 1, "freeze_extra_modules": "norm"})
    part = freeze_partition(flatten(params), run, cfg.num_layers)
    tuned = train_steps(cfg, params, part, attention_impl="xla_blocksparse")
    before, after = flatten(params), flatten(tuned)
    for key in before:
        if key.startswith("layers/"):
            np.testing.assert_array_equal(np.asarray(after[key])[0], np.asarray(before[key])[0], err_msg=key)
    assert not np.array_equal(np.asarray(after["norm/scale"]), np.asarray(before["norm/scale"]))
    ids = batch(2)[0]
    want = jax_logits(tuned, cfg, ids)
    assert np.abs(want - jax_logits(params, cfg, ids)).max() > 0.1  # training mattered
    export_hf(tuned, cfg, path, tmp_path / "out")
    assert np.abs(torch_logits(load_hf(tmp_path / "out"), ids) - want).max() < TOL


def test_merged_export_matches_transformers(trained, tmp_path):
    path, cfg, params, scale, _ = trained
    ids = batch(2)[0]
    want = jax_logits(params, cfg, ids, scale)
    assert np.abs(want - jax_logits(lora.merge_adapters(params, 0.0), cfg, ids)).max() > 0.1  # training mattered
    export_hf(params, cfg, path, tmp_path, dtype="float32", shard_size_gb=5, lora_scale=scale)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    got = torch_logits(load_hf(tmp_path), ids)
    assert np.abs(got - want).max() < TOL
    with safe_open(path / "model.safetensors", "np") as src, safe_open(tmp_path / "model.safetensors", "np") as out:
        assert set(out.keys()) == set(src.keys())  # same layout (a multimodal model keeps its vision tower)
        for name in src.keys():
            if "vision_tower" in name:
                np.testing.assert_array_equal(out.get_tensor(name), src.get_tensor(name), err_msg=name)


def test_adapter_export_matches_peft(trained, tmp_path):
    path, cfg, params, scale, extra = trained
    export_peft_adapter(params, cfg, tmp_path, rank=4, alpha=16, targets=lora.target_modules(params, "all"),
                        use_rslora=True, base_model_name_or_path=str(path), modules_to_save=[extra])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    with safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
        names = set(f.keys())
        a = f.get_tensor(f"base_model.model.{cfg.peft_prefix}layers.1.mlp.down_proj.lora_A.weight")
        b = f.get_tensor(f"base_model.model.{cfg.peft_prefix}layers.1.mlp.down_proj.lora_B.weight")
    assert a.shape == (4, 128) and b.shape == (64, 4)
    if cfg.fused_qkv:  # phi3: LoRA on the fused projections, as PEFT puts it on that model
        assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight" in names
        assert sorted(config["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    peft_model = PeftModel.from_pretrained(load_hf(path), tmp_path).eval()
    if cfg.peft_prefix != "model.":  # multimodal: PEFT adapted the text tower only
        adapted = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
        assert adapted and all(".language_model." in n for n in adapted), sorted(adapted)[:3]
    ids = batch(2)[0]
    want = torch_logits(peft_model, ids)
    assert np.abs(want - jax_logits(params, cfg, ids, scale)).max() < TOL
    # LLaMA-Factory's export stage: base + adapter_name_or_path -> merged model.
    run_export(build_config({"model_name_or_path": str(path), "adapter_name_or_path": str(tmp_path),
                             "export_dir": str(tmp_path / "merged")}))
    assert np.abs(torch_logits(load_hf(tmp_path / "merged"), ids) - want).max() < TOL
    # ...and jaxsft reads its own export back to the same tree.
    loaded, loaded_scale = lora.load_peft_adapter(tmp_path, hf.load_hf_params(path, cfg), cfg)
    assert loaded_scale == pytest.approx(scale)
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(loaded)[key]), np.asarray(value), err_msg=key)


def test_sharded_and_bf16_export(tmp_path):
    path, cfg, params = base_model("llama", tmp_path / "base")
    ids = batch(3)[0]
    want = jax_logits(params, cfg, ids)
    sharded = export_hf(params, cfg, path, tmp_path / "sharded", dtype="float32", shard_size_gb=60e3 / 1e9)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    assert np.abs(torch_logits(load_hf(sharded), ids) - want).max() < 1e-5

    bf16 = export_hf(params, cfg, path, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(bf16 / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16
    expected_q = params["layers"]["self_attn"]["q_proj"]["kernel"][0].T.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(q.view(torch.int16).numpy(), expected_q.view(np.int16))  # exact RNE rounding
    model = load_hf(bf16)
    assert model.dtype == torch.bfloat16
    got = torch_logits(load_hf(bf16, dtype=torch.float32), ids)
    err = np.abs(got - want).max()
    assert 0 < err < 0.05 * np.abs(want).max()


def test_convert_checkpoint(tmp_path, capsys):
    path, cfg, params = base_model("qwen2", tmp_path / "base")
    run = build_config({"model_name_or_path": str(path), "finetuning_type": "lora", "lora_rank": 4,
                        "lora_target": "q_proj,v_proj", "additional_target": "norm"})
    flat = flatten(lora.add_adapters(params, ["q_proj", "v_proj"], 4, jax.random.key(0)))
    flat["layers/self_attn/q_proj/lora_b"] = 0.1 * jax.random.normal(jax.random.key(1), (2, 4, 64))
    flat["norm/scale"] = flat["norm/scale"] * 1.5
    part = lora.lora_partition(flat, run.additional_target)
    trainable, frozen = split(flat, part)
    optimizer, _ = build_optimizer(run, 10)
    checkpoints = Checkpoints(tmp_path / "run", async_save=False)
    checkpoints.save(7, init_state(trainable, optimizer, 0), frozen, {}, run.to_dict(), part)
    checkpoints.close()

    ids = batch(4)[0]
    want = jax_logits(merge(trainable, frozen, part), cfg, ids, lora.lora_scale(8, 4))
    assert convert_checkpoint.main(["--checkpoint", str(tmp_path / "run"), "--export_dir", str(tmp_path / "m")]) == 0
    assert np.abs(torch_logits(load_hf(tmp_path / "m"), ids) - want).max() < TOL
    assert convert_checkpoint.main(["--checkpoint", str(tmp_path / "run" / "checkpoint_7"), "--adapter",
                                    "--export_dir", str(tmp_path / "a")]) == 0
    peft_model = PeftModel.from_pretrained(load_hf(path), tmp_path / "a").eval()
    assert np.abs(torch_logits(peft_model, ids) - want).max() < TOL

    # Mistakes are one line on stderr and status 2: no checkpoint in the directory, --adapter on a full run.
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert convert_checkpoint.main(["--checkpoint", str(tmp_path / "empty"), "--export_dir", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == f"error: no complete checkpoint found in {tmp_path / 'empty'}\n"
    full = Checkpoints(tmp_path / "full", async_save=False)
    full_run = build_config({"model_name_or_path": str(path), "finetuning_type": "full"})
    full.save(1, init_state(flatten(params), build_optimizer(full_run, 10)[0], 0), {}, {}, full_run.to_dict(),
              full_partition(flatten(params)))
    full.close()
    assert convert_checkpoint.main(["--checkpoint", str(tmp_path / "full"), "--adapter",
                                    "--export_dir", str(tmp_path / "f")]) == 2
    assert "--adapter needs a LoRA run; this checkpoint is finetuning_type: full" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()
    # A full fine-tuning checkpoint (nothing frozen) exports as a model that transformers loads.
    assert convert_checkpoint.main(["--checkpoint", str(tmp_path / "full"), "--export_dir", str(tmp_path / "fm")]) == 0
    assert np.abs(torch_logits(load_hf(tmp_path / "fm"), ids) - jax_logits(params, cfg, ids)).max() < TOL

    # export_from_config refuses an adapter export without adapters
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_from_config(params, build_config({"export_dir": str(tmp_path / "x"), "export_adapter": True}), cfg)
