"""The tokenized-data cache: an unchanged rerun loads the same examples without tokenizing; any change
(options, data file) tokenizes again; overwrite_cache forces it."""

import json
import logging
import shutil

import numpy as np

from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets


def _build(args, new_tokenizer, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxsft.data.pipeline"):
        data = build_datasets(args, new_tokenizer())
    hits = [r.getMessage() for r in caplog.records if "tokenized-data cache" in r.getMessage()]
    return data, hits


def test_unchanged_rerun_loads_the_cache_and_changes_miss_it(tmp_path, data_dir, new_tokenizer, caplog):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    cache = tmp_path / "cache"
    args = DataArgs(dataset="identity,glaive_toolcall_en_demo", dataset_dir=str(data), template="qwen",
                    cutoff_len=256, val_size=0.1, max_samples=60, data_cache_dir=str(cache))
    first, said = _build(args, new_tokenizer, caplog)
    assert said == []
    second, said = _build(args, new_tokenizer, caplog)
    assert len(said) == 1 and said[0].startswith("Tokenized data loaded from the tokenized-data cache"), said
    for a, b in ((first.train, second.train), (first.eval, second.eval)):
        assert len(a) == len(b) > 0
        for (ia, la), (ib, lb) in zip(a, b):
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(la, lb)
    assert first.stats == second.stats
    assert len(list(cache.iterdir())) == 1

    _, said = _build(args.replace(cutoff_len=128), new_tokenizer, caplog)  # another option: a new entry
    assert said == [] and len(list(cache.iterdir())) == 2
    _, said = _build(args.replace(overwrite_cache=True), new_tokenizer, caplog)  # asked to tokenize again
    assert said == []
    rows = json.loads((data / "identity.json").read_text())
    rows[0]["output"] += " And one more sentence."
    (data / "identity.json").write_text(json.dumps(rows))  # the data changed: tokenized again
    changed, said = _build(args, new_tokenizer, caplog)
    tokens = lambda d: d.stats["train_tokens"] + d.stats["eval_tokens"]  # noqa: E731
    assert said == [] and tokens(changed) > tokens(first)


def test_a_damaged_entry_is_a_miss_not_a_crash(tmp_path, data_dir, new_tokenizer, caplog):
    """A cache file cut short (a full disk, a killed copy) is ignored with a warning and tokenized again."""
    args = DataArgs(dataset="identity", dataset_dir=str(data_dir), template="qwen", cutoff_len=128,
                    data_cache_dir=str(tmp_path / "cache"))
    first, _ = _build(args, new_tokenizer, caplog)
    (entry,) = (tmp_path / "cache").iterdir()
    train = entry / "train.npz"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    again, said = _build(args, new_tokenizer, caplog)
    assert len(said) == 1 and said[0].startswith("ignoring the damaged tokenized-data cache entry")
    assert said[0].endswith("File is not a zip file")
    assert [len(i) for i, *_ in again.train] == [len(i) for i, *_ in first.train]
