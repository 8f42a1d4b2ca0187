"""The training stage end to end on the embedded tiny Llama and identity data."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_logs import log_lines, train_losses

from jaxsft.checkpoint import Checkpoints, abstract_like
from jaxsft.config_load import build_config
from jaxsft.evaluate import run_evaluation
from jaxsft.flops import matmul_params, train_flops_per_token
from jaxsft.model.hf import load_hf_config, load_hf_params
from jaxsft.params import flatten, merge
from jaxsft.runtime import build_mesh, load_model
from jaxsft.train import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny-llama")
BASE = {
    "model_name_or_path": TINY, "dataset": "identity", "dataset_dir": str(REPO / "examples" / "data"),
    "template": "llama3", "cutoff_len": 256, "packing": True, "do_train": True,
    "per_device_train_batch_size": 2, "learning_rate": 3e-3, "lr_scheduler_type": "cosine",
    "logging_steps": 1, "report_to": "none", "seed": 7,
}


def config(tmp_path, **overrides):
    return build_config({**BASE, "output_dir": str(tmp_path / "out"), **overrides})


def test_quickstart_learns_eval_accuracy_rises(tmp_path):
    cfg = config(tmp_path, finetuning_type="full", val_size=0.1, max_steps=40, do_train=False, do_eval=True,
                 logging_steps=10)
    before = run_evaluation(cfg)
    cfg = config(tmp_path, finetuning_type="full", val_size=0.1, max_steps=40, do_eval=True, logging_steps=10,
                 plot_loss=True, overwrite_output_dir=True)
    results = run_training(cfg)
    out = Path(cfg.output_dir)
    after = json.loads((out / "eval_results.json").read_text())
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.1, (before, after)
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    train = json.loads((out / "train_results.json").read_text())
    for key in ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_loss", "epoch"):
        assert train[key] == results[key] and train[key] > 0
    lines = log_lines(out)
    assert [r["step"] for r in lines if "loss" in r] == [10, 20, 30, 40]
    for key in ("epoch", "loss", "accuracy", "lr", "grad_norm", "tokens_per_sec", "elapsed"):
        assert key in lines[0], key
    assert (out / "training_loss.png").stat().st_size > 1000
    assert Checkpoints(out, async_save=False).latest_step() == 40


def test_freeze_leaves_frozen_params_bit_identical(tmp_path):
    cfg = config(tmp_path, finetuning_type="freeze", freeze_trainable_layers=1,
                 freeze_trainable_modules="mlp", freeze_extra_modules="norm", max_steps=5)
    run_training(cfg)
    original = flatten(load_hf_params(TINY, load_hf_config(TINY)))
    model = load_model(cfg, build_mesh(cfg))
    from jaxsft.optim import build_optimizer
    from jaxsft.step import init_state
    optimizer, _ = build_optimizer(cfg, 5)
    state = init_state(model.trainable, optimizer, cfg.seed)
    restored = Checkpoints(cfg.output_dir, async_save=False).restore(5, abstract_like(state),
                                                                   abstract_like(model.frozen))
    trained = flatten(merge(restored["state"]["trainable"], restored["frozen"], model.partition))
    for key, value in original.items():
        now = np.asarray(trained[key])
        if key.startswith("layers/mlp/"):
            np.testing.assert_array_equal(now[0], value[0], err_msg=key)  # layer 0 frozen
            assert not np.array_equal(now[1], value[1]), key            # last layer trained
        elif key == "norm/scale":
            assert not np.array_equal(now, value)
        else:
            np.testing.assert_array_equal(now, value, err_msg=key)
    # frozen params have no optimizer state: every optimizer leaf belongs to a trainable param
    assert set(restored["state"]["trainable"]) == {k for k in original if k.startswith("layers/mlp/")} | {"norm/scale"}


def _run_cli(out_dir, *extra, wait=True):
    args = [sys.executable, "-m", "jaxsft.main"] + [f"{k}={v}" for k, v in BASE.items()] + [
        f"output_dir={out_dir}", "finetuning_type=full", "max_steps=20", "save_steps=1000", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if wait:
        return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
    """The interrupted run has `save_strategy: no`: the stop saves its checkpoint all the same (it said
    "no checkpoint saved" and the run's training was lost)."""
    straight = tmp_path / "straight"
    result = _run_cli(straight)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train_losses(straight)
    assert sorted(reference) == list(range(1, 21))

    interrupted = tmp_path / "interrupted"
    proc = _run_cli(interrupted, "save_strategy=no", wait=False)
    log = interrupted / "trainer_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]  # unfinished (a scheduler requeues), saved
    assert "Resume with: resume_from_checkpoint=true" in output
    stopped = max(train_losses(interrupted))
    assert 5 <= stopped < 20, "the run should have stopped early"
    assert Checkpoints(interrupted, async_save=False).latest_step() == stopped

    result = _run_cli(interrupted, "resume_from_checkpoint=true", "save_strategy=no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {interrupted.absolute()}/checkpoint_{stopped} at step {stopped}" in result.stdout
    resumed = train_losses(interrupted)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(stopped + 1, 21):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    final_straight = json.loads((straight / "train_results.json").read_text())
    final_resumed = json.loads((interrupted / "train_results.json").read_text())
    assert final_resumed["epoch"] == final_straight["epoch"]


def test_every_example_trains_each_epoch_a_short_last_batch_like_a_smaller_batch(tmp_path):
    """As Hugging Face's Trainer, an epoch reads every example: its last batch is short (here filled up with
    empty rows) and, with accumulation, its last step has fewer micro-batches (here empty ones). 3 examples
    in a batch of 4 learn exactly as in a batch of 3; in micro-batches of 1 x 4 accumulation steps as well
    (up to summation order); batches of 2 give HF's ceil(3 / 2) = 2 steps an epoch, 1 with
    `dataloader_drop_last`. (jaxsft read whole
    batches only: 3 of LLaMA-Factory's 91 identity examples sat out each epoch at batch 4.)"""
    common = dict(max_samples=3, packing=False, num_train_epochs=3, finetuning_type="lora", lora_rank=4,
                  save_strategy="no", mesh={"data": 1, "fsdp": 1, "tensor": -1})  # global batch = per device
    variants = {"3": dict(per_device_train_batch_size=3), "4": dict(per_device_train_batch_size=4),
                "1x4": dict(per_device_train_batch_size=1, gradient_accumulation_steps=4),
                "2": dict(per_device_train_batch_size=2),
                "2 drop_last": dict(per_device_train_batch_size=2, dataloader_drop_last=True)}
    losses, results = {}, {}
    for name, extra in variants.items():
        cfg = config(tmp_path / name.replace(" ", "_"), **common, **extra)
        results[name] = run_training(cfg)
        losses[name] = train_losses(Path(cfg.output_dir))
    assert sorted(losses["3"]) == sorted(losses["4"]) == sorted(losses["1x4"]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses["4"][step] == pytest.approx(losses["3"][step], abs=1e-6), step
        assert losses["1x4"][step] == pytest.approx(losses["3"][step], abs=1e-5), step
    assert sorted(losses["2"]) == list(range(1, 7))
    assert sorted(losses["2 drop_last"]) == [1, 2, 3]  # HF's dataloader_drop_last: the short batch sits out
    assert results["4"]["train_padding_share"] > results["3"]["train_padding_share"]  # the empty row is padding
    assert results["3"]["epoch"] == results["4"]["epoch"] == results["1x4"]["epoch"] == results["2"]["epoch"] == 3


def test_token_ids_past_the_embedding_table_are_refused():
    from jaxsft.config import ConfigError
    from jaxsft.runtime import check_token_ids

    train = [(np.array([0, 5, 1023]), None)]
    check_token_ids({"train": train, "eval": None}, 1024, "m")
    with pytest.raises(ConfigError, match="eval data holds token id 1024 but the model at m has only 1024 embeddings"):
        check_token_ids({"train": train, "eval": [(np.array([3, 1024]), None)]}, 1024, "m")


def test_lora_run_exports_trained_merged_model(tmp_path):
    """do_train + export_dir: the exported model holds the trained LoRA merged into the base, and
    transformers loads it."""
    import transformers

    from jaxsft.checkpoint import read_trained_params, trained_lora_scale
    from jaxsft.lora import merge_adapters
    from jaxsft.main import run

    export = tmp_path / "export"
    cfg = config(tmp_path, finetuning_type="lora", lora_rank=4, learning_rate=1e-2, max_steps=4,
                 lora_dropout=0.1, export_dir=str(export))
    run(cfg)
    params, run_cfg = read_trained_params(cfg.output_dir)
    expected = flatten(merge_adapters(params, trained_lora_scale(run_cfg)))
    exported = flatten(load_hf_params(str(export), load_hf_config(str(export))))
    base = flatten(load_hf_params(TINY, load_hf_config(TINY)))
    assert exported.keys() == base.keys()
    for key in exported:
        np.testing.assert_allclose(exported[key], np.asarray(expected[key]), atol=1e-6, err_msg=key)
    assert not np.allclose(exported["layers/self_attn/q_proj/kernel"], base["layers/self_attn/q_proj/kernel"])
    np.testing.assert_array_equal(exported["norm/scale"], base["norm/scale"])  # not a LoRA target
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert model.config.num_hidden_layers == 2
    assert (export / "tokenizer.json").exists()


def test_epoch_strategies_save_and_evaluate_every_epoch(tmp_path):
    cfg = config(tmp_path, finetuning_type="full", num_train_epochs=2.0, save_strategy="epoch",
                 eval_strategy="epoch", val_size=0.1, logging_steps=100)
    results = run_training(cfg)
    steps = Checkpoints(cfg.output_dir, async_save=False).all_steps()
    assert len(steps) == 2 and steps[1] == 2 * steps[0], steps
    assert results["epoch"] == 2.0
    evals = [r for r in log_lines(cfg.output_dir) if "eval_loss" in r]
    assert [r["current_steps"] for r in evals] == steps


def test_unpacked_batches_padded_to_buckets_learn_the_same(tmp_path):
    """Padding each unpacked batch only to its length bucket changes no loss (token-weighted), pads less,
    compiles a few shapes; the run reports its padding share and compiled shapes."""
    runs = {}
    for buckets in (True, False):
        cfg = config(tmp_path / str(buckets), packing=False, length_buckets=buckets, max_steps=4, val_size=0.1,
                     do_eval=True, per_device_train_batch_size=1, save_strategy="no")
        results = run_training(cfg)
        out = Path(cfg.output_dir)
        runs[buckets] = (results, train_losses(out), json.loads((out / "eval_results.json").read_text()),
                         log_lines(out))
    (bucketed, losses, evals, lines), (padded, losses_padded, evals_padded, _) = runs[True], runs[False]
    assert losses == pytest.approx(losses_padded, abs=2e-4) and len(losses) == 4
    assert evals["eval_loss"] == pytest.approx(evals_padded["eval_loss"], rel=1e-5)
    assert evals["eval_accuracy"] == pytest.approx(evals_padded["eval_accuracy"], rel=1e-5)
    assert padded["train_compiled_shapes"] == 1 and padded["train_padding_share"] > 0.6
    assert 1 <= bucketed["train_compiled_shapes"] <= 3  # identity rows are 20-90 tokens: buckets 64 and 96
    assert bucketed["train_padding_share"] < padded["train_padding_share"] - 0.2
    assert bucketed["train_compile_seconds"] > 0
    assert all(0 <= r["padding_share"] < 1 for r in lines if "loss" in r)
    # model FLOPs count attention over the rows' real width: cutoff_len when padded to it, less in buckets
    tokens = [r for r in lines if "loss" in r][-1]["total_tokens"]  # the last train record (an eval one follows)
    model_cfg = load_hf_config(cfg.model_name_or_path)
    assert padded["total_flos"] == pytest.approx(train_flops_per_token(model_cfg, cfg.cutoff_len) * tokens)
    assert 6 * matmul_params(model_cfg) * tokens < bucketed["total_flos"] < padded["total_flos"]


def test_rerun_loads_compiled_steps_from_the_compilation_cache(tmp_path):
    cache = tmp_path / "xla"
    args = [f"output_dir={tmp_path / 'out'}", "max_steps=1", "do_eval=false", "save_steps=100", "report_to=none",
            "plot_loss=false", "disable_tqdm=true", f"compilation_cache_dir={cache}"]
    lines = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-m", "jaxsft.main", "configs/quickstart_full.yaml", *args],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        lines.append(re.findall(r"compilation cache \S+: (\d+) compiled programs loaded, (\d+) compiled and stored",
                                result.stderr))
    assert any(cache.iterdir())
    (cold_loaded, cold_stored), = lines[0]
    (warm_loaded, warm_stored), = lines[1]
    assert cold_loaded == "0" and int(cold_stored) >= 1, lines
    # nothing compiled again (the warm run may need fewer programs: the forgetting meter's base figure is cached)
    assert int(warm_loaded) >= 1 and warm_stored == "0", lines


def test_cli_trains_on_weighted_messages_with_neftune(tmp_path):
    """`python -m jaxsft.main --config` on the embedded weighted_chat data (answers marked train: false /
    weight: w, mixed with identity) with NEFTune: it trains, evaluates and logs finite figures."""
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("\n".join(f"{k}: {v}" for k, v in {
        **BASE, "dataset": "identity,weighted_chat", "output_dir": str(out), "finetuning_type": "full",
        "max_steps": 4, "save_steps": 1000, "neftune_noise_alpha": 5, "val_size": 0.1, "do_eval": True,
        "eval_strategy": "steps", "eval_steps": 2}.items()) + "\n")
    result = subprocess.run([sys.executable, "-m", "jaxsft.main", "--config", str(cfg)], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) and v > 0 for v in losses.values())
    evals = [r for r in log_lines(out) if "eval_loss" in r]
    # step 2 in the loop; step 4 by do_eval's final evaluation, logged as HF logs trainer.evaluate()
    assert [r["current_steps"] for r in evals] == [2, 4] and np.isfinite(evals[0]["eval_loss"])
    assert re.search(r"train data: [1-9]\d* of \d+ examples carry per-token loss weights", result.stderr), \
        result.stderr[-3000:]
    final = json.loads((out / "all_results.json").read_text())
    assert np.isfinite(final["eval_loss"]) and np.isfinite(final["train_loss"])
