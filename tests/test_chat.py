"""tools/chat.py through a pipe: multi-turn history, `clear`, `exit`, and streamed answers equal to
transformers' greedy generate on the same prompts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from lf_reference import lf_stop_ids

from jaxsft.config_load import load_config
from jaxsft.data.formats import Conversation, Message
from jaxsft.data.prompts import encode_oneturn
from jaxsft.data.templates import get_template
from jaxsft.runtime import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart_predict.yaml"
MAX_NEW = 10


def _hf_answer(model, tokenizer, template, history: list[Message]) -> str:
    conversation = Conversation("", "", history + [Message("assistant", "")])
    prompt, _ = encode_oneturn(conversation, tokenizer, template)
    stop = [i for i in lf_stop_ids(tokenizer) if 0 <= i < model.config.vocab_size]  # LF's eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                             num_beams=1, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)


def test_chat_streams_greedy_answers_with_history_clear_and_exit():
    lines = ["hi", "Who are you?", "clear", "你好", "exit", "never read"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "tools/chat.py", "--config", str(CONFIG), "do_sample=false", f"max_new_tokens={MAX_NEW}"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "use `clear` to remove the history" in result.stdout
    assert "History has been removed." in result.stdout
    answers = re.findall(r"Assistant: (.*?)\n\nUser: ", result.stdout, flags=re.DOTALL)
    assert len(answers) == 3, result.stdout

    cfg = load_config(str(CONFIG), [f"model_name_or_path={REPO / 'examples' / 'tiny-llama'}"])
    tokenizer = load_tokenizer(cfg)
    template = get_template(cfg.template, tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32).eval()
    first = _hf_answer(model, tokenizer, template, [Message("user", "hi")])
    second = _hf_answer(model, tokenizer, template, [Message("user", "hi"), Message("assistant", first),
                                                     Message("user", "Who are you?")])
    after_clear = _hf_answer(model, tokenizer, template, [Message("user", "你好")])
    assert answers == [first, second, after_clear]
    assert first != second  # the history reached the second prompt
