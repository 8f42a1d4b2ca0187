"""Evaluation metrics computed exactly as LLaMA-Factory (0.9.5, `train/sft/metric.py`) computes them.

Two families:
- token accuracy during eval (LF's `ComputeAccuracy`): per example, the fraction of labelled
  positions whose argmax prediction equals the label, then the plain mean over examples;
- text similarity for `predict_with_generate` (LF's `ComputeSimilarity`): ROUGE-1/2/L F scores of
  `rouge_chinese` on jieba words, and character BLEU-4 of nltk with smoothing method 3, each x100,
  rounded to 4 decimals per example, then the plain mean over examples.

Everything here is pure (numpy in, numbers out); the eval loop decides what an "example" is.
"""

from __future__ import annotations

import logging

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
SIMILARITY_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


# ----------------------------------------------------------------------------------------------
# Token accuracy
# ----------------------------------------------------------------------------------------------
def token_accuracy_per_example(predictions_BT: np.ndarray, targets_BT: np.ndarray) -> np.ndarray:
    """Accuracy of each row: mean of `predictions == targets` over positions where targets != -100.

    `predictions_BT` are argmax token ids (`argmax(logits_BTV, -1)`), `targets_BT` the already-shifted
    targets of `docs/internals.md` (`targets[:, i]` is what position i must predict), so this is LF's
    `mean(pred[:-1][mask] == label[1:][mask])` without the shift. A 1-D pair is one row.

    A row with no labelled position gets NaN, as LF's `np.mean` of an empty selection does (LF does
    not skip such an example; see `mean_accuracy`). Returns float64 of shape [B] (or a 0-d array).
    """
    predictions_BT = np.asarray(predictions_BT)
    targets_BT = np.asarray(targets_BT)
    if predictions_BT.shape != targets_BT.shape:
        raise ValueError(
            f"token accuracy needs predictions and targets of one shape, got {predictions_BT.shape} "
            f"and {targets_BT.shape}; pass argmax ids (not logits) and the shifted `targets`."
        )
    mask_BT = targets_BT != IGNORE_INDEX
    n_labels_B = mask_BT.sum(axis=-1).astype(np.float64)
    n_correct_B = ((predictions_BT == targets_BT) & mask_BT).sum(axis=-1).astype(np.float64)
    out_B = np.full(n_labels_B.shape, np.nan, dtype=np.float64)
    np.divide(n_correct_B, n_labels_B, out=out_B, where=n_labels_B > 0)
    return out_B


def mean_accuracy(per_example: Sequence[float] | np.ndarray) -> float:
    """LF's `eval_accuracy`: the plain mean of per-example accuracies (not weighted by tokens).

    Matches LF exactly, including its edge cases: one NaN example (no labelled position) makes the
    result NaN, and no examples at all gives NaN. The eval loop should therefore only pass rows that
    hold a real example (drop batch-filler rows that are all padding; LF never sees those).
    """
    values = np.asarray(per_example, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return float("nan")
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------
# Text similarity (predict_with_generate)
# ----------------------------------------------------------------------------------------------
def decode_for_similarity(token_ids_BT: np.ndarray, tokenizer: Any) -> list[str]:
    """Decode generated or label ids the way LF does before scoring.

    -100 becomes the tokenizer's pad id, then `batch_decode(..., skip_special_tokens=True)`, so
    padding and special tokens (EOS, BOS, template specials) vanish from both sides.
    """
    token_ids_BT = np.asarray(token_ids_BT)
    token_ids_BT = np.where(token_ids_BT != IGNORE_INDEX, token_ids_BT, tokenizer.pad_token_id)
    return tokenizer.batch_decode(token_ids_BT.tolist(), skip_special_tokens=True)


def similarity_scores(prediction: str, label: str) -> dict[str, float]:
    """One example's ROUGE-1/2/L (F) and BLEU-4, each x100 and rounded to 4 decimals, as LF does.

    ROUGE is 0 for all three when either side has no words after jieba segmentation (empty or
    whitespace-only text). BLEU-4 is nltk `sentence_bleu` over characters with smoothing method 3.
    """
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter is DEBUG noise for our users

    hypothesis = list(jieba.cut(prediction))
    reference = list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        rouge = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]

    scores = {key: round(value["f"] * 100, 4) for key, value in rouge.items()}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def rouge_bleu(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """LF's `predict_*` similarity metrics: per-example `similarity_scores` averaged over examples.

    Keys `rouge-1, rouge-2, rouge-l, bleu-4` (the caller adds the `predict_`/`eval_` prefix). The
    strings are already decoded (see `decode_for_similarity`). With no examples every value is NaN,
    as LF's `np.mean([])` gives.
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"rouge_bleu needs one label per prediction, got {len(predictions)} predictions and "
            f"{len(labels)} labels."
        )
    per_key: dict[str, list[float]] = {key: [] for key in SIMILARITY_KEYS}
    for prediction, label in zip(predictions, labels):
        for key, value in similarity_scores(prediction, label).items():
            per_key[key].append(value)
    return {key: float(np.mean(values)) if values else float("nan") for key, values in per_key.items()}
