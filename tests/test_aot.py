"""Deviceless compilation for TPU slices (`--compile_for`): the tiny model's real train step compiled for
v5e and v5p topologies on several meshes with every attention path, with libtpu and no TPU."""

import importlib.util
from pathlib import Path

import pytest

from jaxsft.aot import compile_plan, parse_target
from jaxsft.config_load import build_config
from jaxsft.errors import ConfigError
from jaxsft.main import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples/tiny-llama")


def tiny_cfg(tmp_path, **overrides):
    return build_config({"model_name_or_path": TINY, "dataset": "identity",
                         "dataset_dir": str(ROOT / "examples/data"), "template": "llama3", "do_train": True,
                         "output_dir": str(tmp_path), "cutoff_len": 128,
                         "per_device_train_batch_size": 1, "max_steps": 10, **overrides})


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v4-8", "v4:2x2x1", 4), ("v4-16", "v4:2x2x2", 8), ("v5p-64", "v5p:2x4x4", 32),
    ("v5e-4", "v5e:2x2", 4), ("v5e-8", "v5e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16), ("v6e-8", "v6e:2x4", 8),
    ("v6e-256", "v6e:16x16", 256), ("v5e:2x2", "v5e:2x2", 4), ("v5p:2x2x1", "v5p:2x2x1", 4),
    ("h100-8", "1x1x8", 8),
])
def test_cloud_tpu_names(name, topology, chips):
    target = parse_target(name)
    assert (target.topology, target.chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v5p-6", "v3-8", "v5e", "v5e-12", "v5p:2x2", "h100-16", "a100-8"])
def test_bad_names_are_user_errors(name):
    with pytest.raises(ConfigError, match="compile_for"):
        parse_target(name)


MESHES = {"fsdp": {"fsdp": -1}, "data_fsdp": {"data": 2, "fsdp": -1}, "fsdp_tensor": {"fsdp": -1, "tensor": 2}}
# splash on every mesh of both topologies; each XLA path on one mesh of each (keeps CI fast).
CASES = [(topo, mesh, "splash") for topo in ("v5e:2x2", "v5p:2x2x1") for mesh in MESHES] + [
    (topo, mesh, impl) for topo in ("v5e:2x2", "v5p:2x2x1")
    for mesh, impl in zip(MESHES, ("xla", "xla_chunked", "xla_blocksparse"))]


@pytest.mark.parametrize("topology, mesh, impl", CASES)
def test_train_step_compiles_for_tpu(tmp_path, topology, mesh, impl):
    plan = compile_plan(tiny_cfg(tmp_path, mesh=MESHES[mesh], attention_impl=impl), topology)
    (train,) = plan["steps"]
    assert plan["chips"] == 4 and plan["device_kind"].startswith("TPU v5")
    assert plan["mesh"] == {"data": 2 if mesh == "data_fsdp" else 1, "fsdp": 2 if mesh != "fsdp" else 4,
                            "expert": 1, "tensor": 2 if mesh == "fsdp_tensor" else 1}
    # memory per chip: the state (params, Adam moments) is an argument, donated back as output
    assert train["argument"] > 0 and train["output"] > 0 and train["alias"] > 0 and train["temp"] >= 0
    assert train["argument"] <= train["total"] < plan["hbm_bytes"]
    assert train["flops"] > 0 and train["xla_flops"] > 0
    # the fused kernel is in the program as a Mosaic custom call; the XLA paths have none
    assert ("tpu_custom_call" in train["hlo"]) == (impl == "splash")


def test_auto_picks_splash_for_tpu_and_cli_reports_every_stage(tmp_path, capsys):
    """`--compile_for` through the CLI: train, eval and generation compiled, a line per step, fits."""
    code = cli(["--config", str(ROOT / "configs/quickstart_predict.yaml"), "--compile_for", "v5e-4",
                f"model_name_or_path={TINY}", "do_train=true", "do_eval=true", f"output_dir={tmp_path}",
                "cutoff_len=128", "max_new_tokens=8", "dataset=identity", "eval_dataset=identity"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "compile_for v5e-4: 4 x TPU v5 lite (topology v5e:2x2, 16 GiB HBM per chip)" in out
    assert "attention splash" in out
    for step in ("train", "eval", "predict"):
        assert any(line.split()[:1] == [step] and line.split()[-2] == "yes" for line in out.splitlines()), out
    assert "-> fits" in out
    assert not (tmp_path / "checkpoint_1").exists()  # nothing ran


def test_cli_refuses_an_unknown_tpu(tmp_path, capsys):
    code = cli(["--config", str(ROOT / "configs/quickstart_lora.yaml"), "--compile_for", "v9z-8",
                f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: compile_for: unknown TPU 'v9z-8'")


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_cuda_plugin(),
                    reason="needs the CUDA plugin (pip install -e '.[cuda-aot]'); no GPU needed")
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_train_step_compiles_for_h100s_without_a_gpu(tmp_path, impl):
    """The same plan for one host of 8 H100s (XLA's target description, the CUDA plugin, no GPU): the
    Pallas kernel runs per shard as a Triton custom call."""
    plan = compile_plan(tiny_cfg(tmp_path, attention_impl=impl, bf16=True, mesh={"fsdp": 4, "tensor": 2}), "h100-8")
    (train,) = plan["steps"]
    assert plan["chips"] == 8 and plan["device_kind"] == "NVIDIA H100 80GB HBM3" and plan["hbm_bytes"] == 80 * 2**30
    assert train["argument"] > 0 and train["temp"] > 0 and train["total"] < plan["hbm_bytes"]
    assert ('custom_call_target="__gpu$xla.gpu.triton"' in train["hlo"]) == (impl == "pallas")


def test_auto_attention_is_chosen_for_the_target_devices():
    """From a CPU host, `auto` picks splash for a TPU mesh (no trial run on the local CPU), sliding windows
    included; decoding takes an XLA path."""
    import dataclasses

    from jaxsft.aot import target_devices
    from jaxsft.model.hf import load_hf_config
    from jaxsft.runtime import resolve_attention_impl
    from jaxsft.sharding import make_mesh

    mesh = make_mesh({"fsdp": -1}, target_devices(parse_target("v5e:2x2")))
    model_cfg = load_hf_config(TINY)
    assert resolve_attention_impl("auto", 128, mesh=mesh, model=model_cfg) == "splash"
    windowed = dataclasses.replace(model_cfg, sliding_window=64)
    assert resolve_attention_impl("auto", 8192, mesh=mesh, model=windowed) == "splash"
    assert resolve_attention_impl("auto", 128, mesh=mesh, model=model_cfg, decode=True) == "xla"


def test_every_shipped_config_names_a_slice_and_a_model_shape(monkeypatch):
    """tools/check_configs.py compiles each shipped config for the slice it names (BENCHMARKS.md has the
    results); here, cheaply: every config loads, names a slice jaxsft can lay out (or none: CPU quickstarts,
    checked on v5e-4) and a model whose config.json is at hand, or says in one line why it is no run
    config (tools/bench.py's family configs leave the template to the bench)."""
    from jaxsft.config_load import load_config
    from jaxsft.errors import UserError
    from jaxsft.model.hf import load_hf_config

    monkeypatch.chdir(ROOT)
    paths = sorted(p for d in ("configs", "examples/configs") for p in (ROOT / d).rglob("*.yaml"))
    named, not_runs = [], []
    for path in paths:
        try:
            cfg = load_config(str(path), [])
        except UserError as e:
            not_runs.append(str(e))
            continue
        parse_target(cfg.compile_for or "v5e-4")
        assert load_hf_config(cfg.model_name_or_path).num_layers > 0
        named += [cfg.compile_for] if cfg.compile_for else []
    assert sorted(named) == ["v5p-64", "v5p-8", "v5p-8", "v5p-8"]
    assert all("\n" not in why and "is required" in why for why in not_runs), not_runs
