"""Write LLaMA-Factory's own encodings of the demo data as test fixtures (run in an LF venv).

    cd /tmp && /work/lfvenv/bin/python /work/main/tools/make_lf_fixtures.py

Runs LF's converter, template and SupervisedDatasetProcessor (and, for mixing/splitting, its whole
`get_dataset`) on the first rows of each demo dataset with the committed test tokenizer, and stores
input_ids / labels in tests/fixtures/data/lf_*.json.gz. tests/data/test_parity.py asserts jaxsft gives the
same ids token for token. llama3's tool prompt shows today's date: it is pinned to FIXED_DATE here and in
the test.
"""

import copy
import datetime as _dt
import gzip
import hashlib
import json
import random
import sys
import tempfile
import types
from pathlib import Path

import llamafactory
from datasets import load_dataset
from llamafactory.data import tool_utils
from llamafactory.data.converter import get_dataset_converter
from llamafactory.data.parser import get_dataset_list
from llamafactory.data.processor.processor_utils import greedy_knapsack
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / ".." / "shared" / "data" / "llamafactory"
TOKENIZER = REPO / "tests" / "fixtures" / "data" / "tokenizer"
OUT = REPO / "tests" / "fixtures" / "data"
FIXED_DATE = "26 Jul 2024"
# LF's get_template_and_fix_tokenizer writes default_system / enable_thinking into its global registry;
# every config starts from a pristine copy so one config's options do not leak into the next
PRISTINE = copy.deepcopy(TEMPLATES)
ROWS = 24
DATASETS = ["alpaca_en_demo", "identity", "glaive_toolcall_en_demo"]
TEMPLATE_NAMES = ["llama3", "qwen", "qwen3", "chatml", "mistral", "alpaca", "default", "breeze", "gemma", "llama2",
             "qwen3_nothink", "zephyr", "vicuna", "deepseek3", "empty", "gemma2", "gemma3", "phi", "phi4"]
# (name, options): every template on every dataset, plus option variants
VARIANTS = [
    ("base", dict(cutoff_len=512)),
    ("cut64", dict(cutoff_len=64)),
    ("prompt", dict(cutoff_len=256, train_on_prompt=True)),
    ("history", dict(cutoff_len=256, mask_history=True)),
    ("nothink", dict(cutoff_len=256, enable_thinking=False)),
    ("sysprompt", dict(cutoff_len=128, default_system="You are a terse assistant.")),
]


class _FixedDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26)


def _encode_rows(dataset: str, template: str, options: dict) -> dict:
    TEMPLATES.update(copy.deepcopy(PRISTINE))
    data_args = DataArguments(template=template, dataset_dir=str(DATA_DIR), dataset=dataset, **options)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tpl = get_template_and_fix_tokenizer(tokenizer, data_args)
    attr = get_dataset_list([dataset], str(DATA_DIR))[0]
    rows = load_dataset("json", data_files=str(DATA_DIR / attr.dataset_name), split="train")
    rows = rows.select(range(min(ROWS, len(rows))))
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    # gemma3's image plugin insists on a processor even for text; a text-only stand-in (no image ever
    # reaches it: the demo rows hold no image placeholder)
    mm = None if tpl.mm_plugin.image_token is None else types.SimpleNamespace(
        image_processor=object(), boi_token="<start_of_image>", full_image_sequence="<start_of_image>")
    processor = SupervisedDatasetProcessor(template=tpl, tokenizer=tokenizer, processor=mm, data_args=data_args)
    examples = []
    for i, row in enumerate(rows):
        aligned = converter(row)
        batch = {k: [v] for k, v in aligned.items()}
        out = processor.preprocess_dataset(batch)
        if out["input_ids"]:
            examples.append({"row": i, "input_ids": out["input_ids"][0], "labels": out["labels"][0]})
        else:
            examples.append({"row": i, "dropped": True})
    return {"dataset": dataset, "template": template, "options": options, "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token, "examples": examples}


def _digest(ids: list[int]) -> str:
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:12]


def _whole_pipeline() -> list[dict]:
    """LF's get_dataset (load, mix, split, encode) for a few mixing/splitting configs: per-example digests."""
    from llamafactory.data.loader import get_dataset
    from llamafactory.hparams import ModelArguments
    from transformers import Seq2SeqTrainingArguments

    configs = [
        dict(dataset="alpaca_en_demo", val_size=0.1, max_samples=200),
        dict(dataset="identity,alpaca_en_demo", val_size=25, max_samples=100),
        dict(dataset="identity,glaive_toolcall_en_demo", mix_strategy="interleave_under", interleave_probs="0.3,0.7",
             max_samples=60),
        dict(dataset="identity,alpaca_en_demo", mix_strategy="interleave_over", max_samples=40),
    ]
    results = []
    for cfg in configs:
        TEMPLATES.update(copy.deepcopy(PRISTINE))
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
        data_args = DataArguments(template="qwen", dataset_dir=str(DATA_DIR), cutoff_len=256, **cfg)
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        with tempfile.TemporaryDirectory() as tmp:
            training_args = Seq2SeqTrainingArguments(output_dir=tmp, seed=42, report_to="none")
            model_args = ModelArguments(model_name_or_path=str(TOKENIZER))
            module = get_dataset(template, model_args, data_args, training_args, "sft", tokenizer)
        entry = {"config": cfg, "template": "qwen", "cutoff_len": 256, "seed": 42}
        for key in ("train_dataset", "eval_dataset"):
            if module.get(key) is not None:
                entry[key] = [[len(x), _digest(x)] for x in module[key]["input_ids"]]
        results.append(entry)
    return results


def main() -> None:
    tool_utils.datetime = _FixedDatetime  # llama3 tool prompt date
    fixtures = []
    for template in TEMPLATE_NAMES:
        for dataset in DATASETS:
            for variant, options in VARIANTS:
                if variant == "prompt" and template in ("breeze", "gemma2"):
                    continue  # efficient_eos templates reject train_on_prompt
                if variant == "history" and dataset != "glaive_toolcall_en_demo":
                    continue  # single-turn data: same as base
                if variant == "nothink" and template != "qwen3":
                    continue
                if variant == "sysprompt" and dataset != "identity":
                    continue
                fx = _encode_rows(dataset, template, options)
                fx["variant"] = variant
                fixtures.append(fx)
                print(template, dataset, variant, len(fx["examples"]), file=sys.stderr)
    meta = {"llamafactory": llamafactory.__version__, "rows": ROWS, "fixed_date": FIXED_DATE}
    with gzip.open(OUT / "lf_encodings.json.gz", "wt") as f:
        json.dump({"meta": meta, "fixtures": fixtures}, f, separators=(",", ":"))

    # LF's greedy knapsack on 3000 random lengths (many ties), capacity 512
    rng = random.Random(0)
    knap = {"capacity": 512, "lengths": [rng.randint(1, 400) for _ in range(3000)]}
    knap["bins"] = greedy_knapsack(list(knap["lengths"]), knap["capacity"])
    pipeline = _whole_pipeline()
    with gzip.open(OUT / "lf_pipeline.json.gz", "wt") as f:
        json.dump({"meta": meta, "knapsack": knap, "pipeline": pipeline}, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
