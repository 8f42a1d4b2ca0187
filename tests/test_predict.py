"""The predict stage end to end on the tiny example model: LF's files and fields, and predictions equal to
transformers' greedy `generate` on the same prompt ids (with the base model, and after training)."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from lf_reference import lf_stop_ids

from jaxsft.config_load import build_config
from jaxsft.data.args import DataArgs
from jaxsft.data.prompts import build_prompts
from jaxsft.main import cli
from jaxsft.runtime import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny-llama")
MAX_NEW = 12
PREDICT = {
    "model_name_or_path": TINY, "dataset": "identity", "dataset_dir": str(REPO / "examples" / "data"),
    "template": "llama3", "cutoff_len": 256, "val_size": 0.1, "do_predict": True, "predict_with_generate": True,
    "do_sample": False, "max_new_tokens": MAX_NEW, "per_device_eval_batch_size": 2, "finetuning_type": "full",
    "seed": 7, "report_to": "none",
}


def _hf_greedy(model, cfg) -> tuple[list[str], list[str]]:
    """transformers greedy generate on each prompt as LF's predict would decode it: (predicts, labels)."""
    tokenizer = load_tokenizer(cfg)
    prompts, _, _ = build_prompts(DataArgs.from_config(cfg), tokenizer)
    stop = [i for i in lf_stop_ids(tokenizer) if i < model.config.vocab_size]
    predicts = []
    for ids, _ in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids.tolist()]), max_new_tokens=MAX_NEW, do_sample=False,
                                 num_beams=1, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        predicts.append(tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
    return predicts, [tokenizer.decode(label.tolist(), skip_special_tokens=True) for _, label in prompts]


def _read(out_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (out_dir / "generated_predictions.jsonl").read_text("utf-8").splitlines()]
    return records, json.loads((out_dir / "predict_results.json").read_text())


def _args(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def base_greedy(tmp_path_factory):
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    return _hf_greedy(model, build_config({**PREDICT, "output_dir": str(tmp_path_factory.mktemp("hf"))}))


def test_cli_predict_writes_lf_files_and_matches_transformers_greedy(tmp_path, base_greedy):
    out = tmp_path / "predict"
    assert cli(_args({**PREDICT, "output_dir": out})) == 0
    records, metrics = _read(out)
    assert len(records) == 10  # val_size 0.1 of 91 rows, as LF's train_test_split
    assert all(list(r) == ["prompt", "predict", "label"] for r in records)
    assert records[0]["prompt"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert records[0]["prompt"].endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    raw = (out / "generated_predictions.jsonl").read_text("utf-8")
    assert "您" in raw or "我" in raw  # ensure_ascii=False: Chinese labels are written as is

    predicts, labels = base_greedy
    assert [r["predict"] for r in records] == predicts
    assert [r["label"] for r in records] == labels
    assert len(set(predicts)) > 1 and all(predicts)  # not degenerate

    keys = ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4")
    assert all(0 <= metrics[k] <= 100 for k in keys)
    assert metrics["predict_samples_per_second"] > 0 and metrics["predict_runtime"] > 0
    assert set(keys) <= set(json.loads((out / "all_results.json").read_text()))


def test_predict_and_export_after_train_use_the_trained_params_in_memory(tmp_path, base_greedy):
    """No checkpoint is saved (save_strategy: no): predict and export still get the trained params, handed
    over in memory; transformers on the exported model generates what predict wrote."""
    out, export = tmp_path / "train_predict", tmp_path / "export"
    train = {"do_train": True, "max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
             "packing": True, "logging_steps": 1, "save_strategy": "'no'", "remat_policy": "none",
             "export_dir": export}
    assert cli(_args({**PREDICT, **train, "output_dir": out})) == 0
    records, _ = _read(out)
    assert (out / "trainer_log.jsonl").read_text().strip()  # predict did not truncate training's log
    assert not list(out.glob("checkpoint_*"))  # nothing to re-read: the params came in memory

    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    predicts, _ = _hf_greedy(model, build_config({**PREDICT, "output_dir": str(out)}))
    assert [r["predict"] for r in records] == predicts
    assert predicts != base_greedy[0]  # training changed the answers


def test_predict_without_eval_data_is_a_one_line_error(tmp_path, capsys):
    assert cli(_args({**PREDICT, "output_dir": tmp_path, "val_size": 0})) == 2
    assert "set eval_dataset, or val_size with dataset" in capsys.readouterr().err
