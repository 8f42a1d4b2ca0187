"""streaming: true reads rows lazily and its iterator resumes exactly."""

import json

import numpy as np
import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets
from jaxsft.errors import ConfigError


def test_rows_are_read_lazily(tmp_path, new_tokenizer):
    lines = [json.dumps({"instruction": f"question {i}", "input": "", "output": f"answer {i}"}) for i in range(3000)]
    lines[2500] = "{not json"
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    args = DataArgs(dataset=str(tmp_path / "big.jsonl"), dataset_dir=str(tmp_path), template="qwen",
                    cutoff_len=256, packing=True, streaming=True, buffer_size=100)
    data = build_datasets(args, new_tokenizer())
    it = data.train_iterator(2, seed=0)
    assert next(it)["input_ids"].shape == (2, 256)  # the broken line 2501 is not read yet
    with pytest.raises(ValueError, match=r"big.jsonl, line 2501: invalid JSON"):
        for _ in it:
            pass
    with pytest.raises(ValueError, match="invalid JSON"):  # the in-memory path reads it all up front
        build_datasets(args.replace(streaming=False), new_tokenizer())


def test_streaming_iterator_resumes_exactly(data_dir, new_tokenizer):
    args = DataArgs(dataset="identity,glaive_toolcall_en_demo", dataset_dir=str(data_dir),
                    template="qwen", cutoff_len=512, packing=True, streaming=True, val_size=20,
                    mix_strategy="interleave_under", buffer_size=50, seed=1)
    data = build_datasets(args, new_tokenizer())
    assert len(data.eval) == 20
    full = list(data.train_iterator(3, seed=1, num_epochs=2))
    assert len(full) > 10
    assert data.batches_per_epoch(3) == len(list(data.train_iterator(3, seed=1, num_epochs=1)))
    for k in (1, 7, len(full) // 2 + 1, len(full) - 1):
        it = data.train_iterator(3, seed=1, num_epochs=2)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.get_state()))
        resumed = data.train_iterator(3, seed=1, num_epochs=2)
        resumed.set_state(state)
        got = head + list(resumed)
        assert len(got) == len(full)
        for x, y in zip(got, full):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


def test_streaming_rejects_what_llamafactory_rejects(data_dir, new_tokenizer):
    base = dict(dataset="identity", dataset_dir=str(data_dir), template="qwen", cutoff_len=64, streaming=True)
    with pytest.raises(ConfigError, match="val_size must be a number of rows"):
        build_datasets(DataArgs(val_size=0.1, **base), new_tokenizer())
    with pytest.raises(ConfigError, match="max_samples cannot be used with streaming"):
        build_datasets(DataArgs(max_samples=3, **base), new_tokenizer())
