"""build_datasets: LF-identical mixing/splitting, checkpointable grain iterator, sharding, eval, tokenized_path."""

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
with gzip.open(FIXTURES / "lf_pipeline.json.gz", "rt") as _f:
    LF_PIPELINE = json.load(_f)["pipeline"]


def _digest(ids) -> str:
    return hashlib.sha1(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:12]


@pytest.mark.parametrize("case", LF_PIPELINE, ids=lambda c: json.dumps(c["config"], sort_keys=True))
def test_mixing_and_splitting_pick_what_llamafactory_picks(case, data_dir, new_tokenizer):
    args = DataArgs(dataset_dir=str(data_dir), template=case["template"], cutoff_len=case["cutoff_len"],
                    seed=case["seed"], **case["config"])
    data = build_datasets(args, new_tokenizer())
    assert [[len(ids), _digest(ids)] for ids, _ in data.train] == case["train_dataset"]
    if "eval_dataset" in case:
        assert [[len(ids), _digest(ids)] for ids, _ in data.eval] == case["eval_dataset"]
    else:
        assert data.eval is None


@pytest.fixture(scope="module")
def mixed(data_dir):
    from transformers import AutoTokenizer

    args = DataArgs(dataset="identity,glaive_toolcall_en_demo", dataset_dir=str(data_dir),
                    template="qwen", cutoff_len=512, packing=True, val_size=0.1, max_samples=120)
    return build_datasets(args, AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer")))


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resumed_iterator_sees_exactly_the_remaining_batches(mixed):
    per_epoch = mixed.batches_per_epoch(3)
    assert per_epoch >= 4
    full = list(mixed.train_iterator(3, seed=7, num_epochs=2))
    assert len(full) == 2 * per_epoch
    for k in (1, per_epoch - 1, per_epoch + 2):  # inside the first epoch, at its end, inside the second
        it = mixed.train_iterator(3, seed=7, num_epochs=2)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        resumed = mixed.train_iterator(3, seed=7, num_epochs=2)
        resumed.set_state(state)
        _equal_batches(head + list(resumed), full)


def test_epochs_are_reshuffled_and_seeded(mixed):
    per_epoch = mixed.batches_per_epoch(2)
    a = list(mixed.train_iterator(2, seed=1, num_epochs=2))
    b = list(mixed.train_iterator(2, seed=1, num_epochs=2))
    c = list(mixed.train_iterator(2, seed=2, num_epochs=1))
    _equal_batches(a, b)
    assert not np.array_equal(a[0]["input_ids"], a[per_epoch]["input_ids"])
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def _segments(batches):
    """(input ids of each packed example) over all rows."""
    out = []
    for batch in batches:
        for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
            out += [tuple(ids[seg == s]) for s in range(1, seg.max() + 1)]
    return out


def test_processes_read_disjoint_shards_of_equal_length(mixed):
    shards = []
    for p in range(2):
        data = build_datasets.__globals__["SFTData"](mixed.train, mixed.eval, mixed.seq_len, mixed.pad_id,
                                                     mixed.packing, mixed.stats, process_index=p, process_count=2)
        shards.append(list(data.train_iterator(2, seed=5, num_epochs=1)))
    assert len(shards[0]) == len(shards[1]) > 0
    a, b = _segments(shards[0]), _segments(shards[1])
    everything = Counter(tuple(ids) for ids, _ in mixed.train)  # the data holds some identical examples
    used = Counter(a) + Counter(b)
    assert all(used[k] <= everything[k] for k in used)  # no example read twice, by one process or both
    assert len(a) + len(b) == len(mixed.train)  # every example, the last global batch filled up with empty rows


def test_eval_batches_hold_every_eval_example_once(mixed):
    batches = list(mixed.eval_batches(4))
    got = sorted(_segments(batches))
    assert got == sorted(tuple(ids) for ids, _ in mixed.eval)
    assert all(b["input_ids"].shape == (4, mixed.seq_len) for b in batches)
    learned = sum(int((b["targets"] != -100).sum()) for b in batches)
    assert learned == mixed.stats["eval_label_tokens"]


def test_unpacked_rows_hold_one_example_each(data_dir, new_tokenizer):
    args = DataArgs(dataset="identity", dataset_dir=str(data_dir), template="llama3", cutoff_len=128)
    data = build_datasets(args, new_tokenizer())
    batches = list(data.train_iterator(8, seed=0))
    # every example once per epoch, as Hugging Face's Trainer reads them: 91 = 11 x 8 + 3, the 12th batch
    # filled up with 5 empty rows (no tokens, nothing learned)
    assert len(batches) == 12 == data.batches_per_epoch(8)
    for b in batches[:-1]:
        assert (b["segment_ids"].max(axis=1) == 1).all()
    assert batches[-1]["segment_ids"].max(axis=1).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (batches[-1]["targets"][3:] == -100).all()
    assert sorted(_segments(batches)) == sorted(tuple(ids) for ids, _ in data.train)
    assert data.stats["train_examples"] == 91 and data.stats["train_dropped"] == 0
    # with 5 accumulation steps an epoch ends on a whole optimizer step: 12 -> 15 batches, 3 of them empty
    # (HF: ceil(12 / 5) = 3 steps, the last of 2 micro-batches); empty batches take the narrowest bucket
    buckets = [32, 64, 128]
    filled = list(data.train_iterator(8, seed=0, buckets=buckets, batch_multiple=5))
    assert len(filled) == 15 == data.batches_per_epoch(8, batch_multiple=5)
    assert sorted(_segments(filled)) == sorted(tuple(ids) for ids, _ in data.train)
    assert all((b["segment_ids"] == 0).all() and b["input_ids"].shape == (8, 32) for b in filled[12:])
    # dataloader_drop_last: the 3 examples of the short batch sit the epoch out (the old behaviour)
    dropped = list(data.train_iterator(8, seed=0, drop_last=True))
    assert len(dropped) == 11 == data.batches_per_epoch(8, drop_last=True)
    assert all((b["segment_ids"].max(axis=1) == 1).all() for b in dropped)


def test_tokenized_path_round_trip(tmp_path, data_dir, new_tokenizer):
    args = DataArgs(dataset="identity", dataset_dir=str(data_dir), template="qwen", cutoff_len=256,
                    val_size=10, tokenized_path=str(tmp_path / "tok"))
    first = build_datasets(args, new_tokenizer())
    assert (tmp_path / "tok" / "dataset_dict.json").exists()
    args = args.replace(dataset="no_such_dataset")  # ignored once the tokenized data exists, as in LLaMA-Factory
    second = build_datasets(args, new_tokenizer())
    for a, b in ((first.train, second.train), (first.eval, second.eval)):
        assert len(a) == len(b)
        for (ia, la), (ib, lb) in zip(a, b):
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(la, lb)


def test_tokenized_path_is_saved_whole_or_not_at_all(tmp_path, data_dir, new_tokenizer):
    """The save goes to a hidden folder beside tokenized_path and is renamed into place (a run killed while
    saving leaves no half dataset); an empty folder named as tokenized_path is filled; a damaged saved
    dataset is one line naming it."""
    from jaxsft.errors import InputError

    (tmp_path / "tok").mkdir()
    args = DataArgs(dataset="identity", dataset_dir=str(data_dir), template="qwen", cutoff_len=256,
                    tokenized_path=str(tmp_path / "tok"))
    build_datasets(args, new_tokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no leftover of the hidden folder
    for arrow in (tmp_path / "tok" / "train").glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(InputError, match=rf"^tokenized_path: {tmp_path}/tok cannot be read as a saved dataset \("
                                         r"\w+: .*\); point tokenized_path at a new folder to tokenize into it$"):
        build_datasets(args, new_tokenizer())


def test_examples_with_nothing_to_learn_are_dropped_and_counted(tmp_path, new_tokenizer):
    rows = [{"instruction": "a long question " * 200, "input": "", "output": "fine, thanks " * 10},
            {"instruction": "hi", "input": "", "output": "hello"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    # infer_seqlen gives the answer int(16 * t / (s + t)) = 0 tokens when the prompt is huge
    args = DataArgs(dataset=str(tmp_path / "d.json"), dataset_dir=str(tmp_path), template="qwen",
                    cutoff_len=16, train_on_prompt=False)
    data = build_datasets(args, new_tokenizer())
    assert data.stats["train_examples"] == 1 and data.stats["train_dropped"] == 1
    assert "no label tokens left after truncation to cutoff_len=16" in data.stats["train_dropped_reasons"][0]


def test_counts_add_sums_parts_and_keeps_the_first_reasons_in_order():
    from jaxsft.data.encode import MAX_REASONS, Counts

    first, second = Counts(rows=4, examples=3, tokens=30, label_tokens=12), Counts(rows=6, examples=2, tokens=9,
                                                                                   label_tokens=4)
    first.drop("a, row 1")
    for k in range(MAX_REASONS + 2):
        second.drop(f"b, row {k}")
    first.add(second)
    assert (first.rows, first.examples, first.tokens, first.label_tokens) == (10, 5, 39, 16)
    assert first.dropped == 1 + MAX_REASONS + 2
    assert first.reasons == ["a, row 1"] + [f"b, row {k}" for k in range(MAX_REASONS - 1)]


def _unpacked(mixed, process_index=0, process_count=1):
    cls = build_datasets.__globals__["SFTData"]
    return cls(mixed.train, mixed.eval, mixed.seq_len, mixed.pad_id, False, mixed.stats,
               process_index=process_index, process_count=process_count)


def test_unpacked_batches_are_padded_to_the_bucket_of_the_global_batch(mixed):
    from jaxsft.data.packing import bucket_for, fit_width, length_buckets

    buckets = length_buckets(mixed.seq_len)
    shards = [list(_unpacked(mixed, p, 2).train_iterator(2, seed=3, num_epochs=2, buckets=buckets))
              for p in range(2)]
    assert len(shards[0]) == len(shards[1]) > 10
    widths = set()
    for a, b in zip(*shards):
        assert a["input_ids"].shape == b["input_ids"].shape  # both processes pad the global batch alike
        longest = max(int(np.count_nonzero(s)) for s in np.concatenate([a["segment_ids"], b["segment_ids"]]))
        assert a["input_ids"].shape[1] == bucket_for(longest, buckets)
        widths.add(a["input_ids"].shape[1])
    assert len(widths) > 1 and min(widths) < mixed.seq_len
    # the same rows as padding every row to cutoff_len, only without the extra padding
    one_process = list(_unpacked(mixed).train_iterator(4, seed=3, num_epochs=2, buckets=buckets))
    assert len(one_process) == 2 * -(-len(mixed.train) // 4)  # 2 epochs, every row, the last batch filled up
    full4 = list(_unpacked(mixed).train_iterator(4, seed=3, num_epochs=2))
    _equal_batches(one_process, [fit_width(f, o["input_ids"].shape[1], mixed.pad_id)
                                 for f, o in zip(full4, one_process)])


def test_bucketed_eval_batches_hold_the_same_examples(mixed):
    from jaxsft.data.packing import length_buckets

    for data in (mixed, _unpacked(mixed)):
        padded = list(data.eval_batches(1))
        bucketed = list(data.eval_batches(1, length_buckets(data.seq_len)))
        assert sorted(_segments(bucketed)) == sorted(_segments(padded))
        fewer = sum(b["input_ids"].size for b in bucketed) < sum(b["input_ids"].size for b in padded)
        assert fewer or data.packing  # packed rows are (mostly) full already
        assert sum(int((b["targets"] != -100).sum()) for b in bucketed) == mixed.stats["eval_label_tokens"]


def test_tokenized_path_packed_by_llamafactory_is_a_user_error(tmp_path, new_tokenizer):
    import datasets

    from jaxsft.errors import InputError

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "labels": [[1, 2]], "position_ids": [[0, 1]]})}
    ).save_to_disk(str(tmp_path / "tok"))
    with pytest.raises(InputError, match=r"tok holds rows packed by LLaMA-Factory; jaxsft packs itself"):
        build_datasets(DataArgs(tokenized_path=str(tmp_path / "tok"), template="qwen"), new_tokenizer())
