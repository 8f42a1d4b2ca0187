"""Resuming through the CLI: from an older checkpoint (branching, undoing a divergence), into another output_dir,
after a crash that tore the log; results and log cover the whole run; changed settings are compared."""

import json
import re
import shutil
from pathlib import Path

import pytest
from run_logs import log_lines, train_losses

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]
RUN = {"model_name_or_path": REPO / "examples" / "tiny-llama", "dataset": "identity",
       "dataset_dir": REPO / "examples" / "data", "template": "llama3", "cutoff_len": 128, "packing": "true",
       "do_train": "true", "finetuning_type": "lora", "lora_rank": 4, "learning_rate": 0.01,
       "per_device_train_batch_size": 1, "logging_steps": 1, "report_to": "none", "max_steps": 4, "save_steps": 2,
       "seed": 5}


def _train(out, *extra, **overrides) -> int:
    return cli([f"{k}={v}" for k, v in {**RUN, **overrides}.items()] + [f"output_dir={out}", *extra])


def _results(out) -> dict:
    return json.loads((Path(out) / "train_results.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 4-step run saving checkpoint_2 and checkpoint_4 (kept read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert _train(out) == 0
    return out


def _copy(straight, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    return out


def test_resume_from_an_older_checkpoint_sets_later_ones_aside_and_replaces_their_log(straight, tmp_path, capsys):
    out = _copy(straight, tmp_path)
    with (out / "trainer_log.jsonl").open("a") as f:
        f.write('{"current_steps": 5, "total_steps": 4, "lo')  # a crash while writing a line
    capsys.readouterr()
    assert _train(out, f"resume_from_checkpoint={out / 'checkpoint_2'}") == 0
    err = capsys.readouterr().err
    aside = next((out / "set_aside").iterdir())
    assert re.fullmatch(r"after_step_2_\d{8}-\d{6}", aside.name)
    assert (f"[jaxsft] WARNING resuming from checkpoint_2: the later checkpoints (checkpoint_4) and 2 "
            f"trainer_log.jsonl lines of their steps were moved to {aside}; delete that folder if you do not need "
            f"them\n") in err
    assert "[jaxsft] WARNING trainer_log.jsonl: dropped 1 unreadable line (cut short when a run was killed while " \
           "writing it)\n" in err
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_4", "trainer_log.jsonl"]
    assert [r["current_steps"] for r in log_lines(aside)] == [3, 4]
    # the log has every step once, the redone steps with the uninterrupted run's losses
    lines = log_lines(out)
    assert [r["current_steps"] for r in lines] == [1, 2, 3, 4]
    assert train_losses(lines) == train_losses(straight)
    # results describe the whole run, not the two steps after the resume
    expected, got = _results(straight), _results(out)
    for key in ("train_loss", "total_flos", "epoch"):
        assert got[key] == expected[key], key
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint_")) == ["checkpoint_2",
                                                                                        "checkpoint_4"]


def test_resume_into_another_output_dir_starts_with_the_source_history(straight, tmp_path):
    branch = tmp_path / "branch"
    assert _train(branch, f"resume_from_checkpoint={straight / 'checkpoint_2'}") == 0
    assert [r["current_steps"] for r in log_lines(branch)] == [1, 2, 3, 4]
    assert train_losses(branch) == train_losses(straight)
    assert _results(branch)["train_loss"] == _results(straight)["train_loss"]
    assert _results(branch)["total_flos"] == _results(straight)["total_flos"]
    assert not (branch / "set_aside").exists()
    assert (straight / "checkpoint_4").is_dir()  # the source run is left as it was


def test_resume_refuses_settings_the_checkpoint_cannot_follow(straight, capsys):
    capsys.readouterr()
    assert _train(straight, "resume_from_checkpoint=true", lora_rank=8, finetuning_type="lora") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: resume_from_checkpoint: {straight}/checkpoint_4 was trained with other settings that its saved "
        f"params or optimizer state cannot follow: lora_rank 4 -> 8. Resume with the checkpoint's values, or start a "
        f"new run (another output_dir, or overwrite_output_dir: true)")


def test_resume_names_the_settings_that_changed(straight, tmp_path, capsys):
    out = _copy(straight, tmp_path)
    capsys.readouterr()
    assert _train(out, "resume_from_checkpoint=true", "logging_steps=2", learning_rate=0.02,
                  per_device_train_batch_size=2, dataset=f"{RUN['dataset_dir']}/identity.json") == 0
    assert (f"[jaxsft] WARNING resuming {out}/checkpoint_4 with changed settings: dataset 'identity' -> "
            f"'{RUN['dataset_dir']}/identity.json', learning_rate 0.01 -> 0.02, per_device_train_batch_size 1 -> 2; "
            f"the run continues with the new values, so it will not match an uninterrupted run\n"
            ) in capsys.readouterr().err  # logging_steps is not learning: not named


def _data_files(step_dir):
    """The OCDBT data files of the params and optimizer state (in `d/` folders; where depends on the mesh)."""
    files = [f for item in ("trainable", "optimizer") for f in (step_dir / item).rglob("*")
             if f.is_file() and f.parent.name == "d"]
    assert files
    return files


def _truncate_state(step_dir):
    for f in _data_files(step_dir):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_state(step_dir):
    for f in _data_files(step_dir):
        data = bytearray(f.read_bytes())
        data[len(data) // 3: len(data) // 3 + 64] = b"\x00\xff" * 32
        f.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_state_file": _truncate_state,
    "bad_zstd_bytes": _garble_state,
    "missing_metadata": lambda d: (d / "trainable" / "_METADATA").unlink(),
    "missing_data_item": lambda d: shutil.rmtree(d / "data"),
    "missing_config_item": lambda d: shutil.rmtree(d / "config"),
}


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_damaged_checkpoint_named_is_one_line_naming_it(straight, tmp_path, capsys, damage):
    out = _copy(straight, tmp_path)
    CORRUPTIONS[damage](out / "checkpoint_4")
    capsys.readouterr()
    assert _train(out, f"resume_from_checkpoint={out / 'checkpoint_4'}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert re.fullmatch(re.escape(f"error: checkpoint {out}/checkpoint_4 cannot be read (") + r"\w+: [^\n]*"
                        + re.escape("); it is damaged or incomplete. Resume from another checkpoint (here: "
                                    "checkpoint_2), or move it aside"), last), last


@pytest.mark.parametrize("damage", ["truncated_state_file", "missing_config_item"])
def test_auto_resume_sets_a_damaged_newest_checkpoint_aside_and_resumes_the_one_before(straight, tmp_path, capsys,
                                                                                       damage):
    """`resume_from_checkpoint: true` after a crash left a damaged checkpoint_4: the run goes on from
    checkpoint_2 (the damage is found when reading the state, or already when reading the saved config)."""
    out = _copy(straight, tmp_path)
    CORRUPTIONS[damage](out / "checkpoint_4")
    capsys.readouterr()
    assert _train(out, "resume_from_checkpoint=true") == 0
    printed = capsys.readouterr()
    err = printed.err
    assert "Traceback" not in err
    assert f"resumed from {out}/checkpoint_2 at step 2" in printed.out
    aside = next((out / "set_aside").glob("damaged_checkpoint_4_*"))
    assert re.search(re.escape(f"[jaxsft] WARNING checkpoint {out}/checkpoint_4 cannot be read (") + r"\w+: .*"
                     + re.escape(f"; it was moved to {aside} and the run resumes from checkpoint_2, the newest one "
                                 f"before it\n"), err), err
    lines = log_lines(out)
    assert [r["current_steps"] for r in lines] == [1, 2, 3, 4]
    assert train_losses(lines) == train_losses(straight)
    assert _results(out)["train_loss"] == _results(straight)["train_loss"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint_")) == ["checkpoint_2",
                                                                                        "checkpoint_4"]


def test_auto_resume_with_only_a_damaged_checkpoint_is_one_line(straight, tmp_path, capsys):
    out = _copy(straight, tmp_path)
    shutil.rmtree(out / "checkpoint_2")
    _truncate_state(out / "checkpoint_4")
    capsys.readouterr()
    assert _train(out, "resume_from_checkpoint=true") == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: checkpoint {out}/checkpoint_4 cannot be read (") and last.endswith(
        "(here: none), or move it aside"), last
