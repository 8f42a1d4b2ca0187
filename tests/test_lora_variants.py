"""LoRA variants LLaMA-Factory users train with: LoRA+ (per-group learning rates), PiSSA, DoRA."""

from pathlib import Path

import jax
import numpy as np

from jaxsft.config_load import build_config
from jaxsft.runtime import build_mesh, load_model
from jaxsft.sharding import global_batch
from jaxsft.train import build_train_step

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny-llama")
LORA = {"model_name_or_path": TINY, "finetuning_type": "lora", "lora_rank": 4, "lora_target": "all",
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "weight_decay": 0.01,
        "per_device_train_batch_size": 1, "seed": 3, "cutoff_len": 32}


def _batch(rows: int, length: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 1000, (1, rows, length)).astype(np.int32)
    targets = np.concatenate([ids[..., 1:], np.full((1, rows, 1), -100, np.int32)], axis=-1)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "targets": targets, "positions": positions, "segment_ids": np.ones_like(ids)}


def train(overrides: dict, steps: int) -> tuple[dict, list[dict]]:
    """(initial trainable params, trainable params after each step) on the same batches."""
    cfg = build_config({**LORA, **overrides})
    mesh = build_mesh(cfg)
    model = load_model(cfg, mesh)
    initial = jax.device_get(model.trainable)
    state, step = build_train_step(cfg, model, mesh, total_steps=steps)
    after = []
    for i in range(steps):
        batch = _batch(8 * cfg.per_device_train_batch_size, seed=i)
        state, _ = step(state, model.frozen, global_batch(batch, mesh, leading_dims=1))
        after.append(jax.device_get(state["trainable"]))
    return initial, after


def test_loraplus_moves_b_faster_than_lora_by_the_ratio():
    ratio = 16.0
    init, plain = train({}, steps=3)
    init_plus, plus = train({"loraplus_lr_ratio": ratio}, steps=3)
    b_keys = [k for k in init if k.endswith("lora_b")]
    a_keys = [k for k in init if k.endswith("lora_a")]
    assert len(b_keys) == 7 and len(a_keys) == 7
    for k in init:
        np.testing.assert_array_equal(init[k], init_plus[k])  # same start
    # Step 1: same gradients, so Adam's update of B is exactly `ratio` times larger, A's is unchanged.
    for k in b_keys:
        np.testing.assert_allclose(plus[0][k] - init[k], ratio * (plain[0][k] - init[k]), rtol=1e-5, atol=1e-9)
        assert np.abs(plain[0][k]).max() > 0
    for k in a_keys:
        np.testing.assert_allclose(plus[0][k] - init[k], plain[0][k] - init[k], rtol=1e-5, atol=1e-9)
    # Later steps: B keeps moving much faster (not exactly `ratio`: the gradients now differ).
    moved = {k: np.linalg.norm(plus[-1][k] - init[k]) / np.linalg.norm(plain[-1][k] - init[k]) for k in b_keys}
    assert all(4 < m < 2 * ratio for m in moved.values()), moved


def test_pissa_start_keeps_the_model_and_holds_the_top_singular_directions():
    from jaxsft.model.transformer import forward

    ids = _batch(2, seed=5)
    args = (ids["input_ids"][0], ids["positions"][0], ids["segment_ids"][0])
    plain_cfg = build_config({**LORA, "lora_rank": 4})
    plain = load_model(plain_cfg, build_mesh(plain_cfg))
    expected = np.asarray(forward(plain.params(), plain.config, *args, lora_scale=plain.runner.lora_scale))
    for iters in (-1, 8):
        cfg = build_config({**LORA, "lora_rank": 4, "pissa_init": True, "pissa_iter": iters})
        model = load_model(cfg, build_mesh(cfg))
        params, scale = model.params(), model.runner.lora_scale
        got = np.asarray(forward(params, model.config, *args, lora_scale=scale))
        np.testing.assert_allclose(got, expected, atol=1e-4)
        q = params["layers"]["self_attn"]["q_proj"]
        original = np.asarray(plain.params()["layers"]["self_attn"]["q_proj"]["kernel"], np.float64)
        u, s, vh = np.linalg.svd(original[0], full_matrices=False)
        top = (u[:, :4] * s[:4]) @ vh[:4]
        adapter = scale * np.asarray(q["lora_a"][0], np.float64) @ np.asarray(q["lora_b"][0], np.float64)
        if iters < 0:
            np.testing.assert_allclose(adapter, top, atol=1e-5)
        else:  # randomized (torch.svd_lowrank's method): most of the top-r energy on this flat random spectrum
            assert 0.9 < np.linalg.norm(adapter) / np.linalg.norm(top) <= 1 + 1e-6
        np.testing.assert_allclose(np.asarray(q["kernel"][0]), original[0] - adapter, atol=1e-5)


def test_dora_trains_and_exports_as_peft_saves_it(tmp_path):
    """DoRA starts at the base model, trains, and its adapter (lora_magnitude_vector) loads in peft with
    jaxsft's logits; the merged export loads in transformers with the same logits."""
    import json

    import torch
    import transformers
    from peft import PeftModel

    from jaxsft.export import export_from_config
    from jaxsft.model.transformer import forward
    from jaxsft.params import merge

    cfg = build_config({**LORA, "use_dora": True, "learning_rate": 1e-2, "lora_dropout": 0.1})
    mesh = build_mesh(cfg)
    model = load_model(cfg, mesh)
    scale = model.runner.lora_scale
    probe = _batch(2, seed=9)
    args = (probe["input_ids"][0], probe["positions"][0], probe["segment_ids"][0])
    base_model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    with torch.no_grad():
        base_logits = base_model(torch.tensor(args[0], dtype=torch.long)).logits.numpy()
    start = np.asarray(forward(model.params(), model.config, *args, lora_scale=scale))
    assert np.abs(start - base_logits).max() < 1e-4  # B = 0 and g = 1: the base model
    state, step = build_train_step(cfg, model, mesh, total_steps=3)
    for i in range(3):
        state, _ = step(state, model.frozen, global_batch(_batch(8, seed=i), mesh, leading_dims=1))
    params = jax.device_get(merge(state["trainable"], model.frozen, model.partition))
    magnitude = params["layers"]["mlp"]["down_proj"]["lora_magnitude"]
    assert magnitude.shape == (2, 64) and np.abs(magnitude - jax.device_get(
        model.trainable["layers/mlp/down_proj/lora_magnitude"])).max() > 1e-4  # it trained
    want = np.asarray(forward(params, model.config, *args, lora_scale=scale))
    assert np.abs(want - start).max() > 1e-3

    adapter = export_from_config(params, build_config({**LORA, "use_dora": True, "export_adapter": True}),
                                 model.config, scale, out_dir=tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(base_model, adapter).eval()
        got = peft_model(torch.tensor(args[0], dtype=torch.long)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
    # ... and reads back into jaxsft (adapter_name_or_path) with the same logits.
    from jaxsft import lora
    from jaxsft.model.hf import load_hf_params

    loaded, loaded_scale = lora.load_peft_adapter(adapter, load_hf_params(TINY, model.config), model.config)
    assert loaded_scale == scale and "lora_magnitude" in loaded["layers"]["mlp"]["down_proj"]
    again = np.asarray(forward(loaded, model.config, *args, lora_scale=loaded_scale))
    assert np.abs(again - want).max() < 1e-5

    merged = export_from_config(params, build_config({**LORA, "use_dora": True, "export_dtype": "float32"}),
                                model.config, scale, out_dir=tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf(torch.tensor(args[0], dtype=torch.long)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
