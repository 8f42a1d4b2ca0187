"""jaxsft.metrics against numbers that LLaMA-Factory's own code produced.

The fixture is written by tools/make_metric_fixtures.py run in the LLaMA-Factory venv; nothing here
computes an expected value with jaxsft code.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxsft.metrics import (
    IGNORE_INDEX,
    decode_for_similarity,
    mean_accuracy,
    rouge_bleu,
    similarity_scores,
    token_accuracy_per_example,
)

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "metrics_expected.json").read_text(encoding="utf-8"))
SIM = EXPECTED["similarity"]
PREDICTIONS = [p["prediction"] for p in SIM["pairs"]]
LABELS = [p["label"] for p in SIM["pairs"]]


def assert_scores_close(got: dict, want: dict) -> None:
    assert set(got) == set(want) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key


@pytest.mark.parametrize("i", range(len(SIM["pairs"])), ids=[repr(p["prediction"])[:20] for p in SIM["pairs"]])
def test_similarity_per_example_matches_llamafactory(i):
    assert_scores_close(similarity_scores(PREDICTIONS[i], LABELS[i]), SIM["per_example"][i])


def test_rouge_bleu_mean_matches_llamafactory():
    assert_scores_close(rouge_bleu(PREDICTIONS, LABELS), SIM["overall"])


def test_decode_for_similarity_drops_ignore_pad_and_eos_like_llamafactory():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(FIXTURES / "byte_tokenizer" / "tokenizer.json"), pad_token="<pad>", eos_token="</s>"
    )
    preds_BT = np.array(SIM["prediction_ids"])
    labels_BT = np.array(SIM["label_ids"])
    assert (preds_BT == IGNORE_INDEX).any() and (labels_BT == IGNORE_INDEX).any()
    assert decode_for_similarity(preds_BT, tokenizer) == PREDICTIONS
    assert decode_for_similarity(labels_BT, tokenizer) == LABELS
    # End to end from ids, as LF's ComputeSimilarity does it.
    got = rouge_bleu(decode_for_similarity(preds_BT, tokenizer), decode_for_similarity(labels_BT, tokenizer))
    assert_scores_close(got, SIM["overall"])


def test_rouge_bleu_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one label per prediction"):
        rouge_bleu(["a", "b"], ["a"])


def test_rouge_bleu_of_nothing_is_nan_like_llamafactory():
    assert all(math.isnan(v) for v in rouge_bleu([], []).values())


def shifted(labels_BT: np.ndarray) -> np.ndarray:
    """LF labels (label i is token i) -> jaxsft targets (target i is label i+1), per docs/internals.md."""
    targets_BT = np.full_like(labels_BT, IGNORE_INDEX)
    targets_BT[:, :-1] = labels_BT[:, 1:]
    return targets_BT


def nan_or(x):
    return math.nan if x is None else x


@pytest.mark.parametrize("case", EXPECTED["accuracy"], ids=[c["name"] for c in EXPECTED["accuracy"]])
def test_token_accuracy_matches_llamafactory(case):
    logits_BTV = np.array(case["logits"], dtype=np.float32)
    labels_BT = np.array(case["labels"], dtype=np.int64)
    per_example = token_accuracy_per_example(np.argmax(logits_BTV, axis=-1), shifted(labels_BT))
    want = np.array([nan_or(x) for x in case["per_example"]])
    np.testing.assert_allclose(per_example, want, atol=1e-12, equal_nan=True)
    got = mean_accuracy(per_example)
    if case["overall"] is None:
        assert math.isnan(got)  # LF: one example without labels makes eval_accuracy NaN
    else:
        assert got == pytest.approx(case["overall"], abs=1e-12)


def test_token_accuracy_one_row_and_shape_errors():
    preds_T = np.array([1, 2, 3, 4])
    targets_T = np.array([1, -100, 0, 4])
    assert float(token_accuracy_per_example(preds_T, targets_T)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one shape"):
        token_accuracy_per_example(np.zeros((2, 4, 5)), np.zeros((2, 4), dtype=int))
    assert math.isnan(mean_accuracy([]))
