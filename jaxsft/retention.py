"""The forgetting meter: the loss on `retention_dataset` of the model being trained, beside the starting model's.

The starting model's figure (LoRA with its zero delta, or the full/freeze params before the first step) is
computed once and cached under a key of the model (its files, adapter, dtypes) and of the encoded retention
examples: `<data_cache_dir>/../retention/<key>.json` (`output_dir/retention_base.json` when data_cache_dir
is null). A rerun or a resumed run reads it instead of scoring the data again (one process; a multi-process
run scores it every time, so that every process takes part in the same collectives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax

from jaxsft.data.cache import _files_of
from jaxsft.data.packing import Example

logger = logging.getLogger("jaxsft")

# Config keys that change the starting model's numbers (LoRA's zero delta and freezing change none).
_MODEL_KEYS = ("model_name_or_path", "adapter_name_or_path", "create_new_adapter", "pissa_init", "use_dora",
               "param_dtype", "compute_dtype", "quantization_bit")


def base_key(cfg, examples: list[Example]) -> str:
    digest = hashlib.sha256()
    model = {k: getattr(cfg, k, None) for k in _MODEL_KEYS}
    files = [_files_of(Path(p)) for p in (cfg.model_name_or_path, cfg.adapter_name_or_path) if p and Path(p).exists()]
    digest.update(json.dumps({"model": model, "files": files, "packing": bool(cfg.packing or cfg.neat_packing)},
                             sort_keys=True, default=str).encode())
    for ids, labels in examples:
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()[:32]


def _cache_path(cfg, key: str) -> Path:
    if cfg.data_cache_dir:
        return Path(cfg.data_cache_dir).expanduser().parent / "retention" / f"{key}.json"
    return Path(cfg.output_dir) / "retention_base.json"


def base_figures(cfg, examples: list[Example], score: Callable[[], dict[str, Any]], write: bool) -> dict[str, Any]:
    """The starting model's retention metrics: from the cache when the model and data are unchanged (said in
    one line), else `score()`, then cached (by the main process, `write`)."""
    key = base_key(cfg, examples)
    path = _cache_path(cfg, key)
    try:
        # several processes score together (collectives): none may skip it on a hit the others lack
        cached = json.loads(path.read_text()) if path.is_file() and jax.process_count() == 1 else None
    except (OSError, ValueError):
        cached = None
    if cached and cached.get("key") == key:
        logger.info("retention: the starting model's retention_loss %.4f is read from %s (model and retention "
                    "data unchanged)", cached["metrics"]["retention_loss"], path)
        return cached["metrics"]
    metrics = score()
    if write:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "metrics": metrics}))
            tmp.replace(path)
        except OSError as e:
            logger.warning("retention: could not cache the starting model's figure in %s: %s", path, e)
    logger.info("retention: the starting model's retention_loss is %.4f over %d tokens (cached in %s)",
                metrics["retention_loss"], metrics["retention_label_tokens"], path)
    return metrics


def figures(metrics: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """What is logged: the trained model's retention_loss and its change from the start."""
    return {"retention_loss": metrics["retention_loss"],
            "retention_loss_delta": metrics["retention_loss"] - base["retention_loss"]}
