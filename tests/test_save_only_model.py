"""save_only_model: checkpoints without optimizer state; they export, but resuming from them is refused."""

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from jaxsft.checkpoint import holds_optimizer_state, read_trained_params
from jaxsft.config_load import build_config
from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "model_name_or_path": str(REPO / "examples" / "tiny-llama"), "dataset": "identity",
    "dataset_dir": str(REPO / "examples" / "data"), "template": "llama3", "cutoff_len": 128, "packing": True,
    "do_train": True, "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 1,
    "learning_rate": 1e-3, "max_steps": 2, "save_steps": 1, "logging_steps": 1, "report_to": "none",
}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoints_hold_no_optimizer_state_export_and_refuse_resume(tmp_path, capsys):
    from jaxsft.train import run_training

    full, slim = tmp_path / "full", tmp_path / "slim"
    run_training(build_config({**BASE, "output_dir": str(full)}))
    run_training(build_config({**BASE, "output_dir": str(slim), "save_only_model": True}))
    assert holds_optimizer_state(full, 2) and not holds_optimizer_state(slim, 2)
    tree = ocp.StandardCheckpointer().metadata(slim / "checkpoint_2" / "optimizer").item_metadata.tree
    assert sorted(tree) == ["rng", "step"]
    # Adam's two moments are twice the adapters' size: the slim optimizer item is much smaller.
    assert _size(slim / "checkpoint_2" / "optimizer") < 0.6 * _size(full / "checkpoint_2" / "optimizer")
    # Same training, same params; they read back for export.
    params_full, _ = read_trained_params(full)
    params_slim, _ = read_trained_params(slim)
    a = params_slim["layers"]["self_attn"]["q_proj"]["lora_b"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(params_full["layers"]["self_attn"]["q_proj"]["lora_b"]))
    assert np.abs(np.asarray(a)).max() > 0
    # Resuming is refused in one line (exit 2), naming the checkpoint and what to do instead.
    capsys.readouterr()
    code = cli([f"{k}={v}" for k, v in {**BASE, "output_dir": slim, "max_steps": 3,
                                        "resume_from_checkpoint": True}.items()])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"error: {slim.absolute()}/checkpoint_2 was saved with save_only_model: true and holds no "
                       f"optimizer state, so training cannot resume from it; export it (export_dir, or "
                       f"tools/convert_checkpoint.py) and start a new run from the exported model")
