"""The forgetting meter (`retention_dataset`) and replay (`replay_dataset`) in whole training runs on the
embedded tiny Llama: retention figures at step 0, each eval and the end; the base figure equals a solo eval
of the same data and is read from its cache when resuming; replay lowers retention_loss_delta; a resumed replay
run repeats the uninterrupted one exactly."""

import json
from pathlib import Path

import pytest
from run_logs import log_lines

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]
RUN = {"model_name_or_path": REPO / "examples" / "tiny-llama", "dataset": "identity",
       "dataset_dir": REPO / "examples" / "data", "template": "llama3", "cutoff_len": 128, "packing": "true",
       "do_train": "true", "learning_rate": 3e-3, "per_device_train_batch_size": 1, "logging_steps": 1,
       "report_to": "none", "retention_dataset": "general_text", "seed": 5}


def _cli(out, **overrides) -> int:
    return cli([f"{k}={v}" for k, v in {**RUN, **overrides}.items()] + [f"output_dir={out}"])


def _json(path) -> dict:
    return json.loads(Path(path).read_text())


def test_retention_at_step_0_each_eval_and_end_base_equals_solo_eval_and_is_cached(tmp_path, capsys):
    from test_run_logging import read_tensorboard_scalars

    cache = tmp_path / "cache" / "data"
    out = tmp_path / "lora"
    assert _cli(out, finetuning_type="lora", lora_rank=4, learning_rate=0.01, max_steps=4, eval_strategy="steps",
                eval_steps=2, data_cache_dir=cache, plot_loss="true", report_to="tensorboard") == 0
    lines = [r for r in log_lines(out) if "retention_loss" in r]
    assert [r["current_steps"] for r in lines] == [0, 2, 4]
    base = lines[0]["retention_loss"]
    assert lines[0]["retention_loss_delta"] == 0.0
    for r in lines[1:]:
        assert r["retention_loss_delta"] == pytest.approx(r["retention_loss"] - base, abs=1e-12)
        assert r["retention_loss"] != base  # LoRA training moved it
    results = _json(out / "all_results.json")
    assert results["retention_base_loss"] == base
    assert results["retention_loss"] == lines[-1]["retention_loss"]
    assert results["retention_loss_delta"] == lines[-1]["retention_loss_delta"]
    assert (out / "training_retention_loss.png").stat().st_size > 1000
    events, = (out / "runs").glob("*/events.out.tfevents.*")
    scalars = read_tensorboard_scalars(events)
    assert [s for s, _ in scalars["retention/loss"]] == [0, 2, 4]
    assert [s for s, _ in scalars["retention/loss_delta"]] == [0, 2, 4]
    err = capsys.readouterr().err
    assert f"retention: the starting model's retention_loss is {base:.4f} over 3233 tokens (cached in " in err

    # the base figure is the plain model's loss on that data: an eval-only run of it gives the same number
    solo = tmp_path / "solo"
    assert _cli(solo, do_train="false", do_eval="true", eval_dataset="general_text", retention_dataset="null",
                data_cache_dir=cache) == 0
    assert _json(solo / "eval_results.json")["eval_loss"] == pytest.approx(base, rel=1e-6)

    # freeze starts from the same model: a new run reads the base figure from the cache, and trains
    capsys.readouterr()
    frozen = tmp_path / "freeze"
    assert _cli(frozen, finetuning_type="freeze", freeze_trainable_layers=1, max_steps=2,
                data_cache_dir=cache) == 0
    assert f"retention: the starting model's retention_loss {base:.4f} is read from" in capsys.readouterr().err
    lines = [r for r in log_lines(frozen) if "retention_loss" in r]
    assert [r["current_steps"] for r in lines] == [0, 2] and lines[0]["retention_loss"] == base
    assert lines[1]["retention_loss"] != base


STEPS = 12


def test_replay_lowers_forgetting_reports_both_losses_and_resumes_exactly(tmp_path, capsys):
    plain, replay = tmp_path / "plain", tmp_path / "replay"
    common = dict(finetuning_type="full", max_steps=STEPS, data_cache_dir=tmp_path / "cache" / "data")
    assert _cli(plain, **common) == 0
    assert _cli(replay, replay_dataset="general_replay", replay_ratio=0.25, save_steps=STEPS // 2, **common) == 0
    no_replay, with_replay = _json(plain / "all_results.json"), _json(replay / "all_results.json")
    print(f"retention_loss_delta after {STEPS} steps: no replay {no_replay['retention_loss_delta']:.4f}, "
          f"replay 0.25 {with_replay['retention_loss_delta']:.4f}")
    assert with_replay["retention_base_loss"] == no_replay["retention_base_loss"]
    assert with_replay["retention_loss_delta"] < no_replay["retention_loss_delta"] - 0.5
    lines = [r for r in log_lines(replay) if "loss" in r]
    for r in lines:  # the loss stays token-weighted over both kinds of tokens; each is reported apart
        assert min(r["sft_loss"], r["replay_loss"]) <= r["loss"] <= max(r["sft_loss"], r["replay_loss"])
        assert 0 < r["replay_label_share"] < 1
    assert all("sft_loss" not in r for r in log_lines(plain))

    # resumed from the middle into another output_dir: the same batches (replay stream included), same losses
    resumed = tmp_path / "resumed"
    capsys.readouterr()
    assert _cli(resumed, replay_dataset="general_replay", replay_ratio=0.25,
                resume_from_checkpoint=replay / f"checkpoint_{STEPS // 2}", **common) == 0
    retention_dir = tmp_path / "cache" / "retention"
    base = with_replay["retention_base_loss"]
    assert [line for line in capsys.readouterr().err.splitlines() if "retention:" in line] == [
        f"[jaxsft] INFO retention: the starting model's retention_loss {base:.4f} is read from "
        f"{retention_dir}/{next(retention_dir.iterdir()).name} (model and retention data unchanged)"]

    def by_step(out, key):
        return {r["current_steps"]: r[key] for r in log_lines(out) if key in r}

    for key in ("loss", "sft_loss", "replay_loss", "grad_norm"):
        assert by_step(resumed, key) == pytest.approx(by_step(replay, key), abs=1e-6), key
    assert _json(resumed / "all_results.json")["retention_loss"] == pytest.approx(with_replay["retention_loss"],
                                                                                  abs=1e-6)


def test_window_sft_and_replay_losses_average_by_each_steps_denominator():
    """The logged window mean of sft_loss / replay_loss is the window's own ratio of sums: by loss weights in
    a weighted run (by label tokens it would overweight a step of many lightly weighted tokens)."""
    from jaxsft.step_metrics import replay_summary

    # step 1: SFT loss sum 6.0 over weight 2 (3 tokens), replay 2.0 over 1 token; step 2: SFT 1.0 over weight 4
    # (1 token), replay 3.0 over 2 tokens. Replay targets weigh 1.
    steps = [dict(sft_loss=6.0 / 2, replay_loss=2.0 / 1, label_tokens=4, replay_tokens=1, weight_sum=3.0,
                  replay_weight_sum=1.0),
             dict(sft_loss=1.0 / 4, replay_loss=3.0 / 2, label_tokens=3, replay_tokens=2, weight_sum=6.0,
                  replay_weight_sum=2.0)]
    got = replay_summary(steps)
    assert got == {"sft_loss": round(7.0 / 6, 4), "replay_loss": round(5.0 / 3, 4), "replay_label_share": round(3 / 7, 4)}
    unweighted = [{k: v for k, v in m.items() if "weight" not in k} for m in steps]
    assert replay_summary(unweighted)["sft_loss"] == round((3.0 * 3 + 0.25 * 1) / 4, 4)  # by label tokens
