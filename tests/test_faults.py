"""Faults during training: NaN/inf losses, SIGKILL at random points (training, saving, resuming), a full disk.

Nothing is lost: the next resume finishes, its losses and final params equal an uninterrupted run's, the log
reads line by line and the results cover every step.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_logs import train_losses

from jaxsft.config_load import build_config
from jaxsft.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny-llama"
DATA = REPO / "examples" / "data"
TMP = ".orbax-checkpoint-tmp"  # orbax 0.12: checkpoint_<step>.orbax-checkpoint-tmp, renamed on commit
STEP_DIR = re.compile(r"checkpoint_(\d+)$")
STEP = re.compile(r"checkpoint_(\d+)")


def _trained_state(out: Path, step: int) -> dict[str, np.ndarray]:
    """The trainable params of checkpoint_<step> as saved (restored as numpy, no model needed)."""
    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(out / f"checkpoint_{step}" / "trainable")
    return {k: np.asarray(v) for k, v in restored.items()}


def _committed(out: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := STEP_DIR.match(p.name))) if out.is_dir() else []


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses (in process).

def _config(tmp_path, **overrides):
    values = {"model_name_or_path": str(TINY), "dataset": "identity", "dataset_dir": str(DATA), "template": "llama3",
              "cutoff_len": 128, "do_train": True, "finetuning_type": "full", "output_dir": str(tmp_path / "out"),
              "report_to": "none"}
    return build_config({**values, **overrides})


DIVERGE = dict(optim="sgd", learning_rate=1e6, max_grad_norm=0.0, lr_scheduler_type="constant", max_steps=10,
               save_steps=2, logging_steps=5, per_device_train_batch_size=1, packing=True)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from jaxsft.checkpoint import Checkpoints
    from jaxsft.train import NonFiniteLoss, run_training

    cfg = _config(tmp_path, **DIVERGE)
    with pytest.raises(NonFiniteLoss) as e:
        run_training(cfg)
    match = re.fullmatch(r"step (\d+): loss \S+, grad_norm \S+ is not finite; stopped without saving it \(the last "
                         r"checkpoint is intact\)\. Lower learning_rate, or set skip_nonfinite_steps: true", str(e.value))
    assert match, str(e.value)
    bad_step = int(match.group(1))
    assert isinstance(e.value, UserError)  # the CLI prints it on one line and exits 2
    steps = Checkpoints(cfg.output_dir, async_save=False).all_steps()
    assert steps and max(steps) < bad_step and max(steps) == (bad_step - 1) // 2 * 2, (steps, bad_step)
    assert not [p for p in Path(cfg.output_dir).iterdir() if TMP in p.name]
    params = _trained_state(Path(cfg.output_dir), max(steps))
    assert params and all(np.isfinite(v).all() for v in params.values())


def test_skip_nonfinite_steps_finishes_the_run(tmp_path):
    from jaxsft.checkpoint import Checkpoints
    from jaxsft.train import run_training

    cfg = _config(tmp_path, skip_nonfinite_steps=True, **DIVERGE)
    run_training(cfg)
    assert Checkpoints(cfg.output_dir, async_save=False).latest_step() == 10
    assert json.loads((Path(cfg.output_dir) / "train_results.json").read_text())["epoch"] > 0
    params = _trained_state(Path(cfg.output_dir), 10)
    assert all(np.isfinite(v).all() for v in params.values())  # the bad updates were skipped


# ---------------------------------------------------------------------------------------------------------------
# Subprocess runs: one device and a shared compilation cache, so only the first run compiles.

SUB = {"model_name_or_path": TINY, "dataset": "identity", "dataset_dir": DATA, "template": "llama3",
       "cutoff_len": 128, "packing": "true", "do_train": "true", "finetuning_type": "full", "optim": "sgd",
       "learning_rate": 0.05, "per_device_train_batch_size": 2, "logging_steps": 1, "report_to": "none",
       "max_steps": 12, "save_steps": 1, "seed": 3}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _env(cache) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "HF_HUB_OFFLINE": "1"}


def _args(out, *extra, **overrides) -> list[str]:
    return [sys.executable, "-m", "jaxsft.main", *[f"{k}={v}" for k, v in {**SUB, **overrides}.items()],
            f"output_dir={out}", *extra]


def _cli(out, cache, *extra, **overrides):
    return subprocess.run(_args(out, *extra, **overrides), capture_output=True, text=True, cwd=REPO, env=_env(cache),
                          timeout=300)


def _logged_steps(out: Path) -> list[int]:
    """Steps of the log lines that parse (the last one may be half written while the run goes on)."""
    path = out / "trainer_log.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["current_steps"])
        except ValueError:
            pass
    return steps


def _wait(proc, condition, deadline: float) -> bool:
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.003)
    return False


KILLS = 21  # 7 while training, 7 while a checkpoint is being written, 7 while a run resumes
FAULT_STEPS = 70


def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, compile_cache):
    """One run killed again and again (kill -9) at random moments of each kind, resumed with
    `resume_from_checkpoint: true` every time; then it runs to the end. Seeded, so a failure replays."""
    seed = int(os.environ.get("JAXSFT_FAULT_SEED", "17"))
    rng = random.Random(seed)
    straight = tmp_path / "straight"
    result = _cli(straight, compile_cache, max_steps=FAULT_STEPS, save_steps=1000)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "killed"
    kinds = ["train", "save", "resume"] * (KILLS // 3)
    rng.shuffle(kinds)
    resume_gap = 1.0  # seconds from the model's load to the "resumed from" line, learned as runs go
    history = []
    for i, kind in enumerate(kinds):
        committed = _committed(out)
        extra = ["resume_from_checkpoint=true"] if committed else []
        stdout, stderr = tmp_path / f"run{i}.out", tmp_path / f"run{i}.err"
        with stdout.open("w") as o, stderr.open("w") as e:
            proc = subprocess.Popen(_args(out, *extra, max_steps=FAULT_STEPS), stdout=o, stderr=e, cwd=REPO,
                                    env=_env(compile_cache))
        deadline = time.time() + 240
        start = committed[-1] if committed else 0
        loaded = lambda: "trainable params" in stderr.read_text()  # noqa: E731
        if kind == "train":
            target = start + rng.randint(1, 3)
            caught = _wait(proc, lambda: max(_logged_steps(out), default=0) >= target, deadline)
            time.sleep(rng.uniform(0, 0.03))
        elif kind == "save":
            in_flight = lambda: out.is_dir() and any(  # noqa: E731
                TMP in p.name and int(STEP.match(p.name).group(1)) > start for p in out.iterdir())
            caught = _wait(proc, in_flight, deadline)
        else:
            caught = _wait(proc, loaded, deadline)
            t0 = time.time()
            time.sleep(rng.uniform(0, resume_gap))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        text = stdout.read_text()
        history.append((kind, start, _committed(out)))
        assert caught and proc.returncode == -signal.SIGKILL, (i, kind, history, stderr.read_text()[-3000:])
        resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
        if committed:  # the newest complete checkpoint, also after a kill during a save
            assert resumed is None or resumed.group(1) == f"{out}/checkpoint_{start}", (i, history, text[-2000:])
        if kind == "resume" and resumed:
            resume_gap = max(0.2, time.time() - t0)
        lines = (out / "trainer_log.jsonl").read_text().splitlines() if (out / "trainer_log.jsonl").exists() else []
        for line in lines[:-1]:  # only the line being written when the kill came may be torn
            json.loads(line)

    assert len(history) >= 20
    for i in range(len(history)):  # a resume after a killed save cleans up without orbax thread tracebacks
        assert "Traceback" not in (tmp_path / f"run{i}.err").read_text(), (i, history)
    start = _committed(out)[-1]
    assert start < FAULT_STEPS, history  # the kills came before the end
    result = _cli(out, compile_cache, "resume_from_checkpoint=true", max_steps=FAULT_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out}/checkpoint_{start} at step {start}" in result.stdout
    # The log: every step once, in order, each line JSON; losses equal the uninterrupted run's.
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in lines] == list(range(1, FAULT_STEPS + 1))
    assert train_losses(lines) == train_losses(straight)
    # Results cover the whole run; the final params are bit-identical; nothing was set aside.
    got, expected = (json.loads((d / "train_results.json").read_text()) for d in (out, straight))
    for key in ("train_loss", "total_flos", "epoch"):
        assert got[key] == expected[key], key
    final, reference = _trained_state(out, FAULT_STEPS), _trained_state(straight, FAULT_STEPS)
    assert final.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(final[key], reference[key], err_msg=key)
    assert not (out / "set_aside").exists()
    assert not [p for p in out.iterdir() if TMP in p.name]
    assert {k for k, *_ in history} == {"train", "save", "resume"}


# ---------------------------------------------------------------------------------------------------------------
# A full disk.

@pytest.fixture
def tiny_disk(tmp_path):
    """A 1.4 MB tmpfs: room for one sgd checkpoint of the tiny model (~0.8 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_while_saving_is_an_error_and_earlier_checkpoints_stay_intact(tiny_disk, compile_cache):
    out = tiny_disk / "out"
    result = _cli(out, compile_cache)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    last = errors[0]
    # No traceback frame of ours (orbax logs its writer threads' own); cache paths may name jaxsft/.
    assert not re.search(r'File ".*/jaxsft/', result.stderr), result.stderr[-3000:]
    assert re.fullmatch(
        re.escape(f"error: no space left on device while saving checkpoint_2 in {out} (") + r"[\d.]+"
        + re.escape(" MiB free); intact checkpoints: checkpoint_1. Free some space (or lower save_total_limit), "
                    "then rerun with resume_from_checkpoint: true"), last), last
    params = _trained_state(out, 1)
    assert params and all(np.isfinite(v).all() for v in params.values())


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C before training starts.

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_model_loads_is_one_line_and_no_crash(tmp_path, compile_cache, sig):
    """SIGINT or SIGTERM during start-up (imports, data, model initialisation): one line, exit 130 / 143, no
    traceback, no segfault; SIGTERM died without a word (the training loop itself turns both into save-and-stop,
    tested in test_train.py)."""
    out = tmp_path / "out"
    stdout = tmp_path / "run.out"
    with stdout.open("w") as o:
        proc = subprocess.Popen(_args(out), stdout=o, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=_env(compile_cache))
    assert _wait(proc, lambda: "jaxsft: stages" in stdout.read_text(), time.time() + 120)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-3000:]
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: interrupted ({sig.name}); stopped (checkpoints already written are "
                                    f"intact)")
    assert not _committed(out)


# ---------------------------------------------------------------------------------------------------------------
# A signal after the last step, while the trained model is written.

def test_a_signal_while_the_trained_model_is_saved_waits_for_it_and_skips_the_later_stages(tmp_path, monkeypatch,
                                                                                          capsys):
    """SIGTERM while `output_dir` receives the trained adapter (no checkpoints: save_strategy no): the write
    finishes (PEFT loads it), then the run stops before eval and export, saying so. The signal used to abort
    the write: the whole run's training was lost."""
    import jaxsft.train
    from jaxsft.main import StoppedBySignal, run

    real_save = jaxsft.train.save_trained_model

    def save_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at once: the handler runs before the write starts
        return real_save(*args, **kwargs)

    monkeypatch.setattr(jaxsft.train, "save_trained_model", save_with_a_signal)
    export = tmp_path / "export"
    cfg = _config(tmp_path, finetuning_type="lora", lora_target="all", max_steps=2, save_strategy="no",
                  val_size=0.2, do_eval=True, export_dir=str(export), per_device_train_batch_size=2)
    with pytest.raises(StoppedBySignal) as stopped:  # the CLI exits 143 on it
        run(cfg)
    assert stopped.value.signum == signal.SIGTERM
    out = Path(cfg.output_dir)
    said = capsys.readouterr().out
    assert f"stopped by signal {int(signal.SIGTERM)} after training (step 2); the trained model is saved in" in said
    assert not export.exists() and not (out / "eval_results.json").exists()
    assert not list(out.glob(".*.partial"))
    from peft import PeftConfig
    from safetensors.numpy import load_file

    assert PeftConfig.from_pretrained(out).r == cfg.lora_rank
    assert any("lora_B" in name for name in load_file(out / "adapter_model.safetensors"))
    assert json.loads((out / "train_results.json").read_text())["epoch"] > 0


def test_an_export_killed_while_writing_weights_leaves_no_loadable_half(tmp_path, monkeypatch):
    """A kill in the middle of writing the weights (a re-export over an earlier one): no config.json, no
    truncated `model.safetensors`; the earlier config must not pair with missing weights either."""
    from jaxsft import export
    from jaxsft.model.hf import load_hf_config, load_hf_params

    model_cfg = load_hf_config(TINY)
    params = load_hf_params(TINY, model_cfg)
    out = tmp_path / "export"
    export.export_hf(params, model_cfg, TINY, out)
    assert (out / "config.json").is_file()

    def killed_mid_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # part of the file, then the process is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        export.export_hf(params, model_cfg, TINY, out)
    assert not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*.partial"))


def test_a_rerun_of_an_export_killed_between_shards_replaces_it(tmp_path, monkeypatch, capsys):
    """A kill after the first of two shards leaves a shard without config.json; the same export command again
    finishes it (it said 'already holds a model; set overwrite_output_dir') and transformers loads the result."""
    import torch
    import transformers

    from jaxsft import export
    from jaxsft.main import cli

    out = tmp_path / "export"
    command = ["export", f"model_name_or_path={TINY}", "template=llama3", f"export_dir={out}"]
    real_save, saved = export.save_file, []

    def killed_after_one_shard(tensors, path, metadata=None):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(export, "save_file", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        export.export_hf(export.load_hf_params(TINY, export.load_hf_config(TINY)), export.load_hf_config(TINY), TINY,
                         out, shard_size_gb=0.0004)
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00003.safetensors"]
    assert not (out / "config.json").exists()
    monkeypatch.undo()

    assert cli(command) == 0
    assert "holds an unfinished export (model-00001-of-00003.safetensors without a config); it is replaced" \
        in capsys.readouterr().err
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # the stray shard is gone
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    want = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_merged_export_over_an_earlier_adapter_export_loads_as_the_merged_model(tmp_path):
    """export_dir held a PEFT adapter (export_adapter: true, or a LoRA run's output_dir), overwritten by a merged
    export: the adapter files stayed, and transformers, finding adapter_config.json, loaded the base model + the
    old adapter instead of the merged weights."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    from jaxsft import export

    out = tmp_path / "export"
    base = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)) \
        .save_pretrained(out)
    model_cfg = export.load_hf_config(TINY)
    export.export_hf(export.load_hf_params(TINY, model_cfg), model_cfg, TINY, out)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(loaded, "peft_config")
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in written.items())


def test_results_and_predictions_killed_mid_write_keep_the_earlier_file(tmp_path, monkeypatch, caplog):
    """A kill while `*_results.json` or `generated_predictions.jsonl` is written leaves the earlier file whole (a
    half file read as a finished prediction, and a torn all_results.json made every later eval or predict in
    that output_dir end in a JSONDecodeError traceback after all its work); the rerun writes them complete."""
    import transformers

    from jaxsft.predict import write_predictions
    from jaxsft.run_logging import save_metrics

    out = tmp_path / "out"
    out.mkdir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY)
    prompts = [(np.array(tokenizer.encode(f"question {i}"), np.int32), np.array(tokenizer.encode("answer"), np.int32))
               for i in range(50)]
    outputs = [tokenizer.encode(f"reply {i}") for i in range(50)]
    predictions = out / "generated_predictions.jsonl"
    write_predictions(predictions, tokenizer, prompts[:3], outputs[:3], True)
    save_metrics(str(out), "predict", {"predict_bleu-4": 1.0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_write_text = Path.write_text

    def killed_mid_write(self, data, *args, **kwargs):
        real_write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        write_predictions(predictions, tokenizer, prompts, outputs, True)
    with pytest.raises(KeyboardInterrupt):
        save_metrics(str(out), "predict", {"predict_bleu-4": 2.0})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no half file, no .partial left

    (out / "all_results.json").write_text('{"eval_loss": 1.5, "predict_bl')  # torn by a kill before this fix
    write_predictions(predictions, tokenizer, prompts, outputs, True)
    save_metrics(str(out), "predict", {"predict_bleu-4": 2.0})
    assert "could not be read (a run was killed while writing it?)" in caplog.text
    assert json.loads((out / "all_results.json").read_text()) == {"predict_bleu-4": 2.0}
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 50 and rows[-1]["predict"] == "reply 49"


def test_a_signal_during_an_export_alone_then_the_same_command_exports(tmp_path, monkeypatch, capsys):
    """SIGTERM while `jaxsft export` writes the weights: one line (it spoke of checkpoints, which an export has
    none of), exit 143, no loadable half in export_dir; the same command again writes the model, without
    overwrite_output_dir (it refused: 'already holds a model')."""
    import torch
    import transformers

    import jaxsft.main
    from jaxsft import export

    out = tmp_path / "export"
    command = ["export", f"model_name_or_path={TINY}", "template=llama3", f"export_dir={out}"]
    real_save = export.save_file

    def terminated_mid_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(export, "save_file", terminated_mid_write)
    monkeypatch.setattr(jaxsft.main.os, "_exit", exit_)  # the test process must live on
    with pytest.raises(SystemExit) as stopped:
        jaxsft.main.cli(command)
    assert stopped.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: interrupted (SIGTERM); stopped (no export output is half-written; run the same command again)")
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    monkeypatch.setattr(export, "save_file", real_save)

    assert jaxsft.main.cli(command) == 0
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    want = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_signal_that_lands_in_a_garbage_collector_callback_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """JAX runs a callback at every garbage collection; a SIGTERM handled inside it (or inside any `__del__`)
    raised where Python drops exceptions ('Exception ignored in: _xla_gc_callback ... Terminated'), and the run
    went on to the end with status 0. Seen with `jaxsft eval` under SIGTERM; here the collection is an object's
    `__del__` during an export's write."""
    import jaxsft.main
    from jaxsft import export

    real_save = export.save_file

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside __del__

    def save_during_a_collection(tensors, path, metadata=None):
        Collected()  # dropped at once
        time.sleep(2)  # the work goes on (the signal, when not dropped, ends this sleep)
        return real_save(tensors, path, metadata=metadata)

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(export, "save_file", save_during_a_collection)
    monkeypatch.setattr(jaxsft.main.os, "_exit", exit_)
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        jaxsft.main.cli(["export", f"model_name_or_path={TINY}", "template=llama3", f"export_dir={tmp_path / 'e'}"])
    assert stopped.value.code == 143 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: interrupted (SIGTERM); stopped (")
    assert "Exception ignored" not in err and not (tmp_path / "e" / "config.json").exists()


def test_tokenizer_files_killed_mid_copy_leave_the_earlier_file(tmp_path, monkeypatch):
    """A LoRA run's output_dir gets the tokenizer files after its adapter is complete: a kill mid-copy left a
    truncated tokenizer.json beside a finished adapter."""
    from jaxsft import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    real_copy = export.shutil.copyfile

    def killed_mid_copy(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(export.shutil, "copyfile", killed_mid_copy)
    with pytest.raises(KeyboardInterrupt):
        export.copy_tokenizer(TINY, out)
    monkeypatch.setattr(export.shutil, "copyfile", real_copy)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == "{}"
    export.copy_tokenizer(TINY, out)
    assert (out / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()
