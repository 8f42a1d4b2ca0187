"""What every stage builds first: processes, the mesh, the tokenizer, and the model's params placed
on the mesh and split into trainable and frozen parts for the configured fine-tuning type."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import Config, ConfigError
from jaxsft.model.config import ModelConfig
from jaxsft.model.hf import load_hf_config, load_hf_params, resolve_model_path
from jaxsft.model.transformer import init_params, param_logical_axes
from jaxsft.params import Flat, Partition, flatten, freeze_partition, full_partition, merge, split
from jaxsft.sharding import check_expert_axis, make_mesh, tree_shardings
from jaxsft.step import ModelRunner

logger = logging.getLogger("jaxsft")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def init_distributed(cfg: Config) -> None:
    """Turn on the persistent compilation cache; start JAX's multi-controller runtime when the config or the
    environment asks for it."""
    use_compilation_cache(cfg.compilation_cache_dir)
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address or cfg.num_processes:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    elif any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")):
        if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
            jax.distributed.initialize()


def use_compilation_cache(directory: str | None) -> None:
    """Compiled executables are written to and read from `directory` (JAX's persistent cache: keyed by the
    program, devices and flags, so a changed step recompiles). Every compilation is stored, however quick: with
    a threshold, a small program near it was stored or not depending on the machine's load, and an unchanged
    rerun compiled it again. The directory is fixed for the process once the first step is compiled."""
    if not directory:
        return
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if not _CACHE_EVENTS:
        _CACHE_EVENTS.update(hits=0, misses=0)

        def count(event: str, **_) -> None:
            if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
                key = "hits" if event.endswith("hits") else "misses"
                _CACHE_EVENTS[key] += 1

        jax.monitoring.register_event_listener(count)


_CACHE_EVENTS: dict[str, int] = {}  # programs loaded from / compiled and checked against the persistent cache


def compilation_cache_summary() -> str | None:
    """One line on what the persistent compilation cache did in this process so far."""
    if not _CACHE_EVENTS or not jax.config.jax_compilation_cache_dir:
        return None
    return (f"compilation cache {jax.config.jax_compilation_cache_dir}: {_CACHE_EVENTS['hits']} compiled programs "
            f"loaded, {_CACHE_EVENTS['misses']} compiled and stored")


def process_age() -> float | None:
    """Seconds since this process started (Linux), so time to first step counts imports too."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# AutoTokenizer (transformers 5) resolves these declared classes to the plain fast tokenizer for these model
# types (not qwen2: Qwen2Tokenizer; not Mistral's: its own backend may apply), as tests/test_tokenizer_load.py
# checks for each; loading it directly skips AutoTokenizer's config classes, which import torch (seconds of
# start-up that a JAX run never uses).
PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
PLAIN_TOKENIZER_MODEL_TYPES = ("llama", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3", "gemma3_text",
                               "phi3")


def plain_fast_tokenizer(path: Path) -> bool:
    """Whether AutoTokenizer would load the tokenizer in `path` as the plain fast tokenizer (`TokenizersBackend`):
    a tokenizer.json, a declared plain class, no custom code, a model type without its own tokenizer backend."""
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return (isinstance(declared, dict) and declared.get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES
            and not declared.get("auto_map") and model_type in PLAIN_TOKENIZER_MODEL_TYPES
            and (path / "tokenizer.json").is_file())


def load_tokenizer(cfg: Config):
    path = resolve_model_path(cfg.model_name_or_path)
    if plain_fast_tokenizer(path):
        try:
            from transformers import TokenizersBackend
        except ImportError:  # transformers 4: AutoTokenizer below
            pass
        else:
            return TokenizersBackend.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


# From this many tokens per row on, CPU training skips the empty blocks of packed rows (measured on
# the compare model, 4 x 1024 rows: 1.04 s/step against 2.04 s for the dense reference; on the tiny
# example 0.0126 s against 0.0166 s at 256 tokens, 0.88x at 128, even at 64; BENCHMARKS.md).
BLOCKSPARSE_FROM_TOKENS = 128


def _gpu_compute_capability(mesh) -> float | None:
    devices = mesh.devices.flat if mesh is not None else jax.devices()
    capability = getattr(next(iter(devices)), "compute_capability", None)
    try:
        return float(capability)
    except (TypeError, ValueError):
        return None


def _cudnn_loadable() -> bool:
    """Whether JAX finds the cuDNN library (a deviceless GPU plan may run without the CUDA libraries)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # not installed, or too old
        return False


def _cudnn_rules_out(model: ModelConfig | None, mesh, compute_dtype) -> str | None:
    """Why cuDNN flash attention cannot take this run (by its documented limits), or None."""
    if compute_dtype is None or jnp.dtype(compute_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "it needs bf16/fp16 compute"
    head_dim = model.head_dim if model is not None else 128
    if head_dim % 8 or head_dim > 128:
        return f"head_dim {head_dim} is not a multiple of 8 up to 128"
    capability = _gpu_compute_capability(mesh)
    if capability is not None and capability < 8.0:
        return f"compute capability {capability} < 8.0"
    if not _cudnn_loadable():
        return "the cuDNN library is not installed"
    return None


def resolve_attention_impl(requested: str, seq_len: int | None = None, decode: bool = False,
                           model: ModelConfig | None = None, *, mesh=None, compute_dtype=None) -> str:
    """`auto`: the kernel for the target devices (the mesh's, else JAX's default backend), chosen by what
    each kernel supports, never by a trial run: every fused kernel runs per shard under `shard_map`, so
    it works under any mesh. TPU: splash. GPU: cuDNN (bf16/fp16 compute, head_dim a multiple of 8 up to
    128, compute capability 8.0+, the cuDNN library installed), else Pallas. A kernel the model rules out
    (sliding windows, soft-caps) is skipped. Otherwise an XLA path: on CPU `xla_blocksparse` (blockwise,
    skipping the blocks a packed row masks, memory linear in the row) from BLOCKSPARSE_FROM_TOKENS on;
    elsewhere `xla_chunked` past 4096 tokens; else the reference. Decoding (KV cache, queries shorter
    than keys) always uses an XLA path."""
    from jaxsft.model.attention import model_rules_out, target_platform

    def rules_out(impl: str) -> str | None:  # the model's sliding windows / soft-caps
        if model is None:
            return None
        return model_rules_out(impl, any(w is not None for w, _ in model.layer_kinds),
                               model.attn_logit_softcap is not None)

    if requested != "auto":
        if decode and requested in ("cudnn", "pallas", "splash"):
            return "xla"  # fused kernels here are training-shaped; the decoder's cache needs T != S
        why = rules_out(requested)
        if why:
            raise ConfigError(f"attention_impl: {requested} cannot run this {model.family} model: {why}")
        return requested
    platform = target_platform(mesh)
    long_rows = seq_len is not None and seq_len >= BLOCKSPARSE_FROM_TOKENS
    if platform == "cpu":
        reference = "xla_blocksparse" if long_rows else "xla"
    else:  # GPU/TPU fallbacks: batched blocks, untested for speed there
        reference = "xla_chunked" if seq_len is not None and seq_len > 4096 else "xla"
    if decode:
        return reference
    candidates = {"gpu": ("cudnn", "pallas"), "cuda": ("cudnn", "pallas"), "tpu": ("splash",)}.get(platform, ())
    for impl in candidates:
        why_not = rules_out(impl) or (_cudnn_rules_out(model, mesh, compute_dtype) if impl == "cudnn" else None)
        if why_not is None:
            return impl
        logger.info("attention_impl auto: not %s (%s)", impl, why_not)
    return reference


@dataclasses.dataclass
class Model:
    """A model ready to run on the mesh."""
    config: ModelConfig
    runner: ModelRunner
    partition: Partition
    trainable: Flat
    frozen: Flat
    axes: Flat  # logical axes of every flat leaf

    def shardings(self, mesh) -> tuple[Flat, Flat]:
        t = tree_shardings(self.trainable, {k: self.axes[k] for k in self.trainable}, mesh)
        f = tree_shardings(self.frozen, {k: self.axes[k] for k in self.frozen}, mesh)
        return t, f

    def params(self) -> dict:
        return merge(self.trainable, self.frozen, self.partition)


@dataclasses.dataclass
class Trained:
    """The model a train stage trained, on its mesh: handed in memory to eval, predict and export."""
    model: Model
    mesh: Any


ROUTER = "layers/mlp/gate/kernel"  # the MoE router's leaf


def _partition(flat: Flat, cfg: Config, model_cfg: ModelConfig) -> Partition:
    if cfg.finetuning_type == "full":
        part = full_partition(flat)
    elif cfg.finetuning_type == "freeze":
        part = freeze_partition(flat, cfg, model_cfg.num_layers)
    else:
        from jaxsft.lora import lora_partition
        part = lora_partition(flat, cfg.additional_target)
    if model_cfg.is_moe and not cfg.train_router:  # the router stays as it is unless train_router
        part = dataclasses.replace(part, trainable=part.trainable - {ROUTER}, sliced=part.sliced - {ROUTER})
    return part


def aux_loss_coef(cfg: Config, model_cfg: ModelConfig) -> float:
    """The weight of an MoE's load-balancing loss, as LLaMA-Factory sets it: `moe_aux_loss_coef` when given,
    else config.json's router_aux_loss_coef when its output_router_logits is true (transformers then adds
    it), else 0. Dense models: 0."""
    if not model_cfg.is_moe:
        return 0.0
    if cfg.moe_aux_loss_coef is not None:
        return float(cfg.moe_aux_loss_coef)
    return model_cfg.router_aux_loss_coef if model_cfg.output_router_logits else 0.0


def _add_lora(params: dict, cfg: Config, model_cfg: ModelConfig, param_dtype) -> tuple[dict, float]:
    from jaxsft import lora

    if cfg.adapter_name_or_path and not cfg.create_new_adapter:
        params, scale = lora.load_peft_adapter(cfg.adapter_name_or_path, params, model_cfg)
        if lora.EXPERTS in lora.adapted_modules(params) and cfg.lora_dropout > 0:
            raise ConfigError(f"adapter_name_or_path {cfg.adapter_name_or_path} adapts the experts, where lora_dropout "
                              f"is not supported (PEFT refuses it too); set lora_dropout: 0")
        return params, scale
    if cfg.adapter_name_or_path:  # fold the old adapter in, then start a fresh one
        params, scale = lora.load_peft_adapter(cfg.adapter_name_or_path, params, model_cfg)
        params = lora.merge_adapters(params, scale)
    targets = lora.target_modules(params, cfg.lora_target)
    params = lora.add_adapters(params, targets, cfg.lora_rank, jax.random.key(cfg.seed), param_dtype)
    scale = lora.lora_scale(cfg.lora_alpha, cfg.lora_rank, cfg.use_rslora)
    if cfg.pissa_init:
        from jaxsft.lora_variants import pissa_init

        logger.info("PiSSA initialisation (%s)", f"{cfg.pissa_iter} power steps" if cfg.pissa_iter >= 0
                    else "exact SVD")
        params = pissa_init(params, scale, cfg.pissa_iter, jax.random.fold_in(jax.random.key(cfg.seed), 1))
    if cfg.use_dora:
        from jaxsft.lora_variants import add_dora_magnitudes

        params = add_dora_magnitudes(params, scale)
    return params, scale


def _abstract_params(cfg: Config, model_cfg: ModelConfig, param_dtype) -> tuple[dict, float | None]:
    """Shapes and dtypes of the run's params (fresh adapters for LoRA), from config.json alone."""
    from jaxsft import lora

    def build():
        params = init_params(model_cfg, jax.random.key(0), param_dtype)
        if cfg.finetuning_type == "lora":
            targets = lora.target_modules(params, cfg.lora_target)
            params = lora.add_adapters(params, targets, cfg.lora_rank, jax.random.key(cfg.seed), param_dtype)
        return params

    scale = lora.lora_scale(cfg.lora_alpha, cfg.lora_rank, cfg.use_rslora) if cfg.finetuning_type == "lora" else None
    return jax.eval_shape(build), scale


def load_model(cfg: Config, mesh, *, params: dict | None = None, abstract: bool = False) -> Model:
    """Read the HF checkpoint (or take `params`), add adapters, split and place on the mesh.

    `abstract`: no weights are read; trainable and frozen hold `jax.ShapeDtypeStruct`s with their
    shardings on the mesh (ahead-of-time compilation, `--compile_for`); LoRA adapters are fresh."""
    model_cfg = load_hf_config(cfg.model_name_or_path)
    check_expert_axis(mesh, model_cfg.num_experts)
    param_dtype = DTYPES[cfg.param_dtype]
    lora_scale = None
    if abstract:
        params, lora_scale = _abstract_params(cfg, model_cfg, param_dtype)
    else:
        if params is None:
            params = load_hf_params(cfg.model_name_or_path, model_cfg, dtype=param_dtype)
        if cfg.finetuning_type == "lora":
            params, lora_scale = _add_lora(params, cfg, model_cfg, param_dtype)
        elif cfg.adapter_name_or_path:
            from jaxsft import lora
            params = lora.merge_adapters(*lora.load_peft_adapter(cfg.adapter_name_or_path, params, model_cfg))
    flat = flatten(params)
    axes = flatten(param_logical_axes(params))
    partition = _partition(flat, cfg, model_cfg)
    trainable, frozen = jax.eval_shape(lambda f: split(f, partition), flat) if abstract else split(flat, partition)
    attention_impl = resolve_attention_impl(cfg.attention_impl, cfg.cutoff_len, model=model_cfg, mesh=mesh,
                                            compute_dtype=DTYPES[cfg.compute_dtype])
    if cfg.attention_impl == "auto":
        logger.info("attention_impl auto: %s", attention_impl)
    runner = ModelRunner(model_cfg, partition, attention_impl=attention_impl, mesh=mesh,
                         loss_chunk=cfg.loss_chunk_size, remat_policy=cfg.remat_policy,
                         compute_dtype=DTYPES[cfg.compute_dtype],
                         lora_scale=lora_scale, lora_dropout=cfg.lora_dropout if lora_scale is not None else 0.0,
                         aux_loss_coef=aux_loss_coef(cfg, model_cfg), neftune_alpha=cfg.neftune_noise_alpha or 0.0)
    model = Model(model_cfg, runner, partition, trainable, frozen, axes)
    t_shard, f_shard = model.shardings(mesh)
    if abstract:
        def place(x, sharding):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        model.trainable = jax.tree_util.tree_map(place, trainable, t_shard)
        model.frozen = jax.tree_util.tree_map(place, frozen, f_shard)
    else:
        model.trainable = jax.device_put(trainable, t_shard)
        model.frozen = jax.device_put(frozen, f_shard)
    logger.info(partition.describe(flat))
    return model


def restore_checkpoint_params(model: Model, mesh, directory, step: int) -> Model:
    """`model` with the trainable and frozen params of jaxsft checkpoint `step` in `directory` (no optimizer)."""
    from jaxsft.checkpoint import Checkpoints

    t_shard, f_shard = model.shardings(mesh)
    abstract = lambda tree, shard: {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k])  # noqa: E731
                                    for k, v in tree.items()}
    checkpoints = Checkpoints(directory, async_save=False)
    try:
        model.trainable, model.frozen = checkpoints.restore_params(step, abstract(model.trainable, t_shard),
                                                                   abstract(model.frozen, f_shard))
    finally:
        checkpoints.close()
    logger.info("params of %s/checkpoint_%d", directory, step)
    return model


def load_model_for(cfg: Config, mesh, trained: Trained | None, checkpoint) -> Model:
    """The model eval and predict run: the one trained in this run, else `model_name_or_path`
    (+ `adapter_name_or_path`) with the params of `checkpoint` ((directory, step) or None)."""
    if trained is not None:
        return trained.model
    model = load_model(cfg, mesh)
    return model if checkpoint is None else restore_checkpoint_params(model, mesh, *checkpoint)


def check_token_ids(splits: dict, vocab_size: int, model_path: str) -> None:
    """Token ids past the embedding table would be clamped silently by the gather: refuse them.
    `splits` maps a name ("train", "eval", "predict") to a list of (ids, labels) examples or None."""
    for name, examples in splits.items():
        top = max((int(ids.max()) for ids, _ in examples or [] if len(ids)), default=-1)
        if top >= vocab_size:
            raise ConfigError(f"{name} data holds token id {top} but the model at {model_path} has only "
                              f"{vocab_size} embeddings: the template added tokens the tokenizer lacked "
                              f"(see the warning above); use a template whose special tokens the model knows")


def build_mesh(cfg: Config):
    return make_mesh(cfg.mesh)


def rows_per_process(cfg: Config, mesh, per_device: int) -> int:
    """Rows each process feeds per micro-batch: per-device batch x data-parallel devices / processes."""
    from jaxsft.sharding import data_parallel_size

    global_rows = per_device * data_parallel_size(mesh)
    if global_rows % jax.process_count():
        raise ConfigError(f"batch of {global_rows} rows does not split over {jax.process_count()} processes")
    return global_rows // jax.process_count()


def is_main_process() -> bool:
    return jax.process_index() == 0


def host_array(x: Any) -> np.ndarray:
    """A global array as numpy on every process (all-gathers across hosts when needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
