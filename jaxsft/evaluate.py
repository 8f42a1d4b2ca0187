"""Evaluation: token-weighted eval_loss and LLaMA-Factory's per-example eval_accuracy.

Packed or not, every eval example is scored once; the per-token outputs of the jitted eval step are
grouped per example (row, segment) on the host, so packed and unpacked eval give the same numbers.
When the eval data's answers carry loss weights (`weights` in the batches), eval_loss is the training
objective, `sum(w * ce) / sum(w)`, and each example's accuracy is `sum(w * correct) / sum(w)` over its
label tokens (then the mean over examples, as LF does); `eval_label_tokens` stays a count of tokens.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import jax
import numpy as np

from jaxsft.errors import InputError
from jaxsft.runtime import host_array
from jaxsft.sharding import global_batch


def example_sums(out: dict[str, np.ndarray], segment_ids: np.ndarray, weights: np.ndarray | None = None
                 ) -> tuple[float, float, list[float], float]:
    """(loss sum, label tokens, per-example accuracies, loss denominator) of one eval batch; with per-token
    `weights`, the loss sum and accuracies are weighted and the denominator is the sum of the weights (else
    the label tokens)."""
    loss, valid, correct = out["loss"], out["valid"], out["correct"]
    w = valid.astype(np.float64) if weights is None else np.where(valid, weights, 0.0).astype(np.float64)
    accuracies = []
    for r in range(segment_ids.shape[0]):
        segs = segment_ids[r]
        n_segments = int(segs.max())
        if n_segments == 0:
            continue  # an all-padding filler row
        counts = np.bincount(segs, weights=w[r], minlength=n_segments + 1)[1:]
        hits = np.bincount(segs, weights=w[r] * correct[r], minlength=n_segments + 1)[1:]
        # LF's compute_accuracy: the mean over label positions of each example, then over examples.
        accuracies.extend((hits[counts > 0] / counts[counts > 0]).tolist())
    loss_sum = loss[valid].sum() if weights is None else (w * loss)[valid].sum()
    return float(loss_sum), float(valid.sum()), accuracies, float(w.sum())


def evaluate(eval_step: Callable, trainable, frozen, batches: Iterable[dict[str, np.ndarray]], mesh,
             prefix: str = "eval") -> dict[str, float]:
    loss_sum, tokens, accuracies, denominator = 0.0, 0.0, [], 0.0
    for local in batches:
        batch = global_batch(local, mesh)
        out = {k: host_array(v) for k, v in eval_step(trainable, frozen, batch).items()}
        segments = host_array(batch["segment_ids"])  # all processes' rows, in the order of `out`
        weights = host_array(batch["weights"]) if "weights" in batch else None
        ls, n, acc, d = example_sums(out, segments, weights)
        loss_sum, tokens, denominator = loss_sum + ls, tokens + n, denominator + d
        accuracies.extend(acc)
    if tokens == 0:
        raise InputError("the evaluation data has no label tokens (every target is masked); check cutoff_len "
                         "and train_on_prompt/mask_history, or the eval dataset's response column")
    return {f"{prefix}_loss": loss_sum / denominator, f"{prefix}_accuracy": float(np.mean(accuracies)),
            f"{prefix}_examples": len(accuracies), f"{prefix}_label_tokens": int(tokens)}


def jit_eval_step(eval_step: Callable, model, mesh) -> Callable:
    t_shard, f_shard = model.shardings(mesh)
    return jax.jit(eval_step, in_shardings=(t_shard, f_shard, None))


def run_evaluation(cfg, trained=None) -> dict[str, float]:
    """The `do_eval` stage: the eval split only (no training data is read), scored with the model trained in
    this run (`trained`), else `model_name_or_path` (+ `adapter_name_or_path`) or the jaxsft checkpoint
    `resume_from_checkpoint` names."""
    from jaxsft.resume import resume_target
    from jaxsft.data.args import DataArgs
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.run_logging import save_metrics
    from jaxsft.runtime import (build_mesh, check_token_ids, init_distributed, is_main_process, load_model_for,
                                load_tokenizer, rows_per_process)
    from jaxsft.step import make_eval_step

    init_distributed(cfg)
    checkpoint = None if trained is not None else resume_target(cfg)
    mesh = trained.mesh if trained is not None else build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    data = build_datasets(DataArgs.from_config(cfg), tokenizer, train=False, process_index=jax.process_index(),
                          process_count=jax.process_count())
    if not data.eval:
        if str((getattr(data, "stats", None) or {}).get("source", "")).startswith("tokenized_path"):
            raise InputError(f"do_eval: tokenized_path {cfg.tokenized_path} holds no eval split (it was saved by a "
                             f"run without eval_dataset or val_size), and it replaces the datasets; remove "
                             f"tokenized_path to evaluate eval_dataset")
        raise InputError("do_eval: no evaluation examples left (every row of the evaluation data was dropped; "
                         "see the warning above)")
    model = load_model_for(cfg, mesh, trained, checkpoint)
    check_token_ids({"eval": data.eval}, model.config.vocab_size, cfg.model_name_or_path)
    step = jit_eval_step(make_eval_step(model.runner), model, mesh)
    from jaxsft.data.packing import length_buckets
    buckets = length_buckets(cfg.cutoff_len) if cfg.length_buckets else None
    metrics = evaluate(step, model.trainable, model.frozen,
                       data.eval_batches(rows_per_process(cfg, mesh, cfg.per_device_eval_batch_size), buckets), mesh)
    if is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_metrics(cfg.output_dir, "eval", metrics)
    return metrics
