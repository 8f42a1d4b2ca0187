"""Rows longer than cutoff_len are counted, with the tokens they lose, and reported: a log line (a warning above
a few percent), the run's first trainer_log.jsonl line and train_results.json."""

import json
from pathlib import Path

from transformers import AutoTokenizer

from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets
from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny-llama"


def _rows(path: Path) -> None:
    rows = [{"instruction": f"question {i}", "output": "short answer"} for i in range(7)]
    rows += [{"instruction": f"tell a long story {i}", "output": "and then " * (40 + 10 * i)} for i in range(3)]
    path.write_text(json.dumps(rows))


def _data(path: Path, cutoff: int):
    args = DataArgs(dataset=str(path), dataset_dir=str(path.parent), template="llama3", cutoff_len=cutoff,
                    skip_invalid_examples=False)
    return build_datasets(args, AutoTokenizer.from_pretrained(str(TINY)))


def test_truncated_rows_are_counted_and_reported(tmp_path, capsys):
    path = tmp_path / "rows.json"
    _rows(path)
    whole, cut = _data(path, 4096).stats, _data(path, 64).stats
    assert whole["train_truncated"] == 0 and whole["train_examples"] == cut["train_examples"] == 10
    lost = whole["train_tokens"] - cut["train_tokens"]
    assert cut["train_truncated"] == 3 and cut["train_truncated_tokens"] == lost > 0

    out = tmp_path / "out"
    capsys.readouterr()
    assert cli([f"model_name_or_path={TINY}", f"dataset={path}", "template=llama3", "cutoff_len=64", "do_train=true",
                f"output_dir={out}", "max_steps=1", "logging_steps=1", "per_device_train_batch_size=1",
                "report_to=none"]) == 0
    assert (f"[jaxsft] WARNING train data: 3 of 10 examples (30.0%) were longer than cutoff_len=64 and were "
            f"truncated, {lost} tokens cut; raise cutoff_len to keep more\n") in capsys.readouterr().err
    first = json.loads((out / "trainer_log.jsonl").read_text().splitlines()[0])
    assert (first["truncated_examples"], first["truncated_tokens"]) == (3, lost)
    results = json.loads((out / "train_results.json").read_text())
    assert (results["train_truncated_examples"], results["train_truncated_tokens"]) == (3, lost)
