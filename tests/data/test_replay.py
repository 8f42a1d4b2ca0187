"""Replay rows (jaxsft/data/replay.py) and plain-text rows: the replay share of every batch and of the epoch,
the replay stream laid into rows, and the encoding of LLaMA-Factory's `columns: {prompt: text}` rows."""

import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from jaxsft.config import ConfigError
from jaxsft.config_load import build_config
from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets
from jaxsft.data.replay import ReplayPlan, replay_tokens
from jaxsft.data.sources import resolve

REPO = Path(__file__).resolve().parents[2]
DATA = str(REPO / "examples" / "data")
TINY = str(REPO / "examples" / "tiny-llama")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TINY)


def _data(tokenizer, **overrides):
    args = DataArgs(**{"dataset": "identity", "dataset_dir": DATA, "template": "llama3", "cutoff_len": 128,
                       "packing": True, "data_cache_dir": None, "replay_dataset": "general_replay", **overrides})
    return build_datasets(args, tokenizer)


@pytest.mark.parametrize("cutoff_len, ratio", [(256, 0.1), (256, 0.3), (128, 0.3), (128, 0.5)])
def test_replay_share_of_tokens_held_per_batch_and_over_the_epoch(tokenizer, cutoff_len, ratio):
    data = _data(tokenizer, replay_ratio=ratio, cutoff_len=cutoff_len)
    # at 128 tokens, examples longer than the rows' SFT share get rows of their own with less replay; the
    # rows after them make the shortfall up, so the epoch's share holds and a batch's may not
    every_batch = max(data.lengths) <= data.sft_capacity
    assert every_batch == (cutoff_len == 256)
    sft_tokens, replay_tokens_seen = 0, 0
    batches = list(data.train_iterator(4, seed=3, num_epochs=1))
    for batch in batches:
        real = batch["segment_ids"] > 0
        replay = (batch["replay"] == 1) & real
        assert not ((batch["replay"] == 1) & ~real).any()
        if every_batch:
            assert abs(replay.sum() / real.sum() - ratio) < 0.02, (ratio, replay.sum(), real.sum())
        sft_tokens += int((real & ~replay).sum())
        replay_tokens_seen += int(replay.sum())
    assert abs(replay_tokens_seen / (sft_tokens + replay_tokens_seen) - ratio) < 0.02
    # every SFT example of the epoch is there once (the last batch filled up with empty rows): replay takes
    # room, it does not drop examples
    assert sft_tokens == sum(len(ids) for ids, _ in data.train)


def test_replay_rows_continue_one_shuffled_stream_and_learn_its_labels(tokenizer):
    data = _data(tokenizer, replay_ratio=0.25)
    batches = list(data.train_iterator(2, seed=1, num_epochs=1))
    pieces = []  # (input ids, targets) of each replay segment, in row order
    for batch in batches:
        for r in range(batch["input_ids"].shape[0]):
            seg, rep = batch["segment_ids"][r], batch["replay"][r]
            for s in np.unique(seg[(rep == 1) & (seg > 0)]):
                at = seg == s
                pieces.append((batch["input_ids"][r][at], batch["targets"][r][at]))
                assert (batch["positions"][r][at] == np.arange(at.sum())).all()
    stream = np.concatenate([p for p, _ in pieces])
    order = np.random.default_rng([1, 0, 1]).permutation(len(data.replay))
    expected = np.concatenate([data.replay[i][0] for i in order])
    expected = np.concatenate([expected] * (len(stream) // len(expected) + 1))[:len(stream)]
    np.testing.assert_array_equal(stream, expected)
    for ids, targets in pieces:  # plain text learns every next token of the piece
        np.testing.assert_array_equal(targets[:-1], ids[1:])
        assert targets[-1] == -100


def test_replay_tokens_carry_the_rounding_and_fit_the_row():
    sft = [120, 37, 1, 60, 50, 20]
    n = replay_tokens(sft, 128, 0.25)
    assert n[0] == 8 and n[1] == 44  # the full row's shortfall (40 - 8) goes to the next row
    assert all(s + r <= 128 for s, r in zip(sft, n))
    assert abs(n.sum() - sum(sft) / 3) < 1
    plan = ReplayPlan([(np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32))], [12, 12], 16, 0.25, 0, 0)
    assert [plan.tokens.tolist(), plan.pieces(0), plan.pieces(1)] == [[4, 4], [(0, 0, 4)], [(0, 4, 5), (0, 0, 3)]]


def test_plain_text_rows_learn_every_token_without_template(tokenizer, tmp_path):
    data = _data(tokenizer, replay_dataset=None, eval_dataset="general_text")
    first = json.loads((REPO / "examples" / "data" / "general_text.jsonl").read_text().splitlines()[0])["text"]
    ids, labels = data.eval[0]
    # llama3's EOS ends a document here (<|end_of_text|>), not the template's end of turn, as in LF
    assert ids.tolist() == tokenizer.encode(first, add_special_tokens=False) + [
        tokenizer.convert_tokens_to_ids("<|end_of_text|>")]
    np.testing.assert_array_equal(ids, labels)
    assert data.stats["eval_examples"] == 40 and data.stats["eval_dropped"] == 0
    # a jsonl file of {"text": ...} rows named directly is plain text too
    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n{"text": ""}\n')
    attr, = resolve(str(tmp_path / "t.jsonl"), DATA)
    assert attr.is_text
    data = _data(tokenizer, replay_dataset=None, eval_dataset=str(tmp_path / "t.jsonl"))
    assert data.stats["eval_dropped_reasons"] == [f"{tmp_path / 't.jsonl'}, row 2, field 'text': empty text"]


@pytest.mark.parametrize("overrides, message", [
    ({"replay_ratio": 0.2}, "replay needs both replay_dataset and replay_ratio > 0 (one of them is unset)"),
    ({"replay_dataset": "general_replay", "replay_ratio": 1.0}, "key 'replay_ratio' must be in [0, 1), got 1.0"),
    ({"replay_dataset": "general_replay", "replay_ratio": 0.2, "packing": False},
     "replay_dataset mixes general text into packed rows: set packing: true"),
])
def test_replay_settings_are_checked(overrides, message):
    base = {"model_name_or_path": TINY, "dataset": "identity", "dataset_dir": DATA, "template": "llama3",
            "packing": True, "output_dir": "/tmp/unused"}
    with pytest.raises(ConfigError) as e:
        build_config({**base, **overrides})
    assert str(e.value) == message


@pytest.mark.parametrize("case", json.loads((REPO / "tests/fixtures/data/lf_pretrain.json").read_text()),
                         ids=lambda c: f"{c['template']}-bos{int(c['add_bos_token'])}-{c['cutoff_len']}")
def test_plain_text_rows_equal_llamafactory_pretraining_encoding(case):
    """LF 0.9.5's PretrainDatasetProcessor (unpacked) on the same rows: tools/make_lf_pretrain_fixture.py."""
    tok = transformers.AutoTokenizer.from_pretrained(str(REPO / case["tokenizer"]),
                                                     add_bos_token=case["add_bos_token"])
    data = _data(tok, replay_dataset=None, eval_dataset="general_text", template=case["template"],
                 cutoff_len=case["cutoff_len"])
    assert [ids.tolist() for ids, _ in data.eval] == case["input_ids"]
    assert all((ids == labels).all() for ids, labels in data.eval)
    assert 0 < data.stats["eval_truncated"] <= sum(len(ids) == case["cutoff_len"] for ids in case["input_ids"])


def test_plain_text_rows_have_nothing_to_predict(tokenizer):
    from jaxsft.data.formats import InvalidExample
    from jaxsft.data.prompts import build_prompts

    args = DataArgs(eval_dataset="general_text", dataset_dir=DATA, template="llama3", data_cache_dir=None)
    with pytest.raises(InvalidExample, match=r"general_text.jsonl, row 1, field '<row>': a plain-text row \(a prompt column and "
                                             r"no response\) has no answer to predict"):
        build_prompts(args, tokenizer)
