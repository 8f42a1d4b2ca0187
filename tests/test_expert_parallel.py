"""The `expert` mesh axis: experts sharded over it, the batch shared with it. Losses of a few training
steps of a tiny Qwen3-MoE (LoRA on attention and on the experts) through the CLI on 1 device equal those
on expert-parallel meshes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import save_tiny_model

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]
GLOBAL_ROWS = 8


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory) -> Path:
    _, path = save_tiny_model("qwen3_moe", tmp_path_factory.mktemp("moe") / "model", vocab_size=1024)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REPO / "examples" / "tiny-llama" / f, path / f)
    return path


def _args(path: Path, out: Path, mesh: dict, rows_per_device: int) -> list[str]:
    values = {
        "model_name_or_path": path, "dataset": "identity", "dataset_dir": REPO / "examples" / "data",
        "template": "llama3", "cutoff_len": 64, "packing": True, "do_train": True, "finetuning_type": "lora",
        "lora_target": "all,experts", "lora_rank": 4, "learning_rate": 1e-2,
        "per_device_train_batch_size": rows_per_device, "max_steps": 2,
        "logging_steps": 1, "report_to": "none", "disable_tqdm": True, "moe_aux_loss_coef": 0.01,
        "save_strategy": "no", "output_dir": out, "mesh": json.dumps(mesh)}
    return [f"{k}={v}" for k, v in values.items()]


def _losses(out: Path) -> np.ndarray:
    lines = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    return np.array([(r["loss"], r["aux_loss"]) for r in lines if "loss" in r])


def _run_on(devices: int, args: list[str]) -> None:
    """The CLI in a process with `devices` simulated CPU devices (this one has 8)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    proc = subprocess.run([sys.executable, "-c", "import sys; from jaxsft.main import cli; sys.exit(cli())", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_expert_parallel_losses_equal_one_device(moe_path, tmp_path):
    """Same 8 rows a step everywhere: 1 device x 8 rows, {expert: 4} x 2, and 8-device meshes x 1."""
    _run_on(1, _args(moe_path, tmp_path / "one", {"data": 1, "fsdp": 1}, GLOBAL_ROWS))
    want = _losses(tmp_path / "one")
    assert want.shape == (2, 2) and np.all(want > 0)
    assert want[0, 0] != want[1, 0]  # the steps train: each step's loss differs
    _run_on(4, _args(moe_path, tmp_path / "e4", {"fsdp": 1, "expert": 4}, GLOBAL_ROWS // 4))
    np.testing.assert_allclose(_losses(tmp_path / "e4"), want, rtol=2e-5)
    for name, mesh in {"fsdp2_e4": {"fsdp": 2, "expert": 4}, "data2_e4": {"data": 2, "fsdp": 1, "expert": 4}}.items():
        assert cli(_args(moe_path, tmp_path / name, mesh, GLOBAL_ROWS // 8)) == 0
        np.testing.assert_allclose(_losses(tmp_path / name), want, rtol=2e-5, err_msg=name)


def test_expert_axis_must_divide_the_experts(moe_path, tmp_path, capsys):
    """The tiny model has 4 experts: an expert axis of 8 does not split them."""
    assert cli(_args(moe_path, tmp_path / "bad", {"fsdp": 1, "expert": 8}, 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: mesh axis 'expert' (8) does not divide the model's 4 experts; use a divisor of 4"]
