"""Safetensors loading (single, sharded, bf16), export round trip, and loader errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from tiny_models import build_tiny_model, save_tiny_model

from jaxsft.model import hf


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def saved(request, tmp_path_factory):
    model, path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    cfg = hf.load_hf_config(path)
    return model, path, cfg, hf.load_hf_params(path, cfg)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
    model, _, cfg, params = saved
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert len(json.loads((tmp_path / hf.INDEX_FILE).read_text())["weight_map"]) > 0
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    _assert_trees_equal(hf.load_hf_params(tmp_path, cfg), params)


def test_export_round_trip(saved, tmp_path):
    model, _, cfg, params = saved
    state = hf.params_to_hf_state_dict(params, cfg)
    want = {k: v.numpy() for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert sorted(state) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    # a fresh HF model accepts the dict strictly, and our loader reads the written file back
    fresh = type(model)(model.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=not cfg.tie_word_embeddings)
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    save_file(state, str(tmp_path / "model.safetensors"))
    _assert_trees_equal(hf.load_hf_params(tmp_path, cfg), params)


def test_bf16_checkpoint_and_dtype(tmp_path):
    model = build_tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = hf.load_hf_config(tmp_path)
    as_bf16 = hf.load_hf_params(tmp_path, cfg, dtype=jnp.bfloat16)
    as_fp32 = hf.load_hf_params(tmp_path, cfg)
    emb = model.model.embed_tokens.weight.detach().float().numpy()
    assert as_bf16["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(as_fp32["embed_tokens"]["embedding"], emb)
    np.testing.assert_array_equal(as_bf16["embed_tokens"]["embedding"].astype(np.float32), emb)


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    model, _, cfg, params = saved
    state = hf.params_to_hf_state_dict(params, cfg)
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        hf.load_hf_params(tmp_path, cfg)
    save_file({**state, "model.layers.2.mlp.up_proj.weight": state["model.layers.1.mlp.up_proj.weight"]},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        hf.load_hf_params(tmp_path, cfg)
    bad = dict(state, **{"model.norm.weight": np.zeros(3, np.float32)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), expected \(64,\)"):
        hf.load_hf_params(tmp_path, cfg)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(build_tiny_model("llama").config.to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*convert them to safetensors"):
        hf.load_hf_params(tmp_path, hf.load_hf_config(tmp_path))


def test_offline_hub_name_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        hf.load_hf_config("some-org/some-model-that-is-not-a-dir")
