"""The run configuration: one flat YAML (LLaMA-Factory's SFT keys plus jaxsft's own) and key=value overrides.

Keys keep LLaMA-Factory's names and meanings so a user's SFT YAML runs with few or no edits. A key we
do not know is a typo (with a did-you-mean); a LLaMA-Factory key we do not implement is an error that
says so; a key that only tunes PyTorch machinery we replace is accepted and reported as having no effect.
This module holds the keys, their defaults and derived values; reading and checking a YAML file and overrides
is `jaxsft.config_load`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

from jaxsft.errors import ConfigError


def _field(default: Any = None, help: str = "", choices: tuple = ()) -> Any:
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value),
                                 metadata={"help": help, "choices": choices})
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def hub_offline(*variables: str) -> bool:
    """Whether the Hugging Face hub is off limits: HF_HUB_OFFLINE (and any extra variable, e.g.
    HF_DATASETS_OFFLINE) set to something other than 0/false/no, as huggingface_hub reads it."""
    return any(os.environ.get(v, "0").strip().lower() not in ("0", "", "false", "no")
               for v in ("HF_HUB_OFFLINE", *variables))


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr")
ATTENTION_IMPLS = ("auto", "xla", "xla_chunked", "xla_blocksparse", "cudnn", "pallas", "splash")
REMAT_POLICIES = ("none", "full", "full_keep_attention",
                  "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")
DTYPES = ("float32", "bfloat16")
DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}
# device mesh axes, in mesh order; `expert` shards MoE experts and, like data and fsdp, splits batch rows
MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass
class Config:
    # --- model ---
    model_name_or_path: Optional[str] = _field(None, "Local Hugging Face model directory, or a hub name (online only).")
    adapter_name_or_path: Optional[str] = _field(None, "A PEFT adapter directory to load (and continue training).")
    trust_remote_code: bool = _field(False, "Accepted either way: jaxsft never runs code from a model directory or "
                                            "the hub; a tokenizer that needs such code is refused by name.")
    cache_dir: Optional[str] = _field(None, "Where hub downloads are cached.")

    # --- data ---
    template: Optional[str] = _field(None, "Chat template name, or 'auto' for the tokenizer's own jinja template.")
    dataset: Optional[str] = _field(None, "Comma-separated dataset names (dataset_info.json) or paths.")
    eval_dataset: Optional[str] = _field(None, "Comma-separated evaluation datasets.")
    retention_dataset: Optional[str] = _field(None, "Forgetting meter: datasets (names or paths, as dataset) scored "
                                              "with the starting model before the first step (cached by model and "
                                              "data), at every evaluation and at the end; logs retention_loss and "
                                              "retention_loss_delta (trained minus base). Plain-text rows (alpaca "
                                              "with only a prompt column, or jsonl rows of 'text') learn every token.")
    replay_dataset: Optional[str] = _field(None, "Replay against forgetting: general-text datasets whose tokens fill "
                                           "replay_ratio of every packed row (needs packing: true); their loss is "
                                           "reported as replay_loss beside sft_loss.")
    replay_ratio: float = _field(0.0, "Share (0..1) of each batch's tokens taken from replay_dataset.")
    dataset_dir: str = _field("data", "Folder holding dataset_info.json and the data files.")
    cutoff_len: int = _field(2048, "Maximum tokens per example (and per packed row).")
    train_on_prompt: bool = _field(False, "Learn the prompt tokens too.")
    mask_history: bool = _field(False, "Learn only the last assistant turn.")
    streaming: bool = _field(False, "Read rows lazily instead of loading whole files.")
    buffer_size: int = _field(16384, "Streaming: examples read, shuffled and packed together at a time.")
    mix_strategy: str = _field("concat", "How several datasets are mixed.",
                               ("concat", "interleave_under", "interleave_over"))
    interleave_probs: Optional[str] = _field(None, "Comma-separated sampling probabilities for interleaving.")
    overwrite_cache: bool = _field(False, "Tokenize again and overwrite the entry in data_cache_dir.")
    data_cache_dir: Optional[str] = _field("~/.cache/jaxsft/data", "Tokenized-data cache: a rerun with unchanged "
                                           "data files, tokenizer, template and data keys loads its examples "
                                           "instead of tokenizing; null disables it.")
    preprocessing_num_workers: Optional[int] = _field(None, "Worker processes that tokenize (used from 10,000 rows per "
                                                                  "worker on; each gets cores / N tokenizer threads).")
    max_samples: Optional[int] = _field(None, "Keep at most this many examples per dataset.")
    val_size: float = _field(0.0, "Held-out evaluation split: a fraction (< 1) or a count.")
    packing: Optional[bool] = _field(None, "Pack examples into rows of cutoff_len (always block-diagonal).")
    neat_packing: bool = _field(False, "Same as packing in jaxsft: packed examples never attend to each other.")
    length_buckets: bool = _field(True, "Pad each batch (train and eval) only to the smallest of a few lengths "
                                        "(64, 96, 128, 192, 256, ... cutoff_len) that holds its longest row; "
                                        "false pads every row to cutoff_len (one compiled shape).")
    group_by_length: bool = _field(False, "Unpacked: batch examples of similar length (each run of 50 batches "
                                          "sorted by length, as Hugging Face's group_by_length); less padding.")
    tool_format: Optional[str] = _field(None, "Override the template's tool-call format.")
    default_system: Optional[str] = _field(None, "Override the template's default system prompt.")
    enable_thinking: Optional[bool] = _field(True, "qwen3-style templates: keep the thinking block.")
    preserve_thinking: bool = _field(False, "qwen3-style templates: keep the thoughts of earlier answers (with "
                                            "mask_history, and in predict prompts).")
    tokenized_path: Optional[str] = _field(None, "With do_train: a new or empty folder is filled with the tokenized "
                                          "dataset and the run stops there (as in LLaMA-Factory); a filled one is "
                                          "trained from, its data arguments ignored.")
    skip_invalid_examples: bool = _field(False, "Skip (and count) malformed rows instead of stopping.")

    # --- fine-tuning method ---
    stage: str = _field("sft", "Only supervised fine-tuning.", ("sft",))
    finetuning_type: str = _field("lora", "What is trained.", ("full", "freeze", "lora"))
    freeze_trainable_layers: int = _field(2, "freeze: train the last N layers (first N when negative).")
    freeze_trainable_modules: str = _field("all", "freeze: comma list of module names trained in those layers.")
    freeze_extra_modules: Optional[str] = _field(None, "freeze: extra non-layer modules trained (e.g. embed_tokens).")
    moe_aux_loss_coef: Optional[float] = _field(None, "Mixture of experts: weight of the router's load-balancing "
                                                "loss (transformers' aux_loss) in the objective. Unset: config.json's "
                                                "router_aux_loss_coef if its output_router_logits is true, else 0.")
    train_router: bool = _field(False, "Mixture of experts: train the router (`gate`) too; frozen by default.")
    lora_rank: int = _field(8, "LoRA rank.")
    lora_alpha: Optional[int] = _field(None, "LoRA alpha (default 2 x rank).")
    lora_dropout: float = _field(0.0, "Dropout on the LoRA input.")
    neftune_noise_alpha: Optional[float] = _field(None, "NEFTune: uniform noise U(-1, 1) x alpha / sqrt(L x d) on the "
                                                        "input embeddings in training (never in eval or predict); L "
                                                        "is each example's own length (packed or not), d the hidden "
                                                        "size; padding gets none. LLaMA-Factory suggests 5.")
    lora_target: str = _field("all", "'all' (every linear layer but lm_head) or a comma list of module names; add "
                              "'experts' (e.g. 'all,experts') for LoRA on an MoE's routed experts.")
    additional_target: Optional[str] = _field(None, "Modules trained fully beside LoRA (e.g. embed_tokens,lm_head).")
    use_rslora: bool = _field(False, "Scale LoRA by alpha / sqrt(rank).")
    create_new_adapter: bool = _field(False, "Start a fresh adapter on top of adapter_name_or_path.")
    loraplus_lr_ratio: Optional[float] = _field(None, "LoRA+: lora_b (and 1-D trainable params, as LLaMA-Factory "
                                                      "groups them) learn at learning_rate x this ratio.")
    loraplus_lr_embedding: float = _field(1e-6, "LoRA+: learning rate of embedding adapters; jaxsft puts no "
                                                "adapters on embeddings, so it has no effect.")
    use_dora: bool = _field(False, "DoRA: a trained magnitude per output channel times the normalized W + s B A.")
    pissa_init: bool = _field(False, "PiSSA: start A, B from the top singular vectors of W; W keeps the residual.")
    pissa_iter: int = _field(16, "PiSSA: subspace iterations of the randomized SVD (-1: exact SVD).")
    pissa_convert: bool = _field(False, "PiSSA: the exported adapter is converted to a plain LoRA adapter (rank 2r) "
                                        "that applies to the original model.")
    use_llama_pro: bool = _field(False, "freeze: train the expanded blocks of a LLaMA Pro model (every "
                                        "num_layers / freeze_trainable_layers-th layer; tools/llama_pro.py expands).")
    pure_bf16: bool = _field(False, "Keep params in bf16 (no fp32 master copy).")
    compute_accuracy: bool = _field(False, "Report token accuracy in evaluation.")
    plot_loss: bool = _field(False, "Write training_loss.png at the end.")
    disable_shuffling: bool = _field(False, "Keep the dataset order.")
    dataloader_drop_last: bool = _field(False, "Skip each epoch's last, incomplete batch (as Hugging Face's key; "
                                               "default: every example trains, the batch filled up with empty rows).")

    # --- training loop ---
    output_dir: Optional[str] = _field(None, "Where checkpoints, logs and results go.")
    overwrite_output_dir: bool = _field(False, "Start over in a used output_dir (its checkpoints and results are "
                                               "deleted); also lets export_dir replace a model it holds.")
    do_train: bool = _field(False, "Run training.")
    do_eval: bool = _field(False, "Run evaluation.")
    do_predict: bool = _field(False, "Run prediction on the evaluation data.")
    predict_with_generate: bool = _field(False, "Generate text in predict and score it (ROUGE, BLEU-4).")
    learning_rate: float = _field(5e-5, "Peak learning rate.")
    num_train_epochs: float = _field(3.0, "Epochs (ignored when max_steps > 0).")
    max_steps: int = _field(-1, "Optimizer steps; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = _field(8, "Rows per device per micro-batch.")
    per_device_eval_batch_size: int = _field(8, "Rows per device in evaluation.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    optim: str = _field("adamw_torch", "Optimizer (adamw_*, adafactor, sgd).")
    adam_beta1: float = _field(0.9, "AdamW beta1.")
    adam_beta2: float = _field(0.999, "AdamW beta2.")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = _field("linear", "Learning-rate schedule.", LR_SCHEDULERS)
    lr_scheduler_kwargs: dict = _field({}, "Schedule options, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.")
    warmup_ratio: float = _field(0.0, "Warm-up as a fraction of all steps.")
    warmup_steps: Union[int, float] = _field(0, "Warm-up steps (wins over warmup_ratio when > 0); a float in (0, 1) "
                                                "is a fraction of all steps, as transformers 5 reads it.")
    weight_decay: float = _field(0.0, "Decoupled weight decay (never on norms and biases).")
    max_grad_norm: float = _field(1.0, "Global gradient-norm clip (0 disables).")
    logging_steps: float = _field(500, "Log every N steps.")
    save_strategy: str = _field("steps", "When to save checkpoints.", ("steps", "epoch", "no"))
    save_steps: float = _field(500, "Save a checkpoint every N steps.")
    save_total_limit: Optional[int] = _field(None, "Keep at most this many checkpoints.")
    eval_strategy: str = _field("no", "When to evaluate during training.", ("no", "steps", "epoch"))
    eval_steps: Optional[float] = _field(None, "Evaluate every N steps (default: logging_steps).")
    seed: int = _field(42, "Seed for init, shuffling and dropout.")
    bf16: bool = _field(False, "Compute in bfloat16 (params stay fp32 unless pure_bf16).")
    fp16: bool = _field(False, "Not supported: use bf16.")
    resume_from_checkpoint: Union[bool, str, None] = _field(
        None, "true (the newest complete checkpoint in output_dir) or a checkpoint_<step> path (an older one sets "
              "the later ones aside in output_dir/set_aside/).")
    report_to: Union[str, list, None] = _field("none", "Trackers: tensorboard, wandb, mlflow (a list or a comma "
                                                       "list), all (those installed) or none.")
    run_name: Optional[str] = _field(None, "The run's name in W&B and MLflow (project / experiment: WANDB_PROJECT, "
                                           "MLFLOW_EXPERIMENT_NAME, as Hugging Face reads them).")
    gradient_checkpointing: Optional[bool] = _field(None, "false sets remat_policy: none (LLaMA-Factory habit).")
    save_only_model: bool = _field(False, "Checkpoints hold params, step and data position but no optimizer state "
                                          "(smaller; they export and predict, but training cannot resume from them).")
    deepspeed: Union[str, dict, None] = _field(None, "A DeepSpeed config (file or dict): its ZeRO stage picks the mesh "
                                                     "(0: data parallel, 1-3: fsdp) unless `mesh` is set; nothing else "
                                                     "in it is read. A file that does not exist here is fine.")
    ddp_timeout: Optional[int] = _field(None, "No effect: XLA collectives have no such timeout.")
    dataloader_num_workers: Optional[int] = _field(None, "No effect: the grain pipeline is in-process.")
    disable_tqdm: bool = _field(False, "Hide the progress bar.")

    # --- generation ---
    do_sample: bool = _field(True, "Sample instead of greedy decoding.")
    temperature: float = _field(0.95, "Sampling temperature.")
    top_p: float = _field(0.7, "Nucleus sampling mass.")
    top_k: int = _field(50, "Top-k sampling.")
    num_beams: int = _field(1, "Only 1 (beam search is not supported).")
    max_new_tokens: int = _field(1024, "Tokens generated per prompt at most.")
    repetition_penalty: float = _field(1.0, "Only 1.0 (no penalty) is supported.")
    skip_special_tokens: bool = _field(True, "Drop special tokens when decoding.")
    infer_backend: str = _field("huggingface", "Only huggingface, LLaMA-Factory's default: chat and predict generate "
                                "with jaxsft's own JAX decoder (vllm, sglang, ktransformers are refused).",
                                ("huggingface",))

    # --- export ---
    export_dir: Optional[str] = _field(None, "Write a Hugging Face model (or PEFT adapter) here after training.")
    export_size: int = _field(5, "Shard size of exported safetensors in GB.")
    export_dtype: Optional[str] = _field(None, "dtype of exported weights (default bfloat16 for bf16 runs).", DTYPES)
    export_adapter: bool = _field(False, "Export a PEFT adapter instead of merged weights (LoRA runs).")
    export_device: Optional[str] = _field(None, "No effect: export runs on the host.")
    export_legacy_format: bool = _field(False, "Only false: exports are safetensors (legacy .bin pickles are not "
                                               "written).")

    # --- jaxsft: parallelism, kernels, numerics ---
    mesh: dict = _field(dict(DEFAULT_MESH),
                        "Device mesh axis sizes (data, fsdp, expert, tensor); -1 takes the remaining devices. "
                        "`expert` shards MoE experts (it must divide the model's experts) and, like data and "
                        "fsdp, splits the batch rows.")
    attention_impl: str = _field("auto", "Attention kernel.", ATTENTION_IMPLS)
    remat_policy: Optional[str] = _field(None, "Rematerialization (default: full_keep_attention = full, but an "
                                               "attention kernel's named outputs are kept so its forward is not "
                                               "rerun; none when gradient_checkpointing is false).", REMAT_POLICIES)
    param_dtype: Optional[str] = _field(None, "dtype of stored params (default float32; bfloat16 with pure_bf16).",
                                        DTYPES)
    compute_dtype: Optional[str] = _field(None, "dtype of activations (default bfloat16 when bf16).", DTYPES)
    loss_chunk_size: int = _field(512, "Positions per chunk of the loss: fp32 logits exist for one chunk at a time, "
                                       "forward and backward; 0 computes whole rows' [T, vocab] logits at once.")
    compile_for: Optional[str] = _field(None, "Compile the run's steps for this TPU slice (v5p-8, v5e-16, v6e-8, "
                                              "v4-8, or a topology such as v5e:2x2) or GPU host (h100-8) on this "
                                              "host, print per-chip memory and FLOPs, and stop (docs/scaling.md).")
    skip_nonfinite_steps: bool = _field(False, "Skip an update whose loss or gradient is NaN/inf instead of stopping.")
    compilation_cache_dir: Optional[str] = _field("~/.cache/jaxsft/jax", "Persistent XLA compilation cache: a rerun "
                                                  "or resume with the same shapes loads compiled steps instead of "
                                                  "compiling again; null disables it.")
    coordinator_address: Optional[str] = _field(None, "Multi-host: host:port of process 0.")
    num_processes: Optional[int] = _field(None, "Multi-host: number of processes.")
    process_id: Optional[int] = _field(None, "Multi-host: this process's index.")

    # ------------------------------------------------------------------
    def resolved(self) -> "Config":
        """Fill defaults that depend on other keys (pure: returns a new Config)."""
        changes: dict[str, Any] = {}
        if self.lora_alpha is None:
            changes["lora_alpha"] = self.lora_rank * 2
        if self.neat_packing:
            changes["packing"] = True
        elif self.packing is None:
            changes["packing"] = False
        if self.remat_policy is None:
            changes["remat_policy"] = "none" if self.gradient_checkpointing is False else "full_keep_attention"
        if self.param_dtype is None:
            changes["param_dtype"] = "bfloat16" if self.pure_bf16 else "float32"
        if self.compute_dtype is None:
            changes["compute_dtype"] = "bfloat16" if (self.bf16 or self.pure_bf16) else "float32"
        if self.export_dtype is None:
            changes["export_dtype"] = "bfloat16" if (self.bf16 or self.pure_bf16) else "float32"
        if not self.do_eval and self.eval_strategy != "no" and (self.eval_dataset or self.val_size > 1e-6):
            changes["do_eval"] = True  # HF's TrainingArguments: evaluating during training evaluates at the end too
        if 0 < self.warmup_steps < 1:  # transformers 5: a fraction of all steps (LF's galore/mod examples: 0.1)
            changes["warmup_ratio"], changes["warmup_steps"] = float(self.warmup_steps), 0
        if not self.eval_steps:  # HF: unset or 0 is logging_steps
            changes["eval_steps"] = self.logging_steps
        if self.deepspeed is not None:
            changes["mesh"] = _deepspeed_mesh(self)[0]
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)

# LLaMA-Factory keys that tune PyTorch/HF machinery jaxsft replaces; accepted, reported as no-ops.
NO_EFFECT_KEYS = {
    "ddp_timeout": "XLA collectives have no such timeout",
    "dataloader_num_workers": "the grain pipeline runs in-process",
    "export_device": "export runs on the host",
}

TRACKERS = ("tensorboard", "wandb", "mlflow")


def _report_names(report_to: Union[str, list, None]) -> list[str]:
    items = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    return [str(t).strip() for t in items if str(t).strip()]


def report_targets(report_to: Union[str, list, None]) -> tuple[str, ...]:
    """The trackers a run reports to: HF's `report_to` (a name, a list or a comma list; `all` is every
    tracker installed here, `none` nothing)."""
    import importlib.util

    names = _report_names(report_to)
    if "none" in names:
        return ()
    if "all" in names:
        return tuple(t for t in TRACKERS if t == "tensorboard" or importlib.util.find_spec(t) is not None)
    return tuple(dict.fromkeys(names))


def deepspeed_stage(deepspeed: Union[str, dict]) -> int | None:
    """The ZeRO stage of a DeepSpeed config: from the dict or the JSON file, else from a file name like
    LLaMA-Factory's `ds_z3_config.json` (the file need not exist here); None when it says nothing."""
    import json

    config = deepspeed
    if isinstance(deepspeed, str):
        path = Path(deepspeed).expanduser()
        config = None
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ConfigError(f"key 'deepspeed': {deepspeed} is not valid JSON: {e}") from None
    if isinstance(config, dict):
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"key 'deepspeed': zero_optimization.stage {stage!r} is not 0, 1, 2 or 3")
        return int(stage)
    match = re.search(r"z(?:ero)?[_-]?([0-3])", Path(str(deepspeed)).name)
    return int(match[1]) if match else None


def _deepspeed_mesh(cfg: Config) -> tuple[dict, str]:
    """(mesh, what was chosen and why) for a run with a `deepspeed` key. ZeRO-0 is plain data parallelism;
    ZeRO-1/2/3 shard optimizer state (and gradients, and params) over the data-parallel ranks, which the
    `fsdp` axis does for all three at once: the same math, less memory."""
    stage = deepspeed_stage(cfg.deepspeed)
    said = f"ZeRO-{stage}" if stage is not None else "no ZeRO stage in it"
    if stage == 0:
        mesh, how = {"data": -1, "fsdp": 1, "tensor": 1}, \
            "mesh {data: -1}: data parallel, params and optimizer state replicated on every device"
    else:
        mesh, how = dict(DEFAULT_MESH), ("mesh {fsdp: -1}: params, gradients and optimizer state sharded over all "
                                         "devices (XLA gathers params per layer, as ZeRO-3 does)")
    if cfg.mesh not in (DEFAULT_MESH, mesh):
        return cfg.mesh, f"{said}; the `mesh` key is set, so mesh {cfg.mesh} is used"
    return mesh, f"{said} -> {how}"


def every_n_steps(value: float, total_steps: int) -> int:
    """logging_steps / save_steps / eval_steps as a step interval: HF reads a value below 1 as a ratio of the
    total steps (0.1: every tenth of the run)."""
    return max(math.ceil(total_steps * value) if 0 < value < 1 else int(value), 1)


def ignored_settings(cfg: Config) -> dict[str, str]:
    """Keys the user set that jaxsft accepts but that have no effect here, with why."""
    notes = {key: why for key, why in NO_EFFECT_KEYS.items() if getattr(cfg, key) != FIELDS[key].default}
    if cfg.loraplus_lr_embedding != FIELDS["loraplus_lr_embedding"].default:
        notes["loraplus_lr_embedding"] = "jaxsft puts no LoRA adapters on embeddings"
    return notes


def met_settings(cfg: Config) -> dict[str, str]:
    """LLaMA-Factory keys the user set whose intent jaxsft meets its own way: key -> how (one line each)."""
    notes = {}
    if cfg.trust_remote_code:
        notes["trust_remote_code"] = ("jaxsft never executes code from a model directory or the hub; it reads "
                                      "config.json, safetensors and tokenizer files (a tokenizer that needs custom "
                                      "code is refused by name)")
    if cfg.deepspeed is not None:
        notes["deepspeed"] = _deepspeed_mesh(cfg)[1]
    if cfg.optim.startswith("adamw") and cfg.optim not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        notes["optim"] = (f"{cfg.optim!r} runs as optax AdamW with float32 moments (no 8-bit, 4-bit or "
                          f"library-specific variant here)")
    if cfg.save_only_model:
        notes["save_only_model"] = ("checkpoints hold params, step and data position without optimizer state; "
                                    "they export and predict, but a run cannot resume from them")
    return notes
