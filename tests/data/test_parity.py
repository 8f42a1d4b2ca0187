"""jaxsft's encodings equal LLaMA-Factory's, token for token (fixtures written by tools/make_lf_fixtures.py)."""

import gzip
import json
from pathlib import Path

import pytest

from jaxsft.data import tool_format
from jaxsft.data.formats import InvalidExample, to_conversation
from jaxsft.data.sources import load_rows, resolve
from jaxsft.data.supervised import encode_supervised
from jaxsft.data.templates import get_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
with gzip.open(FIXTURES / "lf_encodings.json.gz", "rt") as _f:
    LF = json.load(_f)
CASES = [fx for fx in LF["fixtures"] if "examples" in fx]


def test_fixtures_cover_the_matrix():
    assert LF["meta"]["llamafactory"].startswith("0.9.")
    templates = {fx["template"] for fx in CASES}
    assert {"llama3", "qwen", "qwen3", "chatml", "mistral", "alpaca", "default", "breeze", "gemma", "gemma2", "gemma3",
            "phi", "phi4"} <= templates
    assert not [fx for fx in LF["fixtures"] if "error" in fx]


@pytest.mark.parametrize("fx", CASES, ids=lambda fx: f"{fx['template']}-{fx['dataset']}-{fx['variant']}")
def test_same_ids_and_labels_as_llamafactory(fx, data_dir, new_tokenizer, monkeypatch):
    monkeypatch.setattr(tool_format, "today", lambda: LF["meta"]["fixed_date"])
    opts = fx["options"]
    tokenizer = new_tokenizer()
    template = get_template(fx["template"], tokenizer, default_system=opts.get("default_system"),
                            enable_thinking=opts.get("enable_thinking", True),
                            train_on_prompt=opts.get("train_on_prompt", False))
    assert tokenizer.eos_token == fx["eos_token"] and tokenizer.pad_token == fx["pad_token"]
    attr = resolve(fx["dataset"], str(data_dir))[0]
    rows = load_rows(attr)
    for expected in fx["examples"]:
        i = expected["row"]
        try:
            conversation = to_conversation(rows[i], attr, attr.path, i)
        except InvalidExample as e:
            assert expected.get("dropped"), f"row {i} dropped by jaxsft ({e}) but kept by LF"
            continue
        assert not expected.get("dropped"), f"row {i} kept by jaxsft but dropped by LF"
        ids, labels = encode_supervised(conversation, tokenizer, template, opts["cutoff_len"],
                                        opts.get("train_on_prompt", False), opts.get("mask_history", False))
        assert ids == expected["input_ids"], f"row {i}: input_ids differ"
        assert labels == expected["labels"], f"row {i}: labels differ"
