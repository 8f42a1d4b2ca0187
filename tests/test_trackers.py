"""report_to: wandb (offline) and mlflow (local file store) at once: the runs hold the series trainer_log.jsonl holds."""

from pathlib import Path

from run_logs import log_lines, wandb_history

from jaxsft.config_load import build_config
from jaxsft.train import run_training

REPO = Path(__file__).resolve().parents[1]


def test_wandb_offline_and_mlflow_log_the_trainer_log_series(tmp_path, monkeypatch):
    import mlflow  # the test extra installs mlflow-skinny
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "jaxsft-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to a file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lf-experiment")
    out = tmp_path / "out"
    cfg = build_config({
        "model_name_or_path": str(REPO / "examples" / "tiny-llama"), "dataset": "identity",
        "dataset_dir": str(REPO / "examples" / "data"), "template": "llama3", "cutoff_len": 128, "packing": True,
        "do_train": True, "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 1,
        "learning_rate": 3e-3, "max_steps": 4, "logging_steps": 1, "val_size": 0.1, "eval_strategy": "steps",
        "eval_steps": 2, "save_strategy": "no", "report_to": "wandb,mlflow,tensorboard", "run_name": "lf-run",
        "output_dir": str(out),
    })
    run_training(cfg)
    lines = log_lines(out)
    train_loss = {r["current_steps"]: r["loss"] for r in lines if "loss" in r}
    eval_loss = {r["current_steps"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    assert sorted(train_loss) == [1, 2, 3, 4] and sorted(eval_loss) == [2, 4]
    assert list((out / "runs").iterdir())  # TensorBoard too

    # W&B, offline: the run's transaction log holds the same series, named as HF's WandbCallback names them.
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = wandb_history(next(run_dir.glob("run-*.wandb")))
    assert {r["train/global_step"]: r["train/loss"] for r in history if "train/loss" in r} == train_loss
    assert {r["train/global_step"]: r["eval/loss"] for r in history if "eval/loss" in r} == eval_loss
    assert all("train/learning_rate" in r for r in history if "train/loss" in r)

    # MLflow, local file store: run name, experiment, config as params, and the series by step.
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("lf-experiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "lf-run" and run.data.params["lora_rank"] == "4"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == train_loss
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")} == eval_loss
    assert len(client.get_metric_history(run.info.run_id, "learning_rate")) == 4
