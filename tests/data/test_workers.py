"""preprocessing_num_workers: spawned workers encode exactly what one process does, errors included."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from jaxsft.data import pipeline
from jaxsft.data.formats import InvalidExample

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "llamafactory"
TOKENIZER = REPO / "tests" / "fixtures" / "data" / "tokenizer"


def args(dataset_dir, workers, **extra):
    return SimpleNamespace(**{**pipeline.DEFAULTS, "dataset": "alpaca_en_demo", "dataset_dir": str(dataset_dir),
                              "template": "llama3", "cutoff_len": 256, "max_samples": 300,
                              "preprocessing_num_workers": workers, **extra})


def test_workers_match_one_process(monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_ROWS_PER_WORKER", 50)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    serial = pipeline.build_datasets(args(DATA, 1), tokenizer)
    parallel = pipeline.build_datasets(args(DATA, 2), tokenizer)
    assert len(parallel.train) == len(serial.train) == 300
    for (ids_a, labels_a), (ids_b, labels_b) in zip(serial.train, parallel.train):
        assert ids_a.tolist() == ids_b.tolist() and labels_a.tolist() == labels_b.tolist()
    assert parallel.stats == serial.stats


def test_worker_error_names_file_row_field(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "MIN_ROWS_PER_WORKER", 50)
    rows = json.loads((DATA / "alpaca_en_demo.json").read_text())[:200]
    rows[150]["instruction"] = {"not": "text"}
    (tmp_path / "alpaca_en_demo.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    with pytest.raises(InvalidExample, match=r"alpaca_en_demo.json, row 150, field 'instruction'"):
        pipeline.build_datasets(args(tmp_path, 2), tokenizer)
