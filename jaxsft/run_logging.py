"""What a person watching a training run sees and keeps: progress bar, trainer_log.jsonl, TensorBoard
scalars, loss plots and *_results.json, laid out the way LLaMA-Factory / Hugging Face lay them out.

- `trainer_log.jsonl`: one JSON object per logging step, LF's `LogCallback` keys (`current_steps`,
  `total_steps`, `loss`, `eval_loss`, `lr`, `epoch`, `percentage`, `elapsed_time`,
  `remaining_time`, `throughput`, `total_tokens`) plus jaxsft's (`accuracy`, `grad_norm`,
  `tokens_per_sec`, `mfu`, and whatever else the loop logs). LlamaBoard can read it.
- `runs/<time>_<host>/`: TensorBoard scalars named as HF's TensorBoardCallback names them
  (`train/loss`, `train/learning_rate`, `eval/loss`, ...); W&B and MLflow get the same steps
  (`jaxsft.trackers`).
- `training_loss.png`, `training_eval_loss.png`, `training_eval_accuracy.png` (and, when logged,
  `training_retention_loss.png`, `training_retention_loss_delta.png`, `training_sft_loss.png`,
  `training_replay_loss.png`): LF's plot (raw curve faded, TensorBoard-style EMA on top), written by
  `close()` when `plot_loss`.
- `{split}_results.json` and `all_results.json`: HF's `save_metrics` (indent 4, sorted keys).

Only the main process writes or prints anything; on the others every method does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Any

from jaxsft.config import every_n_steps
from jaxsft.files import write_text_atomically

TRAINER_LOG = "trainer_log.jsonl"

# metric key the loop passes -> TensorBoard tag suffix (HF's names where HF has one).
_TB_NAMES = {"lr": "learning_rate"}


def smooth(scalars: list[float]) -> list[float]:
    """LF's (and TensorBoard's) EMA; the weight grows with the number of points."""
    if not scalars:
        return []
    last, smoothed = scalars[0], []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(scalars))) - 0.5)
    for value in scalars:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def _plain(value: Any) -> Any:
    """numpy / jax scalars -> Python numbers, so json and tensorboardX take them."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return value.item()
    return value


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def write_json(path: str, data: dict[str, Any]) -> None:
    """A results file as HF writes it: indent 4, sorted keys; whole or not at all (a kill mid-write leaves the
    previous file)."""
    write_text_atomically(path, json.dumps({k: _plain(v) for k, v in data.items()}, indent=4, sort_keys=True))


def save_metrics(output_dir: str, split: str, metrics: dict[str, Any], write=print) -> None:
    """HF's log_metrics + save_metrics: print the block, write `{split}_results.json`, merge the
    metrics into `all_results.json`. Needs no RunLogger (whose log file a later stage must not reopen)."""
    width = max((len(k) for k in metrics), default=0)
    write("\n".join([f"***** {split} metrics *****"] + [f"  {k:<{width}} = {_plain(metrics[k])}"
                                                       for k in sorted(metrics)]))
    write_json(os.path.join(output_dir, f"{split}_results.json"), metrics)
    all_path = os.path.join(output_dir, "all_results.json")
    combined = {}
    if os.path.exists(all_path):
        try:
            with open(all_path, encoding="utf-8") as f:
                combined = json.load(f)
        except (ValueError, UnicodeDecodeError):  # torn by a kill before writes were atomic: start it afresh
            logging.getLogger("jaxsft").warning("%s could not be read (a run was killed while writing it?); "
                                                "it is written anew with the %s results", all_path, split)
        if not isinstance(combined, dict):
            combined = {}
    combined.update({k: _plain(v) for k, v in metrics.items()})
    write_json(all_path, combined)


def clear_results(output_dir: str) -> list[str]:
    """Remove a previous run's results (`*_results.json`, which `save_metrics` would merge into the new
    all_results.json, plots, predictions, the log) so a run started over reports only itself."""
    if not os.path.isdir(output_dir):
        return []
    stale = sorted(name for name in os.listdir(output_dir)
                   if name.endswith("_results.json") or (name.startswith("training_") and name.endswith(".png"))
                   or name in (TRAINER_LOG, "generated_predictions.jsonl"))
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    return stale



@contextlib.contextmanager
def _torch_hidden():
    """tensorboardX's writer imports torch when it can (only to accept torch tensors; we log floats): seconds
    of start-up. While this is open and torch is not imported yet, `import torch` fails as if it were absent;
    afterwards torch imports normally."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]

class RunLogger:
    """Progress bar, jsonl log, TensorBoard and plots for one training run.

    The loop calls `advance(step)` after every optimizer step (cheap: moves the bar), and
    `log_train(step, metrics)` when `should_log(step)`, with metrics averaged over the logging window
    (`loss`, `accuracy`, `lr`, `grad_norm`, `tokens_per_sec`, `mfu`, `epoch`, `total_tokens`, ...;
    None values are dropped). `log_eval(step, metrics)` takes eval metrics with or without the
    `eval_` prefix. `initial_step` > 0 (resume) appends to trainer_log.jsonl, whose lines up to that step
    (`jaxsft.resume.prepare_output_dir` trims it) are passed as `history`, so the plots cover the whole run;
    a fresh run replaces it, as LF does with `overwrite_output_dir`.
    """

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        *,
        is_main_process: bool,
        logging_steps: float,
        plot_loss: bool,
        tensorboard: bool = True,
        initial_step: int = 0,
        history: list[dict[str, Any]] | None = None,
        progress_bar: bool = True,
        trackers: Any = None,
    ):
        self.output_dir = output_dir
        self.total_steps = int(total_steps)
        self.enabled = bool(is_main_process)
        self.logging_every = every_n_steps(logging_steps, total_steps)
        self.plot_loss = plot_loss
        self.initial_step = initial_step
        self.start_time = time.time()
        self.history: list[dict[str, Any]] = list(history or [])  # every line of trainer_log.jsonl
        self._bar = None
        self._tb = None
        self._trackers = trackers  # jaxsft.trackers.Trackers (W&B, MLflow) or None
        self._log_file = None
        self._pending: dict[str, Any] = {}  # `note`d fields for the next training line
        if not self.enabled:
            return

        from tqdm.auto import tqdm

        os.makedirs(output_dir, exist_ok=True)
        self._log_file = open(os.path.join(output_dir, TRAINER_LOG), "a" if initial_step else "w", encoding="utf-8")
        if tensorboard:
            with _torch_hidden():
                from tensorboardX import SummaryWriter

            run_name = f"{datetime.datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}"
            self._tb = SummaryWriter(logdir=os.path.join(output_dir, "runs", run_name))
        self._bar = tqdm(total=self.total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                         disable=not progress_bar)
        self.start_time = time.time()  # after the slow imports, so the first ETA is not skewed

    # ------------------------------------------------------------------------------------------
    def should_log(self, step: int) -> bool:
        """HF's rule: log when the step is a multiple of logging_steps."""
        return step % self.logging_every == 0

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (optimizer steps done)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def _progress(self, step: int) -> dict[str, Any]:
        """LF's LogCallback timing fields; remaining time from this run's own steps per second."""
        elapsed = time.time() - self.start_time
        done = step - self.initial_step
        remaining = (self.total_steps - step) * elapsed / done if done > 0 else 0.0
        return {
            "current_steps": step,
            "total_steps": self.total_steps,
            "percentage": round(step / self.total_steps * 100, 2) if self.total_steps else 100,
            "elapsed_time": _hms(elapsed),
            "remaining_time": _hms(remaining),
        }

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._log_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._log_file.flush()

    def note(self, **fields: Any) -> None:
        """Fields (e.g. the data's truncation counts) added once, to the next training line."""
        self._pending.update({k: _plain(v) for k, v in fields.items() if v is not None})

    def log_train(self, step: int, metrics: dict[str, Any]) -> None:
        """One training logging step: jsonl line, TensorBoard scalars, bar postfix and a printed line."""
        if not self.enabled:
            return
        metrics = {k: _plain(v) for k, v in metrics.items() if v is not None}
        record = self._progress(step)
        record.update(metrics)
        record.update(self._pending)
        self._pending = {}
        total_tokens = metrics.get("total_tokens")
        if total_tokens:  # LF's throughput: tokens seen in this run / its training time (`elapsed` when given)
            elapsed = metrics.get("elapsed") or time.time() - self.start_time
            record["throughput"] = round(total_tokens / max(elapsed, 1e-9), 2)
        self._write(record)

        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{_TB_NAMES.get(key, key)}", value, step)
            self._tb.flush()
        if self._trackers is not None:
            self._trackers.log(metrics, step, "train")

        self.advance(step)
        postfix = {}
        if "loss" in metrics:
            postfix["loss"] = f"{metrics['loss']:.4f}"
        if "lr" in metrics:
            postfix["lr"] = f"{metrics['lr']:.2e}"
        if "tokens_per_sec" in metrics:
            postfix["tok/s"] = f"{metrics['tokens_per_sec']:.0f}"
        self._bar.set_postfix(postfix, refresh=True)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
        self._bar.write(str({**shown, "step": step}))

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Eval results at `step` (keys like `loss` or `eval_loss`; written as `eval_*`)."""
        if not self.enabled:
            return
        metrics = {
            (k if k.startswith("eval_") else f"eval_{k}"): _plain(v) for k, v in metrics.items() if v is not None
        }
        record = self._progress(step)
        record.update(metrics)
        self._write(record)
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"eval/{key[len('eval_'):]}", value, step)
            self._tb.flush()
        if self._trackers is not None:
            self._trackers.log(metrics, step, "eval")
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
        self._bar.write(str({**shown, "step": step}))

    def log_retention(self, step: int, metrics: dict[str, Any]) -> None:
        """The forgetting meter at `step` (`retention_loss`, `retention_loss_delta`): a jsonl line,
        TensorBoard `retention/loss` and `retention/loss_delta`, the trackers' train scalars."""
        if not self.enabled:
            return
        metrics = {k: _plain(v) for k, v in metrics.items() if v is not None}
        record = self._progress(step)
        record.update(metrics)
        self._write(record)
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"retention/{key[len('retention_'):]}", value, step)
            self._tb.flush()
        if self._trackers is not None:
            self._trackers.log(metrics, step, "train")
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
        self._bar.write(str({**shown, "step": step}))

    # ------------------------------------------------------------------------------------------
    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """`output_dir/name` as HF writes its results files: indent 4, sorted keys."""
        if self.enabled:
            write_json(os.path.join(self.output_dir, name), data)

    def save_metrics(self, split: str, metrics: dict[str, Any]) -> None:
        """HF's log_metrics + save_metrics, printed above the progress bar."""
        if self.enabled:
            save_metrics(self.output_dir, split, metrics, write=self._bar.write)

    def _plot(self, key: str) -> str | None:
        """LF's plot_loss for one key of the log history; None when nothing was logged under it."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        points = [(r["current_steps"], r[key]) for r in self.history if key in r]
        if not points:
            return None
        steps, values = [p[0] for p in points], [p[1] for p in points]
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        ax.plot(steps, smooth(values), color="#1f77b4", label="smoothed")
        ax.set_title(f"training {key} of {self.output_dir}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend()
        path = os.path.join(self.output_dir, "training_{}.png".format(key.replace("/", "_")))
        fig.savefig(path, format="png", dpi=100)
        return path

    def end_progress(self) -> None:
        """Close the progress bar once training is done, so the results printed after it read cleanly
        (an open bar redraws itself around every later line)."""
        if self.enabled and not self._bar.disable:
            self._bar.close()

    def close(self) -> None:
        """Write the loss plots (when plot_loss) and close the bar, the log and TensorBoard."""
        if not self.enabled:
            return
        if self.plot_loss:
            for key in ("loss", "eval_loss", "eval_accuracy", "retention_loss", "retention_loss_delta", "sft_loss",
                        "replay_loss"):
                path = self._plot(key)
                if path:
                    self._bar.write(f"Figure saved at: {path}")
        self._bar.close()
        self._log_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._trackers is not None:
            self._trackers.close()
        self.enabled = False  # a second close, or a log after close, does nothing
