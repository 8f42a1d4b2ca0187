"""Hugging Face exports: a merged model transformers loads as is, or a PEFT LoRA adapter.

Files are written the way `save_pretrained` writes them: `config.json`, `generation_config.json`,
`model.safetensors` or `model-00001-of-0000N.safetensors` shards with `model.safetensors.index.json`,
tokenizer files; `adapter_config.json` + `adapter_model.safetensors` for an adapter.

A kill while exporting never leaves a file that looks finished: each is written under a hidden name and
renamed into place, and the config (what loaders read first) is removed before and written after the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors.numpy import save_file

from jaxsft import lora
from jaxsft.files import write_text_atomically, written_atomically
from jaxsft.lora_variants import pissa_init_weights, pissa_to_lora
from jaxsft.config import Config, ConfigError
from jaxsft.model.config import ModelConfig
from jaxsft.model.hf import (load_hf_config, load_hf_params, other_tower_tensors, params_to_hf_state_dict,
                             resolve_model_path)

logger = logging.getLogger("jaxsft")

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in NP_DTYPES:
        raise ConfigError(f"export_dtype {dtype!r} is not supported; choose one of {', '.join(NP_DTYPES)}")
    return NP_DTYPES[dtype]


def _write_text(path: Path, text: str) -> None:
    write_text_atomically(path, text)


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    with written_atomically(path) as partial:
        save_file(tensors, str(partial), metadata=SAFETENSORS_METADATA)


def _hf_order(name: str) -> tuple[int, int]:
    """Layer-major order like a torch state dict: embeddings, layer 0, layer 1, ..., final norm, lm_head."""
    parts = name.split(".")
    if "layers" in parts[:-2] and parts[parts.index("layers") + 1].isdigit():
        return (1, int(parts[parts.index("layers") + 1]))
    return (0, 0) if "embed_tokens" in name else (2, 0)


def write_safetensors(state: dict[str, np.ndarray], out_dir: Path, shard_size_gb: float,
                      prefix: str = "model") -> list[str]:
    """One file, or shards of at most `shard_size_gb` (10^9 bytes, as HF counts) plus the index, split
    by huggingface_hub's own algorithm. Stale model files from an earlier export are removed first."""
    for old in [*out_dir.glob(f"{prefix}*.safetensors"), out_dir / f"{prefix}.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda x: x.nbytes, filename_pattern=prefix + "{suffix}.safetensors",
        max_shard_size=int(shard_size_gb * 10**9))
    for filename, names in split.filename_to_tensors.items():
        _save_safetensors({n: state[n] for n in names}, out_dir / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        _write_text(out_dir / f"{prefix}.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path, chat_template: str | None = None) -> list[str]:
    """The tokenizer files, each whole or not at all (a LoRA run's output_dir gets them after its adapter)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            with written_atomically(out_dir / name) as partial:
                shutil.copyfile(tokenizer_dir / name, partial)
            copied.append(name)
    if chat_template is not None:
        _write_text(out_dir / "chat_template.jinja", chat_template)
        copied.append("chat_template.jinja")
    return copied


def export_hf(params: dict, model_cfg: ModelConfig, source_model_dir: str | Path, out_dir: str | Path, *,
              dtype: str = "float32", shard_size_gb: float = 5, tokenizer_dir: str | Path | None = None,
              lora_scale: float | None = None, chat_template: str | None = None) -> Path:
    """A standalone Hugging Face model: source config (dtype updated), generation config, weights (LoRA
    merged with `lora_scale`) in `dtype`, sharded at `shard_size_gb`, and the tokenizer files."""
    source, out = resolve_model_path(source_model_dir), Path(out_dir)
    np_dtype = _np_dtype(dtype)
    if lora.has_adapters(params):
        if lora_scale is None:
            raise ValueError("params hold LoRA adapters; pass lora_scale so they can be merged")
        params = lora.merge_adapters(params, lora_scale)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np_dtype), params)
    state = params_to_hf_state_dict(params, model_cfg)
    # A multimodal source (Gemma 3): its vision tower and projector go out as they came in.
    state.update(other_tower_tensors(source, model_cfg, np_dtype))
    state = {name: state[name] for name in sorted(state, key=_hf_order)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # written last: a folder without it is not a model yet
    # An adapter an earlier export left here would be loaded instead of these weights (transformers applies an
    # adapter_config.json it finds to the base model that config names): it goes, config first.
    for stale in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, "adapter_model.bin"):
        (out / stale).unlink(missing_ok=True)

    hf_config = json.loads((source / "config.json").read_text())
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in hf_config] or ["dtype", "torch_dtype"]
    for key in dtype_keys:
        hf_config[key] = dtype
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    files = write_safetensors(state, out, shard_size_gb)
    copied = copy_tokenizer(resolve_model_path(tokenizer_dir) if tokenizer_dir else source, out, chat_template)
    _write_text(out / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    logger.info("exported %d tensors (%s) to %s in %s; tokenizer files: %s", len(state), dtype, out,
                ", ".join(files), ", ".join(copied) or "none")
    return out


def _peft_targets(model_cfg: ModelConfig, targets: list[str]) -> list[str] | str:
    """PEFT's target_modules: the module names, or, in a multimodal model, a regex on the text tower's
    layers (the vision tower has modules of the same names, as LLaMA-Factory also guards against)."""
    if model_cfg.peft_prefix == "model.":
        return sorted(targets)
    return rf"{re.escape(model_cfg.peft_prefix)}layers\.\d+\.\w+\.({'|'.join(sorted(targets))})"


def export_peft_adapter(params: dict, model_cfg: ModelConfig, out_dir: str | Path, *, rank: int, alpha: float,
                        targets: list[str], use_rslora: bool = False, base_model_name_or_path: str | None = None,
                        modules_to_save: list[str] | tuple = (), lora_dropout: float = 0.0,
                        dtype: str | None = None, init_lora_weights: bool | str = True) -> Path:
    """A PEFT LoRA adapter `PeftModel.from_pretrained(base, out_dir)` loads: adapter_config.json and
    adapter_model.safetensors with PEFT's names and shapes (adapters, plus `modules_to_save` weights).
    Adapted routed experts (target `experts`) go in as PEFT's `target_parameters` on transformers' fused
    3-D expert parameters."""
    out = Path(out_dir)
    adapted = lora.adapted_modules(params)
    if sorted(adapted) != sorted(targets):
        raise ValueError(f"targets {targets} differ from the modules that hold adapters {adapted}")
    modules_to_save = lora.csv_names(modules_to_save)
    state = lora.peft_state_dict(params, model_cfg, modules_to_save, _np_dtype(dtype) if dtype else None)
    got_rank = lora.adapter_rank(params)
    if got_rank != rank:
        raise ValueError(f"rank {rank} differs from the adapters' rank {got_rank}")
    tie = model_cfg.tie_word_embeddings and "embed_tokens" in modules_to_save
    uses_dora = any(k.endswith(".lora_magnitude_vector") for k in state)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": _peft_targets(model_cfg, [t for t in targets if t != lora.EXPERTS]),
        "target_parameters": list(lora.PEFT_EXPERT_PARAMETERS) if lora.EXPERTS in targets else None,
        "use_rslora": use_rslora,
        "lora_dropout": lora_dropout,
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": tie,
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "init_lora_weights": init_lora_weights,
        "inference_mode": True,
        "use_dora": uses_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / lora.ADAPTER_CONFIG).unlink(missing_ok=True)  # written last, as a model's config.json
    _save_safetensors(state, out / lora.ADAPTER_WEIGHTS)
    _write_text(out / lora.ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("exported a LoRA adapter (r=%d, %d tensors) to %s", rank, len(state), out)
    return out


def export_from_config(params: dict, cfg: Config, model_cfg: ModelConfig, lora_scale: float | None = None,
                       out_dir: str | Path | None = None) -> Path:
    """Export per the run config: a PEFT adapter with `export_adapter: true` (LoRA runs), else a merged model
    (adapters folded in with `lora_scale` by `export_hf`)."""
    out = out_dir or cfg.export_dir
    if out is None:
        raise ConfigError("export needs export_dir")
    if cfg.export_adapter:
        adapted = lora.adapted_modules(params)
        if not adapted or lora_scale is None:
            raise ConfigError("export_adapter: true but the params hold no LoRA adapters (finetuning_type: lora)")
        init_lora_weights: bool | str = True
        if cfg.pissa_init and cfg.pissa_convert:  # a plain LoRA of the original weights, rank 2r
            params = pissa_to_lora(params, _pissa_start(cfg, params, model_cfg))
        elif cfg.pissa_init:  # PEFT rebuilds the residual base from this when it loads the adapter
            init_lora_weights = pissa_init_weights(cfg.pissa_iter)
        rank = lora.adapter_rank(params)
        # The adapter's alpha reproduces the scale trained with, whatever rank the adapter came with.
        alpha = lora_scale * (rank ** 0.5 if cfg.use_rslora else rank)
        return export_peft_adapter(params, model_cfg, out, rank=rank, alpha=alpha, targets=adapted,
                                   use_rslora=cfg.use_rslora, base_model_name_or_path=cfg.model_name_or_path,
                                   modules_to_save=lora.csv_names(cfg.additional_target), lora_dropout=cfg.lora_dropout,
                                   dtype=None, init_lora_weights=init_lora_weights)
    return export_hf(params, model_cfg, cfg.model_name_or_path, out, dtype=cfg.export_dtype,
                     shard_size_gb=cfg.export_size, lora_scale=lora_scale)


PISSA_INIT, PISSA_CONVERTED = "pissa_init", "pissa_converted"


def _pissa_start(cfg: Config, params: dict, model_cfg: ModelConfig) -> dict:
    """The adapters PiSSA started from, as training saved them in `output_dir/pissa_init`."""
    from jaxsft.errors import MissingPath

    start = Path(cfg.output_dir or "") / PISSA_INIT
    if not (start / lora.ADAPTER_CONFIG).is_file():
        raise MissingPath(f"pissa_convert: no initial PiSSA adapter in {start} (training writes it when it starts); "
                          f"export with pissa_convert: false, or a merged model (export_adapter: false)")
    return lora.load_peft_adapter(start, _without_adapters(params), model_cfg)[0]


def _without_adapters(tree: dict) -> dict:
    return {k: _without_adapters(v) if isinstance(v, dict) else v for k, v in tree.items()
            if k not in lora.ADAPTER_LEAVES}


def save_pissa_start(params: dict, cfg: Config, model_cfg: ModelConfig, lora_scale: float) -> Path | None:
    """LLaMA-Factory's `output_dir/pissa_init`: the initial PiSSA adapters, which `pissa_convert` needs."""
    from jaxsft.runtime import host_array

    params = jax.tree_util.tree_map(host_array, params)
    if jax.process_index() != 0:
        return None
    run = dataclasses.replace(cfg, export_adapter=True, pissa_init=False)
    return export_from_config(params, run, model_cfg, lora_scale, out_dir=Path(cfg.output_dir) / PISSA_INIT)


def save_trained_model(params: dict, cfg: Config, model_cfg: ModelConfig, lora_scale: float | None) -> Path | None:
    """What Hugging Face's `Trainer.save_model` leaves in `output_dir` when LLaMA-Factory's training ends:
    the PEFT adapter of a LoRA run, else the whole model (in `export_dtype`), and the tokenizer files, so
    a later `adapter_name_or_path: <output_dir>` (merge, predict) finds them. Every process takes part
    (params are gathered to the hosts); process 0 writes."""
    from jaxsft.runtime import host_array

    params = jax.tree_util.tree_map(host_array, params)
    if jax.process_index() != 0:
        return None
    run = dataclasses.replace(cfg, export_adapter=lora_scale is not None, pissa_convert=False)
    out = export_from_config(params, run, model_cfg, lora_scale, out_dir=cfg.output_dir)
    if lora_scale is not None:
        copy_tokenizer(resolve_model_path(cfg.model_name_or_path), Path(out))
    if cfg.pissa_init and cfg.pissa_convert:
        export_from_config(params, dataclasses.replace(cfg, export_adapter=True), model_cfg, lora_scale,
                           out_dir=Path(cfg.output_dir) / PISSA_CONVERTED)
    return out


def run_export(cfg: Config) -> Path:
    """LLaMA-Factory's export stage: base model + `adapter_name_or_path` merged, written to `export_dir`."""
    if cfg.model_name_or_path is None:
        raise ConfigError("export needs model_name_or_path")
    model_cfg = load_hf_config(cfg.model_name_or_path)
    params = load_hf_params(cfg.model_name_or_path, model_cfg)
    scale = None
    if cfg.adapter_name_or_path:
        params, scale = lora.load_peft_adapter(cfg.adapter_name_or_path, params, model_cfg)
    return export_from_config(params, cfg, model_cfg, scale)


def run_export_stage(cfg: Config, trained=None) -> Path | None:
    """The `export_dir` stage: the params trained in this run (`trained`, handed over in memory), else
    LLaMA-Factory's export (base + `adapter_name_or_path`). Process 0 writes."""
    import jax

    if trained is None:
        return run_export(cfg) if jax.process_index() == 0 else None
    from jaxsft.runtime import host_array

    model = trained.model
    params = jax.tree_util.tree_map(host_array, model.params())  # every process joins the gather
    if jax.process_index() != 0:
        return None
    out = export_from_config(params, cfg, model.config, model.runner.lora_scale)
    print(f"exported {'PEFT adapter' if cfg.export_adapter else 'merged model'} to {out}", flush=True)
    return out
