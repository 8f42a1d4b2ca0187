"""streaming: true reads rows lazily and its iterator resumes exactly."""

import itertools
import json
from pathlib import Path

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


def _two_sources(tmp_path, template="qwen", sizes=(23, 17)):
    """Two datasets whose rows say who they are ('row a7'); their registry."""
    registry = {}
    for name, n in zip("ab", sizes):
        rows = [{"instruction": f"row {name}{i}", "input": "", "output": f"answer {name}{i}"} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        registry[name] = {"file_name": f"{name}.jsonl"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    return DataArgs(dataset="a,b", dataset_dir=str(tmp_path), template=template, cutoff_len=96, packing=True,
                    streaming=True, val_size=8, mix_strategy="interleave_over", buffer_size=10, seed=3)


def _names(tokenizer, ids, segments=None) -> set[str]:
    """The row names ('a7', 'b3') in token ids (each segment of a packed row decoded on its own)."""
    import re

    if segments is None:
        texts = [tokenizer.decode(ids)]
    else:
        texts = [tokenizer.decode(ids[segments == s]) for s in range(1, int(segments.max()) + 1)]
    return {m for text in texts for m in re.findall(r"row ([ab]\d+)", text)}


def test_streaming_eval_rows_never_reach_training_over_epochs(tmp_path, new_tokenizer):
    """val_size with interleaved sources: the eval split is the first rows of epoch 0's mix, kept by identity
    (source, row); later epochs mix the rows in another order, and training never sees an eval row."""
    from jaxsft.data.streaming import _raw_rows

    args = _two_sources(tmp_path)
    tokenizer = new_tokenizer()
    data = build_datasets(args, tokenizer)
    held_out = set().union(*(_names(tokenizer, ids) for ids, _ in data.eval))
    assert len(held_out) == len(data.eval) == 8
    first_rows = [[row_id for row_id, _, _ in itertools.islice(_raw_rows(data.attrs, args.mix_strategy, data.probs,
                                                                          args.seed, epoch), 8)] for epoch in range(3)]
    assert first_rows[0] != first_rows[1] and first_rows[0] != first_rows[2]  # where a split by position leaks

    per_epoch = data.batches_per_epoch(2)
    trained: list[set[str]] = []
    it = data.train_iterator(2, seed=args.seed, num_epochs=3)
    for batch in it:
        for ids, segments in zip(batch["input_ids"], batch["segment_ids"]):
            trained.append(_names(tokenizer, ids, segments))
    seen = set().union(*trained)
    assert not seen & held_out
    assert seen == ({f"a{i}" for i in range(23)} | {f"b{i}" for i in range(17)}) - held_out
    assert len(trained) > 2 * per_epoch * 2  # more than two epochs were read


def test_streaming_run_does_its_planned_steps(tmp_path, capsys):
    """Through the CLI: 3 epochs of an interleaved stream with val_size end with the planned steps (counted
    from epoch 0 with the run's seed; later epochs hold other numbers of rows) and evaluate the held-out rows."""
    from jaxsft.data.pipeline import build_datasets as build
    from jaxsft.main import cli

    args = _two_sources(tmp_path, template="llama3")
    tiny = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"
    out = tmp_path / "out"
    values = dict(model_name_or_path=tiny, dataset="a,b", dataset_dir=tmp_path, template="llama3", cutoff_len=96,
                  packing=True, streaming=True, val_size=8, mix_strategy="interleave_over", buffer_size=10, seed=3,
                  do_train=True, do_eval=True, num_train_epochs=3, per_device_train_batch_size=1,
                  per_device_eval_batch_size=1, mesh="{data: 1, fsdp: 2, tensor: 4}", logging_steps=1,
                  save_strategy="'no'", output_dir=out, report_to="none", disable_tqdm=True, remat_policy="none",
                  learning_rate=1e-3)
    assert cli([f"{k}={v}" for k, v in values.items()]) == 0
    from transformers import AutoTokenizer
    planned = 3 * build(args, AutoTokenizer.from_pretrained(str(tiny))).batches_per_epoch(2)
    steps = [json.loads(line)["current_steps"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-1] == planned and len(steps) == planned
    assert json.loads((out / "eval_results.json").read_text())["eval_examples"] == 8


def test_streaming_counts_truncated_and_dropped_rows_as_in_memory(tmp_path, new_tokenizer, caplog):
    """The pass that counts a stream's batches also counts what cutoff_len cut and which rows were dropped:
    the same figures as reading the data in memory, and the same warning."""
    rows = [{"instruction": f"question {i} " + "word " * (150 if i % 3 == 0 else 5), "input": "",
             "output": f"answer {i}"} for i in range(30)]
    rows[4] = {"instruction": "no answer"}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArgs(dataset=str(tmp_path / "d.jsonl"), dataset_dir=str(tmp_path), template="qwen", cutoff_len=64,
                    packing=True, streaming=True, buffer_size=7)
    stream = build_datasets(args, new_tokenizer())
    caplog.clear()
    stream.batches_per_epoch(2)
    memory = build_datasets(args.replace(streaming=False), new_tokenizer())
    keys = ("train_rows_read", "train_examples", "train_dropped", "train_dropped_reasons", "train_tokens",
            "train_label_tokens", "train_truncated", "train_truncated_tokens")
    assert {k: stream.stats[k] for k in keys} == {k: memory.stats[k] for k in keys}
    assert stream.stats["train_truncated"] == 10 and stream.stats["train_dropped"] == 1
    assert "train data: 10 of 29 examples (34.5%) were longer than cutoff_len=64 and were truncated" in caplog.text


def test_streaming_checks_registry_columns_before_reading(tmp_path, new_tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"d": {"file_name": "d.jsonl", "columns": {"prompt": "instrucion", "response": "output"}}}))
    args = DataArgs(dataset="d", dataset_dir=str(tmp_path), template="qwen", cutoff_len=64, streaming=True)
    with pytest.raises(ValueError, match=r"^dataset 'd': columns.prompt names 'instrucion', which is not a column "
                                         r"of .*d.jsonl \(its columns: instruction, output\). Did you mean "
                                         r"'instruction'\? Fix dataset_info.json$"):
        build_datasets(args, new_tokenizer())
