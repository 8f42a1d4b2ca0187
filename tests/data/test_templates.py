"""Template registry and `template: auto` (the tokenizer's own chat_template)."""

import gzip
import json
from pathlib import Path

import pytest

from jaxsft.data.formats import Conversation, Message, to_conversation
from jaxsft.data.sources import load_rows, resolve
from jaxsft.data.supervised import encode_supervised
from jaxsft.data.templates import TEMPLATES, get_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REQUIRED = {"default", "empty", "alpaca", "vicuna", "zephyr", "chatml", "llama2", "llama3", "mistral", "qwen", "qwen3",
            "qwen3_nothink", "gemma", "deepseek3"}


def test_registry_has_the_required_templates():
    assert REQUIRED <= set(TEMPLATES)


def test_unknown_template_lists_the_known_ones(tokenizer):
    with pytest.raises(ValueError) as e:
        get_template("llama4", tokenizer)
    assert str(e.value).startswith("Unknown template 'llama4'. Known templates: auto, alpaca, breeze, chatml, ")
    assert all(name in str(e.value) for name in REQUIRED)


def test_tokenizer_is_fixed_like_llamafactory(new_tokenizer):
    tok = new_tokenizer()
    get_template("llama3", tok)
    assert (tok.eos_token, tok.pad_token) == ("<|eot_id|>", "<|eot_id|>")
    assert "<|eom_id|>" in tok.all_special_tokens
    tok = new_tokenizer()
    get_template("default", tok)
    assert (tok.eos_token, tok.pad_token) == ("<|end_of_text|>", "<|end_of_text|>")


def test_efficient_eos_rejects_train_on_prompt(tokenizer):
    with pytest.raises(ValueError, match="efficient_eos"):
        get_template("breeze", tokenizer, train_on_prompt=True)


def test_auto_needs_a_chat_template(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="template: auto needs a tokenizer with a chat_template"):
        get_template("auto", tokenizer)


@pytest.mark.parametrize("dataset", ["alpaca_en_demo", "identity"])
def test_auto_with_a_chatml_jinja_matches_llamafactory_qwen3_nothink(dataset, data_dir, new_tokenizer):
    """A plain ChatML jinja template renders what LF's qwen3_nothink template does (no default system)."""
    with gzip.open(FIXTURES / "lf_encodings.json.gz", "rt") as f:
        (fx,) = [x for x in json.load(f)["fixtures"]
                 if (x["template"], x["dataset"], x["variant"]) == ("qwen3_nothink", dataset, "base")]
    tok = new_tokenizer()
    tok.chat_template = CHATML_JINJA
    tok.eos_token = "<|im_end|>"
    template = get_template("auto", tok)
    (attr,) = resolve(dataset, str(data_dir))
    rows = load_rows(attr)
    for expected in fx["examples"]:
        conversation = to_conversation(rows[expected["row"]], attr, attr.path, expected["row"])
        ids, labels = encode_supervised(conversation, tok, template, fx["options"]["cutoff_len"])
        assert ids == expected["input_ids"] and labels == expected["labels"]


def test_auto_multi_turn_boundaries(new_tokenizer):
    tok = new_tokenizer()
    tok.chat_template = CHATML_JINJA
    template = get_template("auto", tok)
    conv = Conversation("Sys", "", [Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
                                    Message("assistant", "d")])
    pairs = template.encode_multiturn(tok, conv.messages, conv.system, conv.tools)
    text = [(tok.decode(s), tok.decode(t)) for s, t in pairs]
    assert text == [("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n",
                     "b<|im_end|>\n"),
                    ("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", "d<|im_end|>\n")]
