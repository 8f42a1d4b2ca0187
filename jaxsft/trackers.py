"""Experiment trackers beside trainer_log.jsonl: Weights & Biases and MLflow, as Hugging Face's callbacks
feed them (`report_to: wandb`, `report_to: mlflow`, or a list; TensorBoard lives in `run_logging`).

- W&B: project from `WANDB_PROJECT` (default `huggingface`), run name `run_name`, the resolved config as the
  run's config; scalars as `train/loss`, `train/learning_rate`, `eval/loss`, ... at the optimizer step, as
  HF's WandbCallback names them. `WANDB_MODE=offline` keeps the run on disk (`wandb sync` uploads it).
- MLflow: tracking URI from `MLFLOW_TRACKING_URI` (MLflow 3's default is `sqlite:///mlflow.db`, which needs
  `sqlalchemy`; a local file store needs `MLFLOW_ALLOW_FILE_STORE=true`), experiment from
  `MLFLOW_EXPERIMENT_NAME`, run name `run_name`, the config as params; metrics `loss`, `learning_rate`,
  `eval_loss`, ... at the optimizer step, as HF's MLflowCallback logs them.

The environment variables are the libraries' own, which LLaMA-Factory users already set.
"""

from __future__ import annotations

import os
from typing import Any

from jaxsft.errors import ConfigError

_HF_NAMES = {"lr": "learning_rate"}  # the loop's key -> HF's metric name
_SKIP = {"step"}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {_HF_NAMES.get(k, k): float(v) for k, v in metrics.items()
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Config values as tracker params (strings, clipped to MLflow's length limit)."""
    return {k: str(v)[:500] for k, v in config.items() if v is not None}


class Trackers:
    """The W&B / MLflow runs of one training run (main process only); `log` sends one logging step."""

    def __init__(self, names: tuple[str, ...], config: dict[str, Any], run_name: str | None):
        self._wandb = self._mlflow = None
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to: wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=run_name,
                                     config=config, reinit="finish_previous")
            self._wandb.define_metric("train/global_step")
            self._wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        if "mlflow" in names:
            try:
                import mlflow
            except ImportError:
                raise ConfigError("report_to: mlflow needs MLflow: pip install mlflow-skinny (or mlflow)") from None
            self._mlflow = mlflow
            if mlflow.active_run() is not None:
                mlflow.end_run()
            try:
                mlflow.start_run(run_name=run_name)
            except mlflow.exceptions.MlflowException as e:  # e.g. a store this install cannot open
                raise ConfigError(f"report_to: mlflow could not start a run at {mlflow.get_tracking_uri()} "
                                  f"(MLFLOW_TRACKING_URI): {str(e).splitlines()[0]}") from None
            params = _flat_params(config)
            keys = sorted(params)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params({k: params[k] for k in keys[i:i + 100]})

    def log(self, metrics: dict[str, Any], step: int, split: str) -> None:
        """One logging step: `split` is "train" or "eval" (eval metrics come as `eval_*`)."""
        values = _scalars(metrics)
        if split == "eval":
            values = {k[len("eval_"):] if k.startswith("eval_") else k: v for k, v in values.items()}
        if self._wandb is not None:
            self._wandb.log({**{f"{split}/{k}": v for k, v in values.items()}, "train/global_step": step})
        if self._mlflow is not None:
            names = values if split == "train" else {f"eval_{k}": v for k, v in values.items()}
            self._mlflow.log_metrics(names, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
