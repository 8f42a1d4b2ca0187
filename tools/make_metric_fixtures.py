"""Write tests/fixtures/metrics_expected.json with numbers computed by LLaMA-Factory's own code.

Run with the LLaMA-Factory reference venv (see ../shared/REFERENCE.md), from outside the repo so
the repo is not on sys.path:

    cd /tmp && /work/lfvenv/bin/python /work/main/tools/make_metric_fixtures.py

It calls `llamafactory.train.sft.metric.ComputeSimilarity` on token ids of a byte-level tokenizer
(saved beside the fixture, so decoding round-trips any text exactly) and `ComputeAccuracy` on argmax
ids of fixed random logits, and records LF's per-example and aggregate results.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import llamafactory
import numpy as np
import torch
from llamafactory.extras.ploting import smooth
from llamafactory.train.sft.metric import ComputeAccuracy, ComputeSimilarity, eval_logit_processor
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import EvalPrediction, PreTrainedTokenizerFast

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TOKENIZER_DIR = FIXTURES / "byte_tokenizer"
IGNORE_INDEX = -100

# (prediction, label): Chinese, English, mixed, empty, whitespace, punctuation, identical strings.
PAIRS = [
    ("今天天气很好，我们去公园散步吧。", "今天天气很好，我们去公园散步吧。"),
    ("我喜欢吃苹果和香蕉", "我喜欢吃香蕉"),
    ("The quick brown fox jumps over the lazy dog.", "A quick brown dog jumps over the lazy fox!"),
    ("Hello, world!", "Hello, world!"),
    ("", "这是一个标签。"),
    ("some prediction", ""),
    ("", ""),
    ("   ", "hello there"),
    ("！？。，", "！？。"),
    ("LLaMA-Factory 支持 100+ 种模型。", "LLaMA Factory 支持一百多种模型！"),
    ("我是一个助手。我可以回答问题！你需要什么帮助？", "我是AI助手。我能回答你的问题。"),
    ("Line one.\nLine two.", "Line one.\nLine 2."),
    ("a", "b"),
    ("是", "是"),
]

SMOOTH_INPUT = [2.5, 2.1, 2.3, 1.7, 1.9, 1.2, 1.4, 0.9, 1.1, 0.7, 0.8, 0.5]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per UTF-8 byte plus <pad> and </s>: decode(encode(s)) == s."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def pad_rows(rows: list[list[int]], value: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [value] * (width - len(r)) for r in rows], dtype=np.int64)


def similarity_fixture(tokenizer: PreTrainedTokenizerFast) -> dict:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pred_rows, label_rows = [], []
    for i, (pred, label) in enumerate(PAIRS):
        p = tokenizer.encode(pred, add_special_tokens=False)
        l = tokenizer.encode(label, add_special_tokens=False)
        assert tokenizer.decode(p) == pred and tokenizer.decode(l) == label, (pred, label)
        # generation ends in EOS then pad ids; HF pads labels with -100. Odd rows: -100 in preds too.
        pred_rows.append(p + [eos] + ([pad, pad] if i % 2 == 0 else [IGNORE_INDEX] * 3))
        label_rows.append(l + [eos])
    preds = pad_rows(pred_rows, IGNORE_INDEX)
    labels = pad_rows(label_rows, IGNORE_INDEX)

    metric = ComputeSimilarity(tokenizer=tokenizer)
    per_example = []
    for i in range(len(PAIRS)):
        one = metric(EvalPrediction(predictions=preds[i : i + 1], label_ids=labels[i : i + 1]))
        per_example.append(one)
    overall = ComputeSimilarity(tokenizer=tokenizer)(EvalPrediction(predictions=preds, label_ids=labels))
    return {
        "pairs": [{"prediction": p, "label": l} for p, l in PAIRS],
        "prediction_ids": preds.tolist(),
        "label_ids": labels.tolist(),
        "per_example": per_example,
        "overall": overall,
    }


def accuracy_case(name: str, logits_BTV: np.ndarray, labels_BT: np.ndarray) -> dict:
    """LF: argmax via eval_logit_processor, then ComputeAccuracy on unshifted labels."""
    preds = eval_logit_processor(torch.from_numpy(logits_BTV), torch.from_numpy(labels_BT)).numpy()
    metric = ComputeAccuracy()
    metric(EvalPrediction(predictions=preds, label_ids=labels_BT), compute_result=False)
    per_example = [float(x) for x in metric.score_dict["accuracy"]]
    overall = metric._dump()["accuracy"]

    def nan_to_none(x: float) -> float | None:  # JSON has no NaN
        return None if math.isnan(x) else x

    return {
        "name": name,
        "logits": np.round(logits_BTV, 4).tolist(),
        "labels": labels_BT.tolist(),
        "per_example": [nan_to_none(x) for x in per_example],
        "overall": nan_to_none(overall),
    }


def accuracy_fixture() -> list[dict]:
    rng = np.random.default_rng(0)
    B, T, V = 4, 10, 6
    cases = []

    def rand_logits(b=B, t=T):
        return np.round(rng.normal(size=(b, t, V)), 4).astype(np.float32)

    # prompt (-100) then answer labels, right padding with -100; rows of different answer lengths.
    labels = rng.integers(0, V, size=(B, T))
    for row, (prompt, answer) in enumerate([(3, 5), (1, 9), (6, 2), (4, 4)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, prompt + answer :] = IGNORE_INDEX
    cases.append(accuracy_case("prompt_answer_padding", rand_logits(), labels))

    # logits that mostly predict the next label: high accuracy, not all exactly 1.
    logits = rand_logits()
    for b in range(B):
        for t in range(T - 1):
            if labels[b, t + 1] != IGNORE_INDEX and (b + t) % 3 != 0:
                logits[b, t, labels[b, t + 1]] += 10.0
    cases.append(accuracy_case("mostly_right", logits, labels))

    # every position labelled (train_on_prompt style).
    cases.append(accuracy_case("all_labelled", rand_logits(3, 7), rng.integers(0, V, size=(3, 7))))

    # one row with no labelled position (prompt filled the cutoff): LF's np.mean of empty is NaN.
    labels_nan = rng.integers(0, V, size=(3, 8))
    labels_nan[1, :] = IGNORE_INDEX
    labels_nan[0, :2] = IGNORE_INDEX
    cases.append(accuracy_case("row_without_labels", rand_logits(3, 8), labels_nan))
    return cases


def main() -> None:
    tokenizer = build_byte_tokenizer()
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(TOKENIZER_DIR / "tokenizer.json"))
    fixture = {
        "generated_by": f"llamafactory {llamafactory.__version__} (tools/make_metric_fixtures.py)",
        "similarity": similarity_fixture(tokenizer),
        "accuracy": accuracy_fixture(),
        # LF's loss-plot EMA (extras/ploting.py), checked by tests/test_run_logging.py.
        "plot_smooth": {"values": SMOOTH_INPUT, "smoothed": smooth(SMOOTH_INPUT)},
    }
    out = FIXTURES / "metrics_expected.json"
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    print(json.dumps(fixture["similarity"]["overall"]), [c["overall"] for c in fixture["accuracy"]])


if __name__ == "__main__":
    main()
