"""Write LLaMA-Factory's own predict encodings (prompt ids, label ids) as a test fixture (run in an LF venv).

    cd /tmp && /work/lfvenv/bin/python /work/main/tools/make_lf_prompt_fixtures.py

Runs LF 0.9.5's whole `get_dataset` with `predict_with_generate: true` (the eval split goes through
`UnsupervisedDatasetProcessor`) with the committed test tokenizer, and stores every eval example in
tests/fixtures/data/lf_prompts.json.gz. tests/data/test_prompts.py asserts jaxsft's prompts are the same.
"""

import copy
import gzip
import json
import tempfile
from pathlib import Path

import llamafactory
from llamafactory.data.loader import get_dataset
from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments, ModelArguments
from transformers import AutoTokenizer, Seq2SeqTrainingArguments

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / ".." / "shared" / "data" / "llamafactory"
TOKENIZER = REPO / "tests" / "fixtures" / "data" / "tokenizer"
PRISTINE = copy.deepcopy(TEMPLATES)
CONFIGS = [
    dict(template="llama3", dataset="identity", val_size=0.1, cutoff_len=256),
    dict(template="qwen", dataset="identity,alpaca_en_demo", val_size=12, max_samples=40, cutoff_len=64),
    dict(template="qwen3", eval_dataset="glaive_toolcall_en_demo", max_samples=12, cutoff_len=200),
    dict(template="qwen3", eval_dataset="glaive_toolcall_en_demo", max_samples=6, cutoff_len=512,
         enable_thinking=False),
    dict(template="qwen3", eval_dataset="glaive_toolcall_en_demo", max_samples=6, cutoff_len=512,
         preserve_thinking=True),
    dict(template="breeze", eval_dataset="alpaca_en_demo", max_samples=8, cutoff_len=48),
    dict(template="mistral", eval_dataset="glaive_toolcall_en_demo", max_samples=8, cutoff_len=512),
    dict(template="alpaca", eval_dataset="alpaca_en_demo", max_samples=8, cutoff_len=512,
         default_system="You are terse."),
]


def main() -> None:
    fixtures = []
    for cfg in CONFIGS:
        TEMPLATES.update(copy.deepcopy(PRISTINE))
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
        data_args = DataArguments(dataset_dir=str(DATA_DIR), **cfg)
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        with tempfile.TemporaryDirectory() as tmp:
            training_args = Seq2SeqTrainingArguments(output_dir=tmp, seed=42, report_to="none",
                                                     predict_with_generate=True, do_predict=True)
            model_args = ModelArguments(model_name_or_path=str(TOKENIZER))
            module = get_dataset(template, model_args, data_args, training_args, "sft", tokenizer)
        evals = module["eval_dataset"]
        fixtures.append({"config": cfg, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                         "input_ids": [list(x) for x in evals["input_ids"]],
                         "labels": [list(x) for x in evals["labels"]]})
        print(cfg, len(evals))
    with gzip.open(REPO / "tests" / "fixtures" / "data" / "lf_prompts.json.gz", "wt") as f:
        json.dump({"meta": {"llamafactory": llamafactory.__version__}, "fixtures": fixtures}, f,
                  separators=(",", ":"))


if __name__ == "__main__":
    main()
