"""RunLogger on a 20-step fake run in a temporary directory: files, keys, values, plots, TensorBoard."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxsft.run_logging import TRAINER_LOG, RunLogger, smooth

TOTAL = 20


def fake_run(output_dir, *, is_main_process=True, plot_loss=True):
    """20 steps, logging every 5, eval at 10 and 20; loss decays, lr decays linearly."""
    logger = RunLogger(output_dir, TOTAL, is_main_process=is_main_process, logging_steps=5, plot_loss=plot_loss)
    sent = []
    for step in range(1, TOTAL + 1):
        logger.advance(step)
        if logger.should_log(step):
            metrics = {
                "loss": np.float32(2.5 * math.exp(-step / 10)),
                "accuracy": 0.3 + step / 100,
                "lr": 1e-4 * (1 - step / TOTAL),
                "grad_norm": 1.0 / step,
                "tokens_per_sec": 1234.5,
                "mfu": 0.41,
                "epoch": step / 10,
                "total_tokens": 512 * step,
                "reward": None,  # dropped, as LF drops None
            }
            logger.log_train(step, metrics)
            sent.append((step, metrics))
        if step % 10 == 0:
            logger.log_eval(step, {"loss": 2.0 - step / 20, "eval_accuracy": 0.5})
    logger.save_metrics("train", {"train_loss": 1.5, "train_runtime": 12.0})
    logger.save_metrics("eval", {"eval_loss": 1.0, "epoch": 2.0})
    logger.close()
    return sent


def read_tensorboard_scalars(path):
    """Parse a TFRecord event file (length, crc, Event proto, crc) into {tag: [(step, value)]}."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_trainer_log_jsonl_lines_keys_and_values(tmp_path):
    sent = fake_run(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / TRAINER_LOG).read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["current_steps"] for r in train] == [5, 10, 15, 20]
    assert [r["current_steps"] for r in evals] == [10, 20]
    assert len(lines) == 6

    lf_keys = {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time",
               "remaining_time", "throughput", "total_tokens"}
    ours = {"accuracy", "grad_norm", "tokens_per_sec", "mfu"}
    for record, (step, metrics) in zip(train, sent):
        assert set(record) == lf_keys | ours
        assert record["total_steps"] == TOTAL
        assert record["percentage"] == round(step / TOTAL * 100, 2)
        assert record["loss"] == pytest.approx(float(metrics["loss"]))
        assert record["lr"] == pytest.approx(metrics["lr"])
        assert record["grad_norm"] == pytest.approx(1.0 / step)
        assert record["total_tokens"] == 512 * step
        assert record["throughput"] > 0
        assert record["remaining_time"].count(":") == 2  # H:MM:SS like LF
    assert train[-1]["percentage"] == 100.0 and train[-1]["remaining_time"] == "0:00:00"
    assert evals[0]["eval_loss"] == pytest.approx(1.5) and evals[0]["eval_accuracy"] == 0.5


def test_results_json_like_huggingface(tmp_path):
    fake_run(tmp_path)
    train_text = (tmp_path / "train_results.json").read_text()
    assert train_text == json.dumps({"train_loss": 1.5, "train_runtime": 12.0}, indent=4, sort_keys=True)
    assert json.loads((tmp_path / "eval_results.json").read_text()) == {"eval_loss": 1.0, "epoch": 2.0}
    assert json.loads((tmp_path / "all_results.json").read_text()) == {
        "train_loss": 1.5, "train_runtime": 12.0, "eval_loss": 1.0, "epoch": 2.0}


def test_plots_are_png(tmp_path):
    import matplotlib.image

    fake_run(tmp_path)
    for name in ("training_loss.png", "training_eval_loss.png", "training_eval_accuracy.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width, _ = matplotlib.image.imread(path).shape
        assert (width, height) == (640, 480)  # matplotlib's default 6.4x4.8 in at LF's dpi=100


def test_no_plots_without_plot_loss(tmp_path):
    fake_run(tmp_path, plot_loss=False)
    assert not list(tmp_path.glob("*.png"))


def test_tensorboard_scalars(tmp_path):
    fake_run(tmp_path)
    event_files = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 1
    scalars = read_tensorboard_scalars(event_files[0])
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    assert scalars["train/loss"][-1][1] == pytest.approx(2.5 * math.exp(-2), rel=1e-6)
    assert scalars["train/learning_rate"][0][1] == pytest.approx(7.5e-5, rel=1e-6)
    assert scalars["eval/loss"] == [(10, pytest.approx(1.5)), (20, pytest.approx(1.0))]
    assert "train/reward" not in scalars


def test_non_main_process_writes_nothing(tmp_path):
    out = tmp_path / "run"
    fake_run(out, is_main_process=False)
    assert not out.exists()


def test_resume_appends_and_fresh_run_replaces(tmp_path):
    fake_run(tmp_path, plot_loss=False)
    resumed = RunLogger(tmp_path, TOTAL, is_main_process=True, logging_steps=5, plot_loss=False,
                        tensorboard=False, initial_step=20)
    resumed.log_train(25, {"loss": 0.1})
    resumed.close()
    lines = (tmp_path / TRAINER_LOG).read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["current_steps"] == 25
    fresh = RunLogger(tmp_path, TOTAL, is_main_process=True, logging_steps=5, plot_loss=False, tensorboard=False)
    fresh.close()
    assert (tmp_path / TRAINER_LOG).read_text() == ""


def test_logging_steps_ratio_and_smooth():
    logger = RunLogger("unused", 1000, is_main_process=False, logging_steps=0.1, plot_loss=False)
    assert logger.should_log(100) and not logger.should_log(150)
    # The plot's EMA against LF's own extras/ploting.smooth (tools/make_metric_fixtures.py).
    expected = json.loads((Path(__file__).parent / "fixtures" / "metrics_expected.json").read_text())["plot_smooth"]
    assert smooth(expected["values"]) == pytest.approx(expected["smoothed"], abs=1e-12)
    assert smooth([]) == []


def test_tensorboard_writer_starts_without_torch(tmp_path):
    """tensorboardX imports torch when it can; the run's writer is opened without it (seconds of start-up), and
    torch still imports afterwards."""
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from tests.test_run_logging import fake_run, "
            "read_tensorboard_scalars; from pathlib import Path; fake_run(Path(sys.argv[1]), plot_loss=False); "
            "print('torch' in sys.modules); f = next(Path(sys.argv[1]).glob('runs/*/events.out.tfevents.*')); "
            "print([s for s, _ in read_tensorboard_scalars(f)['train/loss']]); "
            "import torch; print(torch.ones(2).sum().item())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().split("\n")[-3:] == ["False", "[5, 10, 15, 20]", "2.0"]
