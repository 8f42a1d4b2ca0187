"""Mistakes a user meets before anything loads: one `error:` line (exit 2) through the CLI, found by `--dry_run`
too (it runs every check that needs no weights)."""

import json
import time
from pathlib import Path

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny-llama"
DATA = REPO / "examples" / "data"


def _args(tmp_path, **overrides) -> list[str]:
    values = {"model_name_or_path": TINY, "dataset": "identity", "dataset_dir": DATA, "template": "llama3",
              "cutoff_len": 128, "do_train": "true", "output_dir": tmp_path / "out", "report_to": "none",
              **overrides}
    return [f"{k}={v}" for k, v in values.items()]


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0][len("error: "):]


def _model_copy(tmp_path, drop=()) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    for f in TINY.iterdir():
        if f.name not in drop:
            (model / f.name).symlink_to(f)
    return model


def test_a_hub_model_with_no_network_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as when the network is down
    start = time.time()
    assert _error(capsys, _args(tmp_path, model_name_or_path="meta-llama/NoSuchModel") + ["--dry_run"]) == (
        "model_name_or_path: meta-llama/NoSuchModel is not a local directory, not in the Hugging Face cache, and the "
        "hub (http://127.0.0.1:9) cannot be reached ([Errno 111] Connection refused); download it where there is "
        "network and give its local directory")
    assert _error(capsys, _args(tmp_path, dataset="someone/some_data", dataset_dir="ONLINE")) == (
        "dataset: 'someone/some_data' is a hub dataset (someone/some_data) and the hub (http://127.0.0.1:9) cannot be "
        "reached ([Errno 111] Connection refused); download it where there is network and name the local copy (or "
        "set HF_DATASETS_OFFLINE=1 to read the datasets cache)")
    assert time.time() - start < 20  # no 30 s of retries


def test_eval_strategy_without_eval_data(tmp_path, capsys):
    assert _error(capsys, _args(tmp_path, eval_strategy="steps") + ["--dry_run"]) == (
        "eval_strategy: steps needs evaluation data: set eval_dataset, or val_size to hold out part of dataset, or "
        "retention_dataset (or eval_strategy: no)")
    assert cli(_args(tmp_path, eval_strategy="steps", val_size=0.1) + ["--dry_run"]) == 0
    assert cli(_args(tmp_path, eval_strategy="steps", retention_dataset="general_text") + ["--dry_run"]) == 0
    assert _error(capsys, _args(tmp_path, retention_dataset="general_txt") + ["--dry_run"]).startswith(
        "retention_dataset: Unknown dataset 'general_txt': not an entry of ")


def test_a_truncated_safetensors_file(tmp_path, capsys):
    model = _model_copy(tmp_path, drop=("model.safetensors",))
    data = (TINY / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    header = 8 + int.from_bytes(data[:8], "little")
    assert _error(capsys, _args(tmp_path, model_name_or_path=model) + ["--dry_run"]) == (
        f"{model}/model.safetensors is truncated: {len(data) // 2} bytes, but its header needs {len(data)}; download "
        f"it again")
    (model / "model.safetensors").write_bytes(data[:100])
    assert _error(capsys, _args(tmp_path, model_name_or_path=model)) == (
        f"{model}/model.safetensors is not a readable safetensors file (the header runs past the end of the file); "
        f"download it again")
    assert header < len(data) // 2


def test_a_model_without_tokenizer_files(tmp_path, capsys):
    model = _model_copy(tmp_path, drop=("tokenizer.json",))
    assert _error(capsys, _args(tmp_path, model_name_or_path=model)) == (
        f"model_name_or_path: no tokenizer files in {model} (one of tokenizer.json, tokenizer.model, vocab.json, "
        f"vocab.txt, spiece.model); copy the tokenizer of the model's original release into it")


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _error(capsys, _args(tmp_path, output_dir=tmp_path / "file") + ["--dry_run"]) == (
        f"output_dir: {tmp_path}/file is a file; give a directory")
    assert _error(capsys, _args(tmp_path, output_dir=tmp_path / "file" / "out")) == (
        f"output_dir: {tmp_path}/file/out is inside {tmp_path}/file, which is a file; give a directory")


def test_an_export_dir_holding_a_model_is_replaced_only_when_asked(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_text("")
    argv = _args(tmp_path, export_dir=export) + ["--dry_run"]
    assert _error(capsys, argv) == (f"export_dir: {export} already holds a model (config.json, model.safetensors); "
                                    f"set overwrite_output_dir: true to replace it, or choose another export_dir")
    assert cli(argv + ["overwrite_output_dir=true"]) == 0


def test_val_size_larger_than_the_data(tmp_path, capsys):
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(5)]
    (tmp_path / "five.json").write_text(json.dumps(rows))
    assert _error(capsys, _args(tmp_path, dataset=tmp_path / "five.json", val_size=10)) == (
        "val_size: 10 rows held out for evaluation, but the dataset has only 5; lower val_size (a count, or a "
        "fraction < 1)")


def test_a_tokenized_path_that_is_not_a_saved_dataset(tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a dataset")
    assert _error(capsys, _args(tmp_path, tokenized_path=folder) + ["--dry_run"]) == (
        f"tokenized_path: {folder} holds files but no saved dataset (no dataset_dict.json or state.json); point "
        f"tokenized_path at a new folder to tokenize into it")
    assert _error(capsys, _args(tmp_path, tokenized_path=folder / "notes.txt")) == (
        f"tokenized_path: {folder}/notes.txt is a file; give a folder (an empty or new one is filled with the "
        f"tokenized data)")


def test_overwrite_output_dir_clears_stale_results_and_disable_tqdm_hides_the_bar(tmp_path, capsys):
    """One short training run checks two things: a run started over (overwrite_output_dir) reports only itself,
    and disable_tqdm leaves no progress bar."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text(json.dumps({"eval_loss": 9.9}))
    (out / "all_results.json").write_text(json.dumps({"eval_loss": 9.9, "train_loss": 9.9}))
    (out / "training_eval_loss.png").write_bytes(b"old")
    assert cli(_args(tmp_path, max_steps=2, per_device_train_batch_size=1, packing="true", logging_steps=1,
                     save_steps=100, disable_tqdm="true", overwrite_output_dir="true")) == 0
    out_text, err = capsys.readouterr()
    assert "[jaxsft] INFO overwrite_output_dir: removed the previous run's all_results.json, eval_results.json, " \
           "training_eval_loss.png\n" in err
    assert sorted(p.name for p in out.glob("*results.json")) == ["all_results.json", "train_results.json"]
    assert "eval_loss" not in json.loads((out / "all_results.json").read_text())
    assert not (out / "training_eval_loss.png").exists()
    assert "train:" not in err and "it/s" not in err, err[-2000:]  # the bar ("train:  50%|...") is gone
    assert "'step': 2" in out_text  # the logged metrics still print


def test_dry_run_reads_the_first_rows(tmp_path, capsys):
    """A column typo in dataset_info.json and a malformed row are found by --dry_run, as the real run would
    find them, without loading weights; a good dataset passes."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": "hi", "output": "hello"}, {"instruction": 5, "output": "x"}]
    (data / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "ok.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({
        "typo": {"file_name": "ok.jsonl", "columns": {"prompt": "instrucion", "response": "output"}},
        "bad": {"file_name": "d.jsonl"}, "ok": {"file_name": "ok.jsonl"}}))
    assert _error(capsys, _args(tmp_path, dataset="typo", dataset_dir=data) + ["--dry_run"]) == (
        f"dataset 'typo': columns.prompt names 'instrucion', which is not a column of {data}/ok.jsonl (its columns: "
        f"instruction, output). Did you mean 'instruction'? Fix dataset_info.json")
    assert _error(capsys, _args(tmp_path, dataset="bad", dataset_dir=data) + ["--dry_run"]) == (
        f"{data}/d.jsonl, row 2, field 'instruction': expected a string, got int 5")
    assert cli(_args(tmp_path, dataset="bad", dataset_dir=data, skip_invalid_examples="true") + ["--dry_run"]) == 0
    assert cli(_args(tmp_path, dataset="ok", eval_dataset="ok", dataset_dir=data) + ["--dry_run"]) == 0


def _read_only(folder: Path) -> bool:
    """Make `folder` unwritable (chmod; as root, the immutable attribute); False when this machine cannot."""
    import os
    import subprocess
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_an_unwritable_output_dir_is_one_line_before_anything_loads(tmp_path, capsys):
    import subprocess

    import pytest
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _read_only(locked):
        pytest.skip("this machine cannot make a folder read-only for this user (no chmod effect, no chattr)")
    try:
        for key, extra in (("output_dir", {}), ("export_dir", {"export_dir": locked / "exported"})):
            target = locked / "out" if key == "output_dir" else tmp_path / "out"
            message = _error(capsys, _args(tmp_path, output_dir=target, **extra) + ["--dry_run"])
            assert message.startswith(f"{key}: cannot write in {locked} (") and message.endswith(
                "); give a directory you can write to"), message
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o700)


def test_a_hub_model_in_the_cache_trains_with_no_network(tmp_path, capsys, monkeypatch):
    """No network, HF_HUB_OFFLINE unset, the model id in the Hugging Face cache: the run uses the cached copy
    (one warning) instead of failing or retrying for 30 s."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in TINY.iterdir():
        (snapshot / f.name).symlink_to(f)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as when the network is down
    start = time.time()
    capsys.readouterr()
    assert cli(_args(tmp_path, model_name_or_path="someone/tiny", max_steps=1, save_strategy="'no'",
                     disable_tqdm="true")) == 0
    err = capsys.readouterr().err
    assert "the hub (http://127.0.0.1:9) cannot be reached ([Errno 111] Connection refused): using the cached copy " \
           "of someone/tiny" in err
    assert (tmp_path / "out" / "train_results.json").is_file()
    assert time.time() - start < 60
