"""Prompt-only encoding for predict: the same prompt and label ids as LLaMA-Factory 0.9.5's predict data.

The fixture is LF's own `get_dataset` with `predict_with_generate: true` (tools/make_lf_prompt_fixtures.py).
"""

import gzip
import json

import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data.prompts import build_prompts
from jaxsft.errors import ConfigError

with gzip.open(__import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "data"
               / "lf_prompts.json.gz", "rt") as _f:
    LF = json.load(_f)


def test_fixture_is_from_llamafactory():
    assert LF["meta"]["llamafactory"].startswith("0.9.")
    assert len(LF["fixtures"]) >= 8


@pytest.mark.parametrize("fx", LF["fixtures"], ids=lambda fx: "-".join(f"{v}" for v in fx["config"].values()))
def test_same_prompts_and_labels_as_llamafactory(fx, data_dir, tokenizer):
    args = DataArgs(**{"dataset_dir": str(data_dir), "dataset": None, **fx["config"]})
    prompts, counts, _ = build_prompts(args, tokenizer)
    assert (tokenizer.eos_token, tokenizer.pad_token) == (fx["eos_token"], fx["pad_token"])
    assert counts.dropped == 0
    assert [ids.tolist() for ids, _ in prompts] == fx["input_ids"]
    assert [label.tolist() for _, label in prompts] == fx["labels"]


def test_no_eval_data_is_an_error(data_dir, tokenizer):
    with pytest.raises(ConfigError, match="eval_dataset, or val_size"):
        build_prompts(DataArgs(dataset_dir=str(data_dir), dataset="identity", template="llama3"), tokenizer)
