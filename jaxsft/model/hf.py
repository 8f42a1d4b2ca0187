"""Hugging Face checkpoints <-> the param tree: config.json and safetensors, tensor by tensor.

Only safetensors are read; pickled `.bin` checkpoints are refused (loading pickle runs code).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxsft.config import hub_offline
from jaxsft.errors import InputError, MissingPath
from jaxsft.model.config import ModelConfig
from jaxsft.model.transformer import init_params

INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
# Buffers some older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded unless HF_HUB_OFFLINE is set."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if hub_offline():
        raise MissingPath(
            f"{name_or_path!s} is not a local directory and HF_HUB_OFFLINE is set, so it cannot be "
            "downloaded; pass a local checkpoint directory or unset HF_HUB_OFFLINE"
        )
    from huggingface_hub import snapshot_download

    from jaxsft.hub import cached_snapshot, hub_endpoint, hub_unreachable

    why = hub_unreachable()
    if why is not None:  # no 30 s of retries: the cached copy, or one line
        cached = cached_snapshot(str(name_or_path), HUB_PATTERNS)
        if cached is None:
            raise MissingPath(f"{name_or_path!s} is not a local directory, not in the Hugging Face cache, and the "
                              f"hub ({hub_endpoint()}) cannot be reached ({why}); download it where there is network "
                              f"and pass its local directory")
        logging.getLogger("jaxsft").warning("the hub (%s) cannot be reached (%s): using the cached copy of %s",
                                            hub_endpoint(), why, name_or_path)
        return Path(cached)
    return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS))


def load_hf_config(name_or_path: str | os.PathLike) -> ModelConfig:
    path = resolve_model_path(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingPath(f"no config.json in {path}")
    return ModelConfig.from_hf(json.loads(config_file.read_text()))


def _leaf_paths(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every leaf the tree must hold for cfg (no arrays are made)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def _hf_name(path: tuple[str, ...], layer: int | None, prefix: str = "model.", expert: int | None = None,
             cfg: ModelConfig | None = None) -> tuple[str, bool]:
    """HF tensor name of one (per-layer, per-expert) leaf, and whether it is stored transposed ([out, in]).
    `prefix` is where the decoder sits in the checkpoint (`model.`, or `language_model.model.` in a
    multimodal one, whose lm_head is then `language_model.lm_head`). MoE experts are stored one tensor per
    expert (`mlp.experts.N.gate_proj`; Mixtral's `block_sparse_moe.experts.N.w1`), as transformers saves them."""
    *modules, leaf = path
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    if modules == ["lm_head"]:
        return prefix.removesuffix("model.") + "lm_head.weight", True
    if modules[0] == "layers":
        modules = ["layers", str(layer), *modules[1:]]
    if cfg is not None and cfg.is_moe and modules[0] == "layers" and modules[2] == "mlp":
        modules[2] = cfg.moe_block
        if modules[3] == "experts":
            modules[4:5] = [str(expert), cfg.expert_names[("gate_proj", "up_proj", "down_proj").index(modules[4])]]
    return prefix + ".".join([*modules, suffix]), leaf == "kernel"


def _experts(path: tuple[str, ...], cfg: ModelConfig) -> list[int | None]:
    return list(range(cfg.num_experts)) if "experts" in path else [None]


def _canonical_name(name: str, cfg: ModelConfig) -> str:
    """A multimodal checkpoint saved with transformers' in-memory names (`model.language_model.*`) read as the
    on-disk layout (`language_model.model.*`)."""
    if cfg.peft_prefix != cfg.hf_prefix and name.startswith(cfg.peft_prefix):
        return cfg.hf_prefix + name[len(cfg.peft_prefix):]
    if cfg.peft_prefix != cfg.hf_prefix and name == "lm_head.weight":
        return cfg.hf_prefix.removesuffix("model.") + "lm_head.weight"
    return name


def is_other_tower(name: str, cfg: ModelConfig) -> bool:
    """Tensors of a multimodal checkpoint outside the text decoder (vision tower, projector): not trained,
    carried through export as they are."""
    if cfg.hf_prefix == "model.":
        return False
    name = _canonical_name(name, cfg)
    return not name.startswith(cfg.hf_prefix.removesuffix("model."))


def _hf_index(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """HF name -> (tree path, index into the leaf (layer, then expert, where stacked), transposed)."""
    index = {}
    for path in _leaf_paths(cfg):
        layers = range(cfg.num_layers) if path[0] == "layers" else [None]
        for i in layers:
            for e in _experts(path, cfg):
                name, transposed = _hf_name(path, i, cfg.hf_prefix, e, cfg)
                index[name] = (path, tuple(j for j in (i, e) if j is not None), transposed)
    return index


def _safetensors_files(path: Path) -> list[Path]:
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingPath(f"{index_file} lists shard(s) that are not there: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" It has {', '.join(pickles)}: pickled PyTorch weights are not loaded (unpickling runs code); "
            "convert them to safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out, safe_serialization=True)` in a trusted environment."
            if pickles
            else ""
        )
        raise MissingPath(f"no *.safetensors in {path}.{hint}")
    return files


def _host_device() -> jax.Device:
    # local_devices: in a multi-process run, device 0 may belong to another process.
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes cpu: read through the default device instead
        return jax.local_devices()[0]


def _tree_set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf_params(name_or_path: str | os.PathLike, cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Param tree of host numpy arrays in `dtype`, read one tensor at a time into preallocated
    stacked arrays (host memory stays near one copy of the model). Place it on devices with
    `jax.device_put(params, shardings)`."""
    path = resolve_model_path(name_or_path)
    np_dtype = np.dtype(dtype)
    index = _hf_index(cfg)
    params: dict = {}
    for leaf_path, shape in _leaf_paths(cfg).items():
        _tree_set(params, leaf_path, np.empty(shape, np_dtype))
    seen: dict[str, Path] = {}
    # numpy arrays straight from the file (bf16 through ml_dtypes): no device arrays, no extra copy
    for file in _safetensors_files(path):
        with safe_open(file, framework="numpy") as f:
            for stored in f.keys():
                name = _canonical_name(stored, cfg)
                lm_head = _hf_name(("lm_head", "kernel"), None, cfg.hf_prefix)[0]
                if (name.endswith(_IGNORED_SUFFIXES) or (name == lm_head and cfg.tie_word_embeddings)
                        or is_other_tower(name, cfg)):
                    continue
                if name not in index:
                    raise InputError(
                        f"{file}: unexpected tensor {name!r} for a {cfg.family} model with "
                        f"{cfg.num_layers} layers (tie_word_embeddings={cfg.tie_word_embeddings})"
                    )
                if name in seen:
                    raise InputError(f"{file}: tensor {name!r} was already read from {seen[name]}")
                leaf_path, at, transposed = index[name]
                target = params
                for key in leaf_path:
                    target = target[key]
                slot = target[at] if at else target
                value = np.asarray(f.get_tensor(stored))
                if transposed:
                    value = value.T
                if value.shape != slot.shape:
                    raise InputError(
                        f"{file}: tensor {name!r} has shape {value.shape[::-1] if transposed else value.shape}, "
                        f"expected {slot.shape[::-1] if transposed else slot.shape} from config.json"
                    )
                slot[...] = value
                seen[name] = file
    missing = sorted(set(index) - set(seen))
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise InputError(f"{path}: checkpoint is missing tensor(s): {shown}")
    return params


def other_tower_tensors(name_or_path: str | os.PathLike, cfg: ModelConfig, np_dtype) -> dict[str, np.ndarray]:
    """The source checkpoint's tensors outside the text decoder (a multimodal model's vision tower and
    projector), as stored, cast to `np_dtype`; empty for text-only families."""
    if cfg.hf_prefix == "model.":
        return {}
    out = {}
    for file in _safetensors_files(resolve_model_path(name_or_path)):
        with safe_open(file, framework="numpy") as f:  # bf16 through ml_dtypes, as load_hf_params reads
            for name in f.keys():
                if is_other_tower(name, cfg):
                    out[name] = np.asarray(f.get_tensor(name)).astype(np_dtype)
    return out


def params_to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names and shapes ([out, in] linear weights), as host numpy arrays in the params'
    dtype. Adapters must be merged first."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    state = {}
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        if path[-1] in ("lora_a", "lora_b", "lora_magnitude"):
            raise ValueError(f"params hold LoRA adapter {'/'.join(path)}; merge adapters before export")
        value = np.asarray(leaf)
        layers = range(cfg.num_layers) if path[0] == "layers" else [None]
        for i in layers:
            for e in _experts(path, cfg):
                name, transposed = _hf_name(path, i, cfg.hf_prefix, e, cfg)
                at = tuple(j for j in (i, e) if j is not None)
                tensor = value[at] if at else value
                state[name] = np.ascontiguousarray(tensor.T if transposed else tensor)
    return state
