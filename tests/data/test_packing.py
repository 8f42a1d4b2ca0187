"""Greedy knapsack (same choices as LLaMA-Factory's) and the packed-row contract of docs/internals.md."""

import gzip
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data.packing import IGNORE_INDEX, greedy_knapsack, make_row, plan_epoch
from jaxsft.data.pipeline import build_datasets

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def test_same_bins_as_llamafactory():
    with gzip.open(FIXTURES / "lf_pipeline.json.gz", "rt") as f:
        knap = json.load(f)["knapsack"]
    lengths = knap["lengths"]
    bins, too_long = greedy_knapsack(lengths, knap["capacity"])
    assert too_long == []
    assert [[lengths[i] for i in b] for b in bins] == knap["bins"]


def test_one_million_lengths_pack_in_seconds():
    rng = random.Random(1)
    lengths = [rng.randint(1, 3000) for _ in range(1_000_000)]
    start = time.perf_counter()
    bins, _ = greedy_knapsack(lengths, 4096)
    assert time.perf_counter() - start < 10  # LF's list pops: ~n^2/2 element moves, minutes at this size
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 4096


def test_too_long_examples_are_returned_not_packed():
    bins, too_long = greedy_knapsack([5, 11, 3, 10], 10)
    assert too_long == [1]
    assert sorted(i for b in bins for i in b) == [0, 2, 3]


def _check_row(row, examples, members, seq_len, pad_id):
    ids, tgt, seg, pos = row["input_ids"], row["targets"], row["segment_ids"], row["positions"]
    assert all(a.shape == (seq_len,) and a.dtype == np.int32 for a in (ids, tgt, seg, pos))
    start = 0
    for k, m in enumerate(members, 1):
        e_ids, e_labels = examples[m]
        n = len(e_ids)
        sl = slice(start, start + n)
        np.testing.assert_array_equal(ids[sl], e_ids)
        np.testing.assert_array_equal(seg[sl], k)
        np.testing.assert_array_equal(pos[sl], np.arange(n))
        np.testing.assert_array_equal(tgt[start:start + n - 1], e_labels[1:])  # shifted within the example
        assert tgt[start + n - 1] == IGNORE_INDEX  # nothing crosses an example boundary
        start += n
    assert (seg[start:] == 0).all() and (pos[start:] == 0).all()
    assert (tgt[start:] == IGNORE_INDEX).all() and (ids[start:] == pad_id).all()


def test_row_layout():
    examples = [(np.array([5, 6, 7], np.int32), np.array([-100, 6, 7], np.int32)),
                (np.array([8, 9], np.int32), np.array([-100, 9], np.int32))]
    row = make_row(examples, [1, 0], 8, pad_id=2)
    assert row["input_ids"].tolist() == [8, 9, 5, 6, 7, 2, 2, 2]
    assert row["targets"].tolist() == [9, -100, 6, 7, -100, -100, -100, -100]
    assert row["segment_ids"].tolist() == [1, 1, 2, 2, 2, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 0, 1, 2, 0, 0, 0]
    _check_row(row, examples, [1, 0], 8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        make_row(examples, [0, 1], 4, pad_id=2)


@pytest.fixture(scope="module")
def alpaca_2048(data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    args = DataArgs(dataset="alpaca_en_demo", dataset_dir=str(data_dir), template="llama3",
                    cutoff_len=2048, packing=True)
    return build_datasets(args, tok)


def test_packed_epoch_on_alpaca(alpaca_2048):
    data = alpaca_2048
    plan = plan_epoch(data.lengths, data.seq_len, seed=3, epoch=0, packing=True)
    members = sorted(i for row in plan for i in row)
    assert members == list(range(len(data.train)))  # every example exactly once
    assert all(sum(data.lengths[i] for i in row) <= data.seq_len for row in plan)  # no overflow
    for row in plan[:40]:
        _check_row(make_row(data.train, row, data.seq_len, data.pad_id), data.train, row, data.seq_len,
                   data.pad_id)
    assert data.stats["train_packing_efficiency"] >= 0.98
    assert len(plan) == data.stats["train_packed_rows"]


def test_each_epoch_packs_and_orders_differently(alpaca_2048):
    data = alpaca_2048
    e0 = plan_epoch(data.lengths, data.seq_len, seed=3, epoch=0, packing=True)
    e1 = plan_epoch(data.lengths, data.seq_len, seed=3, epoch=1, packing=True)
    assert e0 == plan_epoch(data.lengths, data.seq_len, seed=3, epoch=0, packing=True)
    assert e0 != e1 and len(e0) == len(e1)


def test_length_buckets_are_few_and_end_at_cutoff():
    from jaxsft.data.packing import length_buckets

    assert length_buckets(512) == [64, 96, 128, 192, 256, 384, 512]
    assert length_buckets(2048)[-3:] == [1024, 1536, 2048] and len(length_buckets(2048)) == 11
    assert length_buckets(300) == [64, 96, 128, 192, 256, 300]
    assert length_buckets(40) == [40]


def test_batch_widths_round_each_global_batch_up_to_its_longest_row():
    from jaxsft.data.packing import batch_widths

    buckets = [64, 96, 128, 256]
    assert batch_widths([10, 70, 5, 5, 129, 1, 256, 3, 97], 2, buckets) == [96, 64, 256, 256, 128]
    assert batch_widths([300], 1, buckets) == [256]  # nothing beyond the last bucket


def test_fit_width_pads_and_cuts_only_padding():
    from jaxsft.data.packing import fit_width, stack_rows

    examples = [(np.arange(1, 6, dtype=np.int32), np.arange(1, 6, dtype=np.int32))]
    batch = stack_rows([make_row(examples, [0], 16, pad_id=0)])
    cut = fit_width(batch, 8, pad_id=0)
    assert cut["input_ids"].shape == (1, 8) and cut["input_ids"][0, :5].tolist() == [1, 2, 3, 4, 5]
    back = fit_width(cut, 16, pad_id=0)
    for k in batch:
        np.testing.assert_array_equal(back[k], batch[k])
    with pytest.raises(ValueError, match="more than 4 tokens"):
        fit_width(batch, 4, pad_id=0)


def test_group_by_length_sorts_each_megabatch_and_keeps_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 103).tolist()
    plain = plan_epoch(lengths, 512, seed=1, epoch=0, packing=False)
    grouped = plan_epoch(lengths, 512, seed=1, epoch=0, packing=False, group=20)
    assert sorted(m[0] for m in grouped) == list(range(103))
    for start in range(0, 103, 20):
        chunk = [lengths[m[0]] for m in grouped[start:start + 20]]
        assert chunk == sorted(chunk, reverse=True)
        # the same examples form each megabatch as without grouping: only the order inside changes
        assert sorted(m[0] for m in grouped[start:start + 20]) == sorted(m[0] for m in plain[start:start + 20])
