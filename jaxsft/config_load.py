"""Reading a run's config: the YAML file and `key=value` overrides, each value coerced to its key's type and
the whole checked (ranges, choices, methods, mesh) before anything runs. Errors name the file or the
override that set the key. The keys themselves, their defaults and derived values: `jaxsft.config`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from jaxsft.config import FIELDS, MESH_AXES, TRACKERS, _TYPES, Config, _report_names, deepspeed_stage
from jaxsft.errors import ConfigError
from jaxsft.reference_keys import LLAMAFACTORY_KEYS

# Keys that are only accepted with these values (anything else is a feature we do not have).
_ONLY_VALUES = {
    "export_legacy_format": (False,),
    "fp16": (False,),
    "num_beams": (1,),
    "repetition_penalty": (1.0,),
}


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) one value against its declared type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `dataset: 123` or a numeric template name
    elif tp in (dict, list):
        if isinstance(value, tp):
            return value
        if tp is list and isinstance(value, str):
            return [value]
    raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# What to do instead, for LLaMA-Factory keys jaxsft does not support: the key itself, else the first prefix
# that matches (a method's keys share one hint: `galore_rank` says what `use_galore` says).
_UNSUPPORTED_HINTS = {
    "fsdp": "use the `mesh` key, e.g. mesh: {fsdp: -1}",
    "flash_attn": "use attention_impl: auto | xla | cudnn | pallas | splash",
    "use_unsloth": "jaxsft has its own compiled train step",
    "rope_scaling": "jaxsft reads rope scaling from the model's config.json",
    "gradient_checkpointing_kwargs": "use remat_policy",
    "mixture_of_depths": "Mixture-of-Depths models are not available; remove it to train the model as it is",
    "use_dft_loss": "the DFT loss is not available; remove it to train with the token cross-entropy LLaMA-Factory's "
                    "SFT uses by default",
    "use_adam_mini": "Adam-mini is not available; remove it to train with optim: adamw_torch (or set adafactor)",
    "use_muon": "Muon is not available; remove it to train with optim: adamw_torch (or set adafactor)",
    "logging_dir": "TensorBoard logs go to output_dir/runs (report_to: tensorboard); remove it",
    "evaluation_strategy": "transformers renamed it eval_strategy (as LLaMA-Factory 0.9 reads it); use eval_strategy",
    "task": "benchmark evaluation (`llamafactory-cli eval` on MMLU / C-Eval / CMMLU) is not available; `jaxsft eval` "
            "scores eval_dataset (eval_loss, eval_accuracy) and do_predict generates and scores answers",
}
_MULTIMODAL = ("multimodal (image, video, audio) training is not available; jaxsft trains text-only decoder models: "
               "remove it and use a text dataset")
_PREFERENCE = "preference training (DPO, KTO, ORPO, SimPO, PPO) is not available; jaxsft runs stage: sft"
_PREFIX_HINTS = (
    (("quantization_", "double_quantization"), "quantized (QLoRA) training is not available; remove it to train "
                                               "LoRA on the bf16/fp32 model"),
    (("export_quantization_",), "quantized (GPTQ) export is not available; export writes safetensors in "
                                "export_dtype (remove the export_quantization_* keys)"),
    (("fp8",), "FP8 training is not available; remove the fp8 keys to train in bf16 (bf16: true)"),
    (("enable_liger_kernel", "use_liger_kernel", "liger_kernel_config"),
     "jaxsft compiles its own step with XLA and never holds the logits of a whole row (loss_chunk_size); "
     "remove it"),
    (("torch_compile",), "jaxsft always compiles its step with XLA; remove it"),
    (("swanlab_", "use_swanlab"), "SwanLab is not available; use report_to: tensorboard, wandb or mlflow"),
    (("use_unsloth",), "jaxsft has its own compiled train step"),
    (("galore_", "use_galore"), "GaLore is not available; remove the galore keys to train with optim: adamw_torch"),
    (("apollo_", "use_apollo"), "APOLLO is not available; remove the apollo keys to train with optim: adamw_torch"),
    (("badam_", "use_badam"), "BAdam is not available; remove the badam keys to train with optim: adamw_torch "
                              "(finetuning_type: freeze trains a subset of the blocks)"),
    (("oft_",), "OFT is not available; use finetuning_type: lora"),
    (("image_", "video_", "audio_", "use_audio_in_video", "crop_to_patches", "media_dir", "freeze_vision_tower",
      "freeze_multi_modal_projector", "freeze_language_model"), _MULTIMODAL),
    (("pref_", "ref_model", "reward_model", "ppo_", "kto_", "simpo_", "dpo_", "ld_alpha"), _PREFERENCE),
    (("ray_", "placement_strategy", "resources_per_worker"),
     "Ray is not used; jaxsft runs on several hosts through jax.distributed (coordinator_address, num_processes, "
     "process_id; docs/scaling.md)"),
    (("vllm_", "sglang_", "kt_", "use_kt", "cpu_infer"),
     "jaxsft generates with its own JAX decoder (chat, do_predict); remove the inference-engine keys"),
    (("lang", "n_shot", "task_dir", "save_dir"), _UNSUPPORTED_HINTS["task"]),
)

# LLaMA-Factory values jaxsft does not have, checked before any key so that the refusal names the cause
# (a DPO config is refused for `stage: dpo`, not for the `pref_beta` that comes with it).
_UNSUPPORTED_VALUES = {
    "stage": {
        "pt": "continued pre-training (stage: pt) is not available; jaxsft runs stage: sft, which trains a plain-text "
              "dataset (registry columns {prompt: text}, like c4_demo) on every token, as LLaMA-Factory's pt stage "
              "does with packing: false",
        "rm": "reward-model training (stage: rm) is not available; jaxsft runs stage: sft",
        "ppo": "PPO (stage: ppo) is not available; jaxsft runs stage: sft",
        "dpo": "preference training (stage: dpo, pref_loss sigmoid / orpo / simpo) is not available; jaxsft runs "
               "stage: sft",
        "kto": "KTO (stage: kto) is not available; jaxsft runs stage: sft",
    },
    "finetuning_type": {"oft": "OFT (finetuning_type: oft) is not available; use finetuning_type: lora, freeze or "
                               "full"},
    "infer_backend": dict.fromkeys(("vllm", "sglang", "ktransformers"),
                                   "jaxsft generates with its own JAX decoder; use infer_backend: huggingface (the "
                                   "default) or remove the key"),
}


def unsupported_hint(key: str) -> str:
    """What to do instead of a LLaMA-Factory key jaxsft does not support."""
    if key in _UNSUPPORTED_HINTS:
        return _UNSUPPORTED_HINTS[key]
    for prefixes, hint in _PREFIX_HINTS:
        if key.startswith(prefixes):
            return hint
    return "remove it (docs/config.md lists what is supported)"


# Megatron-Core keys of LLaMA-Factory's `USE_MCA=1` runs (its examples/megatron): jaxsft's `mesh` does their job.
_MEGATRON_KEYS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size", "context_parallel_size", "sequence_parallel", "bias_activation_fusion",
    "apply_rope_fusion", "use_distributed_optimizer", "overlap_param_gather", "overlap_grad_reduce",
    "moe_grouped_gemm", "moe_token_dispatcher_type", "recompute_granularity", "recompute_method",
    "recompute_num_layers",
})
# Top-level keys of LLaMA-Factory's v1 trainer configs (`USE_V1=1`, its examples/v1), which classic keys replace.
_V1_KEYS = frozenset({"model", "model_class", "peft_config", "kernel_config", "dist_config", "train_dataset",
                      "micro_batch_size", "sample_backend"})


def _check_key(key: str) -> None:
    if key in FIELDS:
        return
    if key in LLAMAFACTORY_KEYS:
        raise ConfigError(f"key '{key}' is a LLaMA-Factory option that jaxsft does not support: "
                          f"{unsupported_hint(key)}")
    if key in _MEGATRON_KEYS:
        raise ConfigError(f"key '{key}' is a Megatron-Core option (LLaMA-Factory's USE_MCA=1 runs); jaxsft lays "
                          f"out devices with the `mesh` key instead, e.g. mesh: {{fsdp: -1, tensor: 2, expert: 2}}")
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f", did you mean '{close[0]}'?" if close else " (see docs/config.md for the keys)"
    raise ConfigError(f"unknown key '{key}'{hint}")


def _check_values(values: dict[str, Any]) -> None:
    """A stage, method or backend jaxsft does not have, named before the keys that come with it."""
    for key, hints in _UNSUPPORTED_VALUES.items():
        value = values.get(key)
        if isinstance(value, str) and value.strip().lower() in hints:
            raise ConfigError(f"key '{key}': {value!r} is not supported: {hints[value.strip().lower()]}")


def _validate(cfg: Config) -> None:
    for key, allowed in _ONLY_VALUES.items():
        if getattr(cfg, key) not in allowed:
            hint = {"fp16": "; use bf16: true", "export_legacy_format": ": jaxsft exports safetensors only"}
            raise ConfigError(f"key '{key}': {getattr(cfg, key)!r} is not supported, only {allowed[0]!r}"
                              f"{hint.get(key, '')}")
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        value = getattr(cfg, name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"key '{name}': {value!r} is not one of {', '.join(map(repr, choices))}")
    if not (cfg.optim.startswith("adamw") or cfg.optim in ("adafactor", "sgd")):
        raise ConfigError(f"key 'optim': {cfg.optim!r} is not supported; use adamw_torch, adafactor or sgd")
    unsupported = [r for r in _report_names(cfg.report_to) if r not in ("none", "all", *TRACKERS)]
    if unsupported:
        raise ConfigError(f"key 'report_to': {', '.join(map(repr, unsupported))} not supported; choose from "
                          f"{', '.join(TRACKERS)}, all or none (trainer_log.jsonl is always written)")
    _validate_methods(cfg)
    positive = ("cutoff_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "lora_rank", "max_new_tokens", "logging_steps", "save_steps",
                "buffer_size")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"key '{key}' must be > 0, got {getattr(cfg, key)}")
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_ratio", "val_size", "lora_dropout",
                "loss_chunk_size", "neftune_noise_alpha"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"key '{key}' must be >= 0, got {getattr(cfg, key)}")
    if cfg.do_train and cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError(f"key 'num_train_epochs' must be > 0 when max_steps is not set, got {cfg.num_train_epochs}")
    if cfg.warmup_steps < 0 or (cfg.warmup_steps >= 1 and cfg.warmup_steps != int(cfg.warmup_steps)):
        raise ConfigError(f"key 'warmup_steps' must be a step count, or a fraction in (0, 1) of all steps, got "
                          f"{cfg.warmup_steps}")
    if cfg.warmup_ratio > 1:
        raise ConfigError(f"key 'warmup_ratio' must be in [0, 1], got {cfg.warmup_ratio}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"key 'lora_dropout' must be in [0, 1), got {cfg.lora_dropout}")
    _validate_mesh(cfg.mesh)
    if cfg.do_train or cfg.do_eval or cfg.do_predict:
        for key in ("model_name_or_path", "output_dir"):
            if getattr(cfg, key) is None:
                raise ConfigError(f"key '{key}' is required to run (do_train/do_eval/do_predict)")
        if cfg.template is None:
            raise ConfigError("key 'template' is required to run: a template name, or 'auto' to use the "
                              "tokenizer's own chat template")
    if cfg.do_train and cfg.dataset is None:
        raise ConfigError("key 'dataset' is required with do_train: true")
    if (cfg.do_eval or cfg.do_predict) and not (cfg.eval_dataset or cfg.val_size > 1e-6):
        raise ConfigError("do_eval/do_predict need evaluation data: set eval_dataset, or val_size with dataset")
    if not 0 <= cfg.replay_ratio < 1:
        raise ConfigError(f"key 'replay_ratio' must be in [0, 1), got {cfg.replay_ratio}")
    if bool(cfg.replay_dataset) != (cfg.replay_ratio > 0):
        raise ConfigError("replay needs both replay_dataset and replay_ratio > 0 (one of them is unset)")
    if cfg.replay_dataset and not (cfg.packing or cfg.neat_packing):
        raise ConfigError("replay_dataset mixes general text into packed rows: set packing: true")
    if cfg.replay_dataset and cfg.streaming:
        raise ConfigError("replay_dataset is not supported with streaming: true (load the data in memory)")
    if cfg.val_size > 1e-6 and not cfg.dataset:
        raise ConfigError("val_size splits the evaluation rows off 'dataset', which is not set; set dataset, "
                          "or name the evaluation data with eval_dataset")
    if cfg.do_predict and not cfg.predict_with_generate:
        raise ConfigError("do_predict needs predict_with_generate: true (jaxsft predicts by generating)")
    if cfg.export_adapter and cfg.finetuning_type != "lora":
        raise ConfigError("export_adapter: true needs finetuning_type: lora")


def _validate_methods(cfg: Config) -> None:
    """The LoRA variants and LLaMA Pro need the fine-tuning type they modify (LLaMA-Factory's rules)."""
    lora_only = {"loraplus_lr_ratio": cfg.loraplus_lr_ratio is not None, "use_dora": cfg.use_dora,
                 "pissa_init": cfg.pissa_init}
    for key, used in lora_only.items():
        if used and cfg.finetuning_type != "lora":
            raise ConfigError(f"key '{key}' is only valid with finetuning_type: lora")
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise ConfigError(f"key 'loraplus_lr_ratio' must be > 0, got {cfg.loraplus_lr_ratio}")
    if cfg.use_dora and cfg.pissa_init:
        raise ConfigError("use_dora and pissa_init cannot be combined (PEFT refuses it too); choose one")
    targets = cfg.lora_target if isinstance(cfg.lora_target, (list, tuple)) else str(cfg.lora_target).split(",")
    experts = "experts" in [str(t).strip() for t in targets]
    for key, used in {"lora_dropout": cfg.lora_dropout > 0, "use_dora": cfg.use_dora,
                      "pissa_init": cfg.pissa_init}.items():
        if experts and used and cfg.finetuning_type == "lora":
            raise ConfigError(f"key '{key}' cannot be combined with LoRA on the experts (lora_target: experts), "
                              f"which PEFT's adapters on expert parameters (target_parameters) do not support")
    if cfg.pissa_iter < -1:
        raise ConfigError(f"key 'pissa_iter' must be -1 (exact SVD) or >= 0, got {cfg.pissa_iter}")
    if cfg.use_llama_pro:
        if cfg.finetuning_type != "freeze":
            raise ConfigError("use_llama_pro needs finetuning_type: freeze (LoRA on the expanded blocks alone would "
                              "put adapters on a subset of layers, which jaxsft does not support)")
        if cfg.freeze_trainable_layers <= 0:
            raise ConfigError("use_llama_pro: freeze_trainable_layers must be > 0, the number of expanded blocks")
    if cfg.deepspeed is not None:
        deepspeed_stage(cfg.deepspeed)  # a readable file must be valid JSON with a known stage


def _validate_mesh(mesh: dict) -> None:
    axes = MESH_AXES
    for axis, size in mesh.items():
        if axis not in axes:
            close = difflib.get_close_matches(str(axis), axes, n=1)
            hint = f", did you mean '{close[0]}'?" if close else f" (axes: {', '.join(axes)})"
            raise ConfigError(f"unknown mesh axis '{axis}'{hint}")
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh axis '{axis}': size must be a positive int or -1, got {size!r}")
    if sum(1 for s in mesh.values() if s == -1) > 1:
        raise ConfigError("mesh: at most one axis may be -1 (it takes the remaining devices)")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        return key, yaml.safe_load(raw) if raw.strip() or key.startswith("mesh.") else None
    except yaml.YAMLError as e:
        raise ConfigError(f"command-line override {text!r}: the value is not valid YAML ({getattr(e, 'problem', e)}"
                          f"); quote the whole override for the shell, e.g. 'mesh={{data: 2, fsdp: -1}}'") from None


def build_config(values: dict[str, Any], origins: dict[str, str] | None = None) -> Config:
    """Type-check a flat dict of keys and build the resolved Config. `origins` names where a key was set
    (e.g. "command-line override 'lora_rank=eight'"); an error about that key starts with it."""
    kwargs: dict[str, Any] = {}
    mesh_updates = {}
    try:
        _check_values(values)
    except ConfigError as e:
        named = re.match(r"key '([^']+)'", str(e))
        if origins and named and named.group(1) in origins:
            raise _Located(f"{origins[named.group(1)]}: {e}") from None
        raise
    for key, value in values.items():
        if key.startswith("mesh."):
            mesh_updates[key.split(".", 1)[1]] = value
            continue
        try:
            _check_key(key)
            if value is False and "no" in FIELDS[key].metadata.get("choices", ()):
                value = "no"  # YAML 1.1 reads an unquoted `save_strategy: no` as false
            kwargs[key] = _coerce(key, value, _TYPES[key])
        except ConfigError as e:
            if origins and key in origins:
                raise _Located(f"{origins[key]}: {e}") from None
            raise
    if mesh_updates:
        kwargs["mesh"] = {**kwargs.get("mesh", FIELDS["mesh"].default_factory()), **mesh_updates}
    cfg = Config(**kwargs)
    _validate(cfg)
    return cfg.resolved()


class _Located(ConfigError):
    """A ConfigError whose message already says where the key was set."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (not "the last one wins")."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a YAML file (may be None) and apply key=value overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if loaded is None:
            raise ConfigError(f"{path}: the file is empty (or only comments); put the run's keys in it, e.g. "
                              f"configs/ has examples")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of key: value, got {type(loaded).__name__}")
        v1 = sorted(_V1_KEYS & set(loaded))
        if "model" in v1 and len(v1) > 1:
            raise ConfigError(f"{path}: a LLaMA-Factory v1 trainer config (USE_V1=1; keys {', '.join(v1)}); jaxsft "
                              f"reads LLaMA-Factory's SFT keys: model_name_or_path, dataset, finetuning_type, "
                              f"lora_rank, per_device_train_batch_size, ... (docs/config.md)")
        values.update(loaded)
    origins = {}
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
        origins[key] = f"command-line override '{text}'"
    try:
        return build_config(values, origins)
    except _Located as e:
        raise ConfigError(str(e)) from None
    except ConfigError as e:  # a check of the resolved values: blame the override when it set that key
        named = re.match(r"key '([^']+)'", str(e))
        where = origins.get(named.group(1)) if named else None
        raise ConfigError(f"{where or path}: {e}" if where or path else str(e)) from None
