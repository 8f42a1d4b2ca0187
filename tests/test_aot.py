"""Deviceless compilation for TPU slices (`--compile_for`): the tiny model's real train step compiled for
v5e and v5p topologies on several meshes with every attention path, with libtpu and no TPU."""

from pathlib import Path

import pytest

from jaxsft.aot import compile_plan, parse_target
from jaxsft.config import build_config
from jaxsft.errors import ConfigError
from jaxsft.main import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples/tiny-llama")


def tiny_cfg(tmp_path, **overrides):
    return build_config({"model_name_or_path": TINY, "dataset": "identity",
                         "dataset_dir": str(ROOT / "examples/data"), "template": "llama3", "do_train": True, "output_dir": str(tmp_path), "cutoff_len": 128,
                         "per_device_train_batch_size": 1, "max_steps": 10, **overrides})


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v4-8", "v4:2x2x1", 4), ("v4-16", "v4:2x2x2", 8), ("v5p-64", "v5p:2x4x4", 32),
    ("v5e-4", "v5e:2x2", 4), ("v5e-8", "v5e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16), ("v6e-8", "v6e:2x4", 8),
    ("v6e-256", "v6e:16x16", 256), ("v5e:2x2", "v5e:2x2", 4), ("v5p:2x2x1", "v5p:2x2x1", 4),
])
def test_cloud_tpu_names(name, topology, chips):
    target = parse_target(name)
    assert (target.topology, target.chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v5p-6", "v3-8", "v5e", "v5e-12", "v5p:2x2", "h100-8"])
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
                            "tensor": 2 if mesh == "fsdp_tensor" else 1}
    # memory per chip: the state (params, Adam moments) is an argument, donated back as output
    assert train["argument"] > 0 and train["temp"] > 0 and train["alias"] > 0
    assert train["total"] < plan["hbm_bytes"]
    assert train["flops"] and train["flops"] > 0
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
