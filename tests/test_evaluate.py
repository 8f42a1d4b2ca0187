"""Evaluation numbers equal what transformers computes on the same encoded examples, packed or not."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoTokenizer

from jaxsft.config_load import build_config
from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets
from jaxsft.evaluate import evaluate, jit_eval_step
from jaxsft.runtime import build_mesh, load_model, rows_per_process
from jaxsft.step import make_eval_step

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "llamafactory").resolve()
TOKENIZER = REPO / "tests" / "fixtures" / "data" / "tokenizer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama whose vocab covers the test tokenizer (plus the template's added tokens)."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    model = build_tiny_model("llama", std=0.3)
    model.resize_token_embeddings(2048, mean_resizing=False)
    with torch.no_grad():  # resized rows random too, like every other weight
        torch.manual_seed(1)
        model.get_input_embeddings().weight.copy_(0.3 * torch.randn_like(model.get_input_embeddings().weight))
        model.get_output_embeddings().weight.copy_(0.3 * torch.randn_like(model.get_output_embeddings().weight))
        _favour_common_label(model.eval(), directory)
    model.save_pretrained(directory, safe_serialization=True)
    return model.eval(), directory


def _favour_common_label(model, directory):
    """Point the lm_head row of the most common label token along the mean final hidden state, so argmax
    picks it often and accuracy is far from 0 (a misaligned shift would then show)."""
    for f in TOKENIZER.iterdir():
        shutil.copy(f, directory / f.name)
    data = build_datasets(DataArgs.from_config(_cfg(directory, False)), AutoTokenizer.from_pretrained(str(directory)))
    labels = np.concatenate([labels[labels != -100] for _, labels in data.eval])
    common = int(np.bincount(labels).argmax())
    hidden = [model(input_ids=torch.tensor([ids.tolist()]), output_hidden_states=True).hidden_states[-1][0]
              for ids, _ in data.eval]
    direction = torch.cat(hidden).mean(0)
    model.get_output_embeddings().weight[common] = 20.0 * direction / direction.norm()


def _cfg(directory, packing):
    return build_config({
        "model_name_or_path": str(directory), "dataset": "identity", "dataset_dir": str(DATA_DIR),
        "template": "llama3", "cutoff_len": 256, "val_size": 0.2, "packing": packing, "do_eval": True,
        "per_device_eval_batch_size": 1, "finetuning_type": "full", "output_dir": str(directory / "out"),
    })


def _jaxsft_eval(directory, packing):
    cfg = _cfg(directory, packing)
    data = build_datasets(DataArgs.from_config(cfg), AutoTokenizer.from_pretrained(str(directory)))
    mesh = build_mesh(cfg)
    model = load_model(cfg, mesh)
    step = jit_eval_step(make_eval_step(model.runner), model, mesh)
    rows = rows_per_process(cfg, mesh, cfg.per_device_eval_batch_size)
    return evaluate(step, model.trainable, model.frozen, data.eval_batches(rows), mesh), data


def _hf_eval(model, examples):
    """transformers fp32: token-weighted CE over every label (shifted), and LF's compute_accuracy."""
    loss_sum, tokens, accuracies = 0.0, 0, []
    for ids, labels in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids.tolist()], dtype=torch.long)).logits[0].double()
        shift_logits, shift_labels = logits[:-1], torch.tensor(labels[1:].tolist())
        mask = shift_labels != -100
        loss_sum += torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum").item()
        tokens += int(mask.sum())
        accuracies.append((shift_logits.argmax(-1)[mask] == shift_labels[mask]).double().mean().item())
    return loss_sum / tokens, float(np.mean(accuracies)), tokens


def test_eval_loss_and_accuracy_equal_transformers_packed_or_not(tiny):
    model, directory = tiny
    unpacked, data = _jaxsft_eval(directory, packing=False)
    packed, packed_data = _jaxsft_eval(directory, packing=True)
    assert len(data.eval) == 19 and data.stats["eval_packed_rows"] == 19
    assert packed_data.stats["eval_packed_rows"] < len(packed_data.eval)  # several examples share a row

    hf_loss, hf_accuracy, hf_tokens = _hf_eval(model, data.eval)
    assert unpacked["eval_label_tokens"] == packed["eval_label_tokens"] == hf_tokens
    assert unpacked["eval_examples"] == packed["eval_examples"] == len(data.eval)
    assert unpacked["eval_loss"] == pytest.approx(hf_loss, rel=1e-4)
    assert packed["eval_loss"] == pytest.approx(hf_loss, rel=1e-4)
    assert packed["eval_loss"] == pytest.approx(unpacked["eval_loss"], rel=1e-5)
    assert unpacked["eval_accuracy"] == pytest.approx(hf_accuracy, abs=1e-9)
    assert packed["eval_accuracy"] == pytest.approx(unpacked["eval_accuracy"], abs=1e-9)
    assert 0 < hf_accuracy < 1  # random but not degenerate


def test_weighted_eval_equals_transformers_packed_or_not(tiny):
    """examples/data/weighted_chat (answers marked train: false / weight: w): eval_loss is sum(w * ce) / sum(w)
    and each example's accuracy is weighted alike, as transformers' logits give them, packed or not."""
    from jaxsft.data.packing import weights_of

    model, directory = tiny
    results = {}
    for packing in (False, True):
        cfg = build_config({
            "model_name_or_path": str(directory), "eval_dataset": "weighted_chat",
            "dataset_dir": str(REPO / "examples" / "data"), "template": "llama3", "cutoff_len": 256,
            "packing": packing, "do_eval": True, "per_device_eval_batch_size": 1, "finetuning_type": "full",
            "output_dir": str(directory / "out")})
        data = build_datasets(DataArgs.from_config(cfg), AutoTokenizer.from_pretrained(str(directory)), train=False)
        mesh = build_mesh(cfg)
        loaded = load_model(cfg, mesh)
        step = jit_eval_step(make_eval_step(loaded.runner), loaded, mesh)
        results[packing] = evaluate(step, loaded.trainable, loaded.frozen,
                                    data.eval_batches(rows_per_process(cfg, mesh, 1)), mesh)
    assert sum(getattr(e, "weights", None) is not None for e in data.eval) >= 4
    num = den = 0.0
    accuracies = []
    for example in data.eval:
        ids, labels = example
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids.tolist()], dtype=torch.long)).logits[0].double()
        ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(np.maximum(labels[1:], 0).tolist()),
                                               reduction="none").numpy()
        w = weights_of(example)[1:].astype(np.float64)
        right = logits[:-1].argmax(-1).numpy() == labels[1:]
        num, den = num + float((w * ce).sum()), den + float(w.sum())
        accuracies.append(float((w * right).sum() / w.sum()))
    for packing in (False, True):
        assert results[packing]["eval_loss"] == pytest.approx(num / den, rel=1e-5)
        assert results[packing]["eval_accuracy"] == pytest.approx(float(np.mean(accuracies)), abs=1e-6)
        assert results[packing]["eval_examples"] == len(data.eval)
    plain = sum(float((labels[1:] != -100).sum()) for _, labels in data.eval)
    assert results[False]["eval_label_tokens"] == plain  # a count of tokens, not of weight
