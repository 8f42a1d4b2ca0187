"""preprocessing_num_workers: spawned workers encode exactly what one process does, errors included."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data import encode, pipeline, workers
from jaxsft.data.formats import InvalidExample


def args(dataset_dir, workers, **extra):
    return DataArgs(**{"dataset": "alpaca_en_demo", "dataset_dir": str(dataset_dir),
                    "template": "llama3", "cutoff_len": 256, "max_samples": 300,
                    "preprocessing_num_workers": workers, **extra})


@pytest.fixture
def parent_encodes(monkeypatch):
    """Counts the calls of the serial encoder in this (parent) process: workers run it in theirs."""
    monkeypatch.setattr(encode, "MIN_ROWS_PER_WORKER", 50)
    calls = []
    serial = encode._encode_serial

    def counted(*a, **k):
        calls.append(1)
        return serial(*a, **k)
    monkeypatch.setattr(encode, "_encode_serial", counted)
    return calls


def test_workers_match_one_process(parent_encodes, data_dir, new_tokenizer):
    serial = pipeline.build_datasets(args(data_dir, 1), new_tokenizer())
    assert len(parent_encodes) == 1  # one process: the parent encoded the rows itself
    parallel = pipeline.build_datasets(args(data_dir, 2), new_tokenizer())
    assert len(parent_encodes) == 1  # two workers: the parent encoded nothing
    assert len(parallel.train) == len(serial.train) == 300
    for (ids_a, labels_a), (ids_b, labels_b) in zip(serial.train, parallel.train):
        assert ids_a.tolist() == ids_b.tolist() and labels_a.tolist() == labels_b.tolist()
    assert parallel.stats == serial.stats


def test_worker_error_names_file_row_field(parent_encodes, data_dir, new_tokenizer, tmp_path):
    rows = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:200]
    rows[150]["instruction"] = {"not": "text"}
    (tmp_path / "alpaca_en_demo.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    with pytest.raises(InvalidExample, match=r"alpaca_en_demo.json, row 151, field 'instruction'"):
        pipeline.build_datasets(args(tmp_path, 2), new_tokenizer())
    assert parent_encodes == []  # the error came from a worker


def test_a_worker_imports_neither_transformers_nor_jax(data_dir, new_tokenizer, tmp_path):
    """What a worker is sent unpickles with the data code alone: starting one costs a bare interpreter and
    numpy, not the seconds of transformers / JAX imports that spawned workers paid."""
    a = args(data_dir, 2)
    tokenizer = new_tokenizer()
    template = encode.make_template(a, tokenizer)
    fast = encode.text_tokenizer(tokenizer, template)
    assert fast is not tokenizer  # the Rust core, not the transformers object
    job = tmp_path / "job.pkl"
    job.write_bytes(pickle.dumps(([], template, fast, a)))
    code = ("import pickle, sys; from jaxsft.data import workers; job = pickle.load(open(sys.argv[1], 'rb')); "
            "workers._work(*job); print(sorted(m for m in ('transformers', 'jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": workers.PACKAGE_ROOT})
    assert out.stdout.strip() == "[]"
