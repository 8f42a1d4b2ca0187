"""The predict stage (`do_predict` + `predict_with_generate`): generate an answer for every eval prompt,
write LLaMA-Factory's `generated_predictions.jsonl` and score it (ROUGE-1/2/L, BLEU-4).

Prompts are encoded as LF 0.9.5's predict encodes them (`jaxsft.data.prompts`), generated greedily
(`do_sample: false`) or sampled, stopping on the tokenizer's EOS and the template's stop words (LF's
`eos_token_id = [eos] + additional special tokens`). After `do_train` in the same run, the params are
the trained ones, handed over in memory; otherwise `model_name_or_path` (+ `adapter_name_or_path`), or
the jaxsft checkpoint `resume_from_checkpoint` names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsft.config import Config, ConfigError
from jaxsft.errors import InputError
from jaxsft.files import write_text_atomically
from jaxsft.generate import Sampling, generate
from jaxsft.metrics import decode_for_similarity, rouge_bleu
from jaxsft.run_logging import save_metrics
from jaxsft.runtime import (DTYPES, Model, Trained, check_token_ids, is_main_process, load_model_for,
                            resolve_attention_impl)

logger = logging.getLogger("jaxsft")


def stop_token_ids(tokenizer) -> list[int]:
    """LF's generation `eos_token_id`: the EOS, then every additional special token (the template's stop words)."""
    extra = getattr(tokenizer, "additional_special_tokens_ids", None)
    if not isinstance(extra, list):  # transformers 5: extra special tokens live elsewhere
        names = [str(t) for t in getattr(tokenizer, "_extra_special_tokens", [])]
        extra = tokenizer.convert_tokens_to_ids(names) if names else []
    ids = [tokenizer.eos_token_id] + [i for i in extra if i is not None and i != -1]
    return list(dict.fromkeys(ids))


def sampling_of(cfg: Config) -> Sampling:
    if not cfg.do_sample:
        return Sampling()
    return Sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def load_for_generation(cfg: Config, mesh, checkpoint: str | Path | None = None) -> Model:
    """The model to generate with: `model_name_or_path` (+ `adapter_name_or_path`), with the params of a jaxsft
    checkpoint (an `output_dir`, latest inside, or one `checkpoint_<step>` dir) when one is named."""
    from jaxsft.checkpoint import find_checkpoint

    return load_model_for(cfg, mesh, None, None if checkpoint is None else find_checkpoint(checkpoint))


def generation_params(model: Model) -> dict:
    """The merged param tree, LoRA adapters folded into their kernels."""
    params = model.params()
    if model.runner.lora_scale is not None:
        from jaxsft.lora import merge_adapters
        params = merge_adapters(params, model.runner.lora_scale)
    return params


def predict(model: Model, tokenizer, prompts: list[tuple[np.ndarray, np.ndarray]], cfg: Config,
            batch_size: int) -> list[list[int]]:
    """Generated ids of every prompt (ending with the stop token when one was produced), in order."""
    params = generation_params(model)
    stop = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = jax.random.key(cfg.seed)
    outputs: list[list[int]] = []
    show = is_main_process() and not cfg.disable_tqdm
    from tqdm.auto import tqdm
    bar = tqdm(total=len(prompts), desc="predict", dynamic_ncols=True, disable=not show)
    for start in range(0, len(prompts), batch_size):
        batch = [ids.tolist() for ids, _ in prompts[start:start + batch_size]]
        rng, step_rng = jax.random.split(rng)
        outputs += generate(params, model.config, batch, max_new_tokens=cfg.max_new_tokens,
                            sampling=sampling_of(cfg), stop_token_ids=stop, rng=step_rng, pad_id=pad_id,
                            padding_side="left", compute_dtype=DTYPES[cfg.compute_dtype],
                            attention_impl=resolve_attention_impl(cfg.attention_impl, decode=True))
        bar.update(len(batch))
    bar.close()
    return outputs


def write_predictions(path: str | Path, tokenizer, prompts: list[tuple[np.ndarray, np.ndarray]],
                      outputs: list[list[int]], skip_special_tokens: bool) -> list[dict[str, str]]:
    """LF's `save_predictions`: prompt decoded with special tokens, predict and label as configured.

    With `skip_special_tokens: false` LF's text also carries the pad tokens of its batch padding (as many
    as the longest row of the batch needs); jaxsft writes each row's own tokens only."""
    records = [{"prompt": tokenizer.decode(ids.tolist(), skip_special_tokens=False),
                "predict": tokenizer.decode(out, skip_special_tokens=skip_special_tokens),
                "label": tokenizer.decode(label.tolist(), skip_special_tokens=skip_special_tokens)}
               for (ids, label), out in zip(prompts, outputs)]
    # Whole or not at all: a kill mid-write must not leave a shorter file that reads as a finished prediction.
    write_text_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return records


def run_prediction(cfg: Config, trained: Trained | None = None) -> dict[str, Any]:
    """Encode the eval prompts, generate, write predictions and `predict_results.json`. The model is the one
    trained in this run (`trained`), else `model_name_or_path` (+ `adapter_name_or_path`) or the jaxsft
    checkpoint `resume_from_checkpoint` names."""
    from jaxsft.resume import resume_target
    from jaxsft.data.args import DataArgs
    from jaxsft.data.prompts import build_prompts
    from jaxsft.runtime import build_mesh, init_distributed, load_tokenizer
    from jaxsft.sharding import data_parallel_size

    if not (cfg.eval_dataset or (cfg.dataset and cfg.val_size > 1e-6)):
        raise ConfigError("do_predict predicts the evaluation data: set eval_dataset, or val_size with dataset")
    init_distributed(cfg)
    checkpoint = None if trained is not None else resume_target(cfg)
    mesh = trained.mesh if trained is not None else build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    prompts, counts, _ = build_prompts(DataArgs.from_config(cfg), tokenizer)
    if not prompts:
        raise InputError("do_predict: no prediction examples left. First reasons: "
                         + "; ".join(counts.reasons or ["(no rows)"]))
    model = load_model_for(cfg, mesh, trained, checkpoint)
    check_token_ids({"predict": prompts}, model.config.vocab_size, cfg.model_name_or_path)
    longest, limit = max(len(ids) for ids, _ in prompts), model.config.max_position_embeddings
    if limit and longest + cfg.max_new_tokens > limit:
        raise ConfigError(f"max_new_tokens: {cfg.max_new_tokens} new tokens after the longest prompt ({longest} tokens) "
                          f"pass the model's max_position_embeddings ({limit}); lower max_new_tokens, or cutoff_len "
                          f"(which bounds the prompts)")
    # Every process generates every prompt (replicated inputs); only process 0 writes.
    batch_size = cfg.per_device_eval_batch_size * data_parallel_size(mesh)
    start = time.perf_counter()
    outputs = predict(model, tokenizer, prompts, cfg, batch_size)
    runtime = time.perf_counter() - start
    predictions = decode_for_similarity_rows(outputs, tokenizer)
    labels = decode_for_similarity_rows([label.tolist() for _, label in prompts], tokenizer)
    metrics = {f"predict_{k}": v for k, v in rouge_bleu(predictions, labels).items()}
    metrics.update(predict_runtime=round(runtime, 4),
                   predict_samples_per_second=round(len(prompts) / runtime, 3),
                   predict_steps_per_second=round(math.ceil(len(prompts) / batch_size) / runtime, 3))
    if is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, "generated_predictions.jsonl")
        write_predictions(path, tokenizer, prompts, outputs, cfg.skip_special_tokens)
        print(f"Saving prediction results to {path}", flush=True)
        save_metrics(cfg.output_dir, "predict", metrics)
    return metrics


def decode_for_similarity_rows(rows: list[list[int]], tokenizer) -> list[str]:
    """`decode_for_similarity` of ragged rows (LF pads them; padding decodes to nothing)."""
    return [decode_for_similarity(np.asarray([row], np.int64), tokenizer)[0] if row else "" for row in rows]
