"""load_tokenizer: the plain fast tokenizer is loaded without AutoTokenizer (whose config classes import torch),
and is the tokenizer AutoTokenizer gives; anything else still goes through AutoTokenizer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jaxsft.config_load import load_config
from jaxsft.runtime import PLAIN_TOKENIZER_CLASSES, PLAIN_TOKENIZER_MODEL_TYPES, load_tokenizer, plain_fast_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny-llama"
TEXTS = ["Hello world", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "héllo 你好 🙂\n\n  x"]


def _model_dir(tmp_path: Path, tokenizer_class: str, model_type: str) -> Path:
    d = tmp_path / f"{tokenizer_class}-{model_type}"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(TINY / name, d / name)
    for name, key, value in (("tokenizer_config.json", "tokenizer_class", tokenizer_class),
                             ("config.json", "model_type", model_type)):
        values = json.loads((d / name).read_text())
        values[key] = value
        (d / name).write_text(json.dumps(values))
    return d


@pytest.mark.parametrize("tokenizer_class", PLAIN_TOKENIZER_CLASSES)
@pytest.mark.parametrize("model_type", PLAIN_TOKENIZER_MODEL_TYPES)
def test_plain_tokenizer_is_what_autotokenizer_loads(tmp_path, tokenizer_class, model_type):
    d = _model_dir(tmp_path, tokenizer_class, model_type)
    assert plain_fast_tokenizer(d)
    ours = load_tokenizer(load_config(None, [f"model_name_or_path={d}"]))
    auto = AutoTokenizer.from_pretrained(str(d))
    assert type(ours) is type(auto)
    assert ours.all_special_tokens == auto.all_special_tokens and ours.get_vocab() == auto.get_vocab()
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (auto.bos_token_id, auto.eos_token_id,
                                                                         auto.pad_token_id)
    assert ours.chat_template == auto.chat_template
    for text in TEXTS:
        assert ours.encode(text) == auto.encode(text)
        assert ours.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)


def test_other_tokenizers_go_through_autotokenizer(tmp_path):
    assert not plain_fast_tokenizer(_model_dir(tmp_path, "LlamaTokenizer", "llama"))  # a model-specific class
    assert not plain_fast_tokenizer(_model_dir(tmp_path, "PreTrainedTokenizerFast", "mistral"))  # Mistral backend
    assert not plain_fast_tokenizer(_model_dir(tmp_path, "PreTrainedTokenizerFast", "qwen2"))  # Qwen2Tokenizer
    d = _model_dir(tmp_path, "PreTrainedTokenizerFast", "phi3")
    values = json.loads((d / "tokenizer_config.json").read_text())
    values["auto_map"] = {"AutoTokenizer": ["x.Tok", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(values))
    assert not plain_fast_tokenizer(d)  # custom code


def test_loading_the_tokenizer_does_not_import_torch():
    code = ("import sys; from jaxsft.config_load import load_config; from jaxsft.runtime import load_tokenizer; "
            f"load_tokenizer(load_config(None, ['model_name_or_path={TINY}'])); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip().splitlines()[-1] == "False"
