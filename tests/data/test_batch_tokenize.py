"""The batched hot path (render a chunk, one tokenizer call, assemble) gives LLaMA-Factory's ids and labels for
every fixture: every template, tool calls, mask_history, train_on_prompt, truncation."""

import gzip
import json
import pickle
from pathlib import Path

import pytest

from jaxsft.data import tool_format
from jaxsft.data.args import DataArgs
from jaxsft.data.batch_tokenize import TextTokenizer, encode_texts, prefetch
from jaxsft.data.encode import encode_list, make_template, text_tokenizer
from jaxsft.data.sources import load_rows, resolve

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
with gzip.open(FIXTURES / "lf_encodings.json.gz", "rt") as _f:
    LF = json.load(_f)
CASES = [fx for fx in LF["fixtures"] if "examples" in fx]


@pytest.mark.parametrize("fx", CASES, ids=lambda fx: f"{fx['template']}-{fx['dataset']}-{fx['variant']}")
def test_batched_encoding_equals_llamafactory(fx, data_dir, new_tokenizer, monkeypatch):
    monkeypatch.setattr(tool_format, "today", lambda: LF["meta"]["fixed_date"])
    opts = fx["options"]
    args = DataArgs(template=fx["template"], cutoff_len=opts["cutoff_len"], default_system=opts.get("default_system"),
                    enable_thinking=opts.get("enable_thinking", True),
                    train_on_prompt=opts.get("train_on_prompt", False), mask_history=opts.get("mask_history", False),
                    skip_invalid_examples=True)
    tokenizer = new_tokenizer()
    template = make_template(args, tokenizer)
    attr = resolve(fx["dataset"], str(data_dir))[0]
    rows = load_rows(attr)
    kept = [e for e in fx["examples"] if not e.get("dropped")]
    examples, counts = encode_list([(attr, e["row"], rows[e["row"]]) for e in kept], template, tokenizer, args)
    learned = [e for e in kept if any(label != -100 for label in e["labels"][1:])]  # the rest are dropped
    assert counts.rows == len(kept) and len(examples) == len(learned)
    for (ids, labels), expected in zip(examples, learned):
        assert ids.tolist() == expected["input_ids"], f"row {expected['row']}: input_ids differ"
        assert labels.tolist() == expected["labels"], f"row {expected['row']}: labels differ"


def test_prefetched_tokenizer_answers_from_one_batched_call(new_tokenizer):
    tokenizer = new_tokenizer()
    texts = ["Hello world", "<|im_start|>user\nhi<|im_end|>", "", "  spaces  "]
    assert encode_texts(tokenizer, texts) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    calls = []

    def encode(item, tok):
        calls.append(tok)
        return [tok.encode(t, add_special_tokens=False) for t in item]

    fast = prefetch(tokenizer, [texts[:2], texts[2:]], encode)
    assert sorted(fast._ids) == sorted(texts)  # every text asked for was encoded up front
    assert encode(texts, fast) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_text_tokenizer_is_the_rust_core_with_the_same_ids(new_tokenizer):
    tokenizer = new_tokenizer()
    fast = TextTokenizer.of(tokenizer)
    assert fast is not None
    texts = ["Hello world", "<|im_start|>user\nhi<|im_end|>", "", "  spaces  ", "héllo 你好 🙂\n\n", "x" * 5000]
    assert fast.encode_batch(texts) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert (fast.bos_token_id, fast.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert pickle.loads(pickle.dumps(fast)).encode_batch(texts) == fast.encode_batch(texts)


def test_text_tokenizer_refuses_a_tokenizer_that_encodes_in_python(new_tokenizer):
    tokenizer = new_tokenizer()

    class Lower(type(tokenizer)):  # a tokenizer class with its own encode: the Rust core alone would differ
        def encode(self, text, *a, **k):
            return super().encode(text.lower(), *a, **k)

    tokenizer.__class__ = Lower
    assert TextTokenizer.of(tokenizer) is None
    template = make_template(DataArgs(template="qwen"), tokenizer)
    assert text_tokenizer(tokenizer, template) is tokenizer  # encode_rows then uses the tokenizer itself
