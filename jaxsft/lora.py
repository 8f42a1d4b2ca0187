"""LoRA as param-tree transforms: add adapters, choose what trains, merge, and PEFT adapter I/O.

Adapters live beside the kernel they adapt (docs/internals.md): `lora_a [L, in, r]`, `lora_b
[L, r, out]`; the model's `dense` adds `scale * (x @ A) @ B`. PEFT stores the same matrices as
`lora_A.weight [r, in]` and `lora_B.weight [out, r]` per layer, so the mapping is a transpose.

Routed MoE experts (opt-in: `experts` in `lora_target`) are adapted as PEFT adapts transformers' fused
3-D expert parameters (`LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`):
per expert, one LoRA on the fused [gate | up] projection (so gate and up share A) and one on down_proj:
`experts/gate_up_proj/{lora_a [L, E, D, r], lora_b [L, E, r, 2F]}` (no kernel: it adds to gate_proj's and
up_proj's outputs) and `experts/down_proj/{lora_a [L, E, F, r], lora_b [L, E, r, D]}` beside its kernel.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxsft.config import ConfigError
from jaxsft.errors import InputError, MissingPath
from jaxsft.model.config import ModelConfig
from jaxsft.model.families import ALL_LINEAR_MODULES
from jaxsft.model.hf import is_other_tower, params_to_hf_state_dict
from jaxsft.model.layers import dora_column_norm
from jaxsft.params import LAYERS, Flat, Partition

ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude")  # lora_magnitude [L, out]: DoRA only
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_ORDER = ALL_LINEAR_MODULES  # the family table's module names, in HF order (for messages and `all`)
MOE_NOT_ADAPTED = ("experts", "gate", "shared_expert_gate")
EXPERTS = "experts"  # the lora_target name of the routed experts (not part of `all`, as in PEFT's all-linear)
EXPERT_GATE_UP = "gate_up_proj"  # the adapter-only node of the fused [gate | up] expert projection
# PEFT's target_parameters, in the order transformers registers them (which fixes PEFT's nesting).
PEFT_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_PEFT_EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(base_layer\.)?lora_([AB])\.weight")
_PEFT_LORA_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(?:lora_([AB])\.weight|lora_magnitude_(vector))")


def _linear_modules(params: dict) -> dict[str, tuple[str, ...]]:
    """Module name -> tree path of every per-layer linear layer (a dict with a `kernel`), in HF's order.
    lm_head is not among them: it sits outside the layer stack, as PEFT's `all-linear` leaves it out.
    Nor are an MoE's router (`gate`), shared-expert gate and routed experts (those are the opt-in
    target `experts`, see `expert_path`); a shared expert's projections are."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(node: dict, path: tuple[str, ...]):
        for key, value in node.items():
            if key in MOE_NOT_ADAPTED:
                continue
            if isinstance(value, dict):
                if "kernel" in value:
                    found[key] = path + (key,)
                else:
                    walk(value, path + (key,))

    walk(params[LAYERS], (LAYERS,))
    order = {name: i for i, name in enumerate(_HF_ORDER)}
    return {name: found[name] for name in sorted(found, key=lambda n: (order.get(n, len(order)), n))}


def csv_names(text: str | list[str] | None) -> list[str]:
    items = text if isinstance(text, (list, tuple)) else (text or "").split(",")
    return list(dict.fromkeys(t.strip() for t in items if t.strip()))


def expert_path(params: dict) -> tuple[str, ...] | None:
    """Tree path of the routed experts (`layers/mlp/experts`), or None for a dense model."""
    mlp = params.get(LAYERS, {}).get("mlp", {})
    return (LAYERS, "mlp", EXPERTS) if EXPERTS in mlp else None


def target_modules(params: dict, lora_target: str) -> list[str]:
    """Module names LoRA adapts: `all` (every linear layer but lm_head, i.e. PEFT's `all-linear`) or a
    comma list such as `q_proj,v_proj`; `experts` (alone or beside them, e.g. `all,experts`) adds the
    routed experts of an MoE model."""
    available = _linear_modules(params)
    names = csv_names(lora_target)
    if not names:
        raise ConfigError("lora_target is empty; use 'all' or a comma list of modules, e.g. q_proj,v_proj")
    experts = [EXPERTS] if EXPERTS in names else []
    if experts and expert_path(params) is None:
        raise ConfigError("lora_target: 'experts' names the routed experts of a mixture-of-experts model; "
                          "this model has none")
    names = [n for n in names if n != EXPERTS]
    if "all" in names:
        return list(available) + experts
    for name in names:
        if name not in available:
            hint = (f"; LoRA on {name} is not supported, train it fully with additional_target: {name}"
                    if name in ("lm_head", "embed_tokens") else "")
            raise ConfigError(f"lora_target: module '{name}' not found in the model; choose 'all' or from "
                              f"{', '.join(available)}{hint}")
    return [name for name in available if name in names] + experts


def _get(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _copy(tree: dict) -> dict:
    """New dicts all the way down, same leaves (so transforms never mutate their input)."""
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def has_adapters(params: dict) -> bool:
    return any(path[-1].key in ADAPTER_LEAVES for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def add_adapters(params: dict, targets: list[str], rank: int, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Fresh adapters beside each target kernel, initialised as PEFT does: A ~ kaiming_uniform(a=sqrt(5))
    on the [r, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in)) (drawn directly in our [in, r] layout), B = 0,
    so the adapted model starts equal to the base model."""
    if rank <= 0:
        raise ConfigError(f"lora_rank must be > 0, got {rank}")
    available = _linear_modules(params)
    out = _copy(params)
    for i, name in enumerate(targets):
        if name == EXPERTS and expert_path(out) is not None:
            _add_expert_adapters(_get(out, expert_path(out)), rank, jax.random.fold_in(rng, i), dtype)
            continue
        if name not in available:
            raise ConfigError(f"LoRA target '{name}' not found; choose from {', '.join(available)}")
        module = _get(out, available[name])
        if "lora_a" in module:
            raise ValueError(f"{'/'.join(available[name])} already holds an adapter; merge it first")
        L, fan_in, fan_out = module["kernel"].shape
        bound = 1.0 / math.sqrt(fan_in)
        a_LIR = jax.random.uniform(jax.random.fold_in(rng, i), (L, fan_in, rank), jnp.float32, -bound, bound)
        module["lora_a"] = a_LIR.astype(dtype)
        module["lora_b"] = jnp.zeros((L, rank, fan_out), dtype)
    return out


def _add_expert_adapters(experts: dict, rank: int, rng: jax.Array, dtype) -> None:
    """Per-expert adapters on the fused [gate | up] projection and on down_proj, initialised as PEFT's
    ParamWrapper does (A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0)."""
    if "lora_a" in experts["down_proj"]:
        raise ValueError("the experts already hold adapters; merge them first")
    L, E, D, F = experts["gate_proj"]["kernel"].shape
    for j, (node, fan_in, fan_out) in enumerate(((EXPERT_GATE_UP, D, 2 * F), ("down_proj", F, D))):
        bound = 1.0 / math.sqrt(fan_in)
        a_LEIR = jax.random.uniform(jax.random.fold_in(rng, j), (L, E, fan_in, rank), jnp.float32, -bound, bound)
        module = experts.setdefault(node, {})
        module["lora_a"] = a_LEIR.astype(dtype)
        module["lora_b"] = jnp.zeros((L, E, rank, fan_out), dtype)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _hf_module(modules: tuple[str, ...]) -> str:
    """HF module name of a tree module path, with `N` for the layer index: model.layers.N.mlp.up_proj."""
    if modules[0] == "lm_head":
        return "lm_head"
    if modules[0] == LAYERS:
        return "model.layers.N." + ".".join(modules[1:])
    return "model." + ".".join(modules)


def saved_module_paths(paths, name: str) -> set[str]:
    """Leaf paths of the modules a PEFT `modules_to_save` entry selects: PEFT keeps every module whose
    name ends with it, so `norm` means the final norm and every layer norm, as in LLaMA-Factory."""
    return {p for p in paths if p.rsplit("/", 1)[-1] not in ADAPTER_LEAVES
            and _hf_module(tuple(p.split("/")[:-1])).endswith(name)}


def lora_partition(flat: Flat, additional_target: str | list[str] | None = None) -> Partition:
    """Adapters train, and so do the modules named in `additional_target` (whole, e.g. embed_tokens,
    lm_head; matched like PEFT's modules_to_save); every other leaf is frozen."""
    adapters = {p for p in flat if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES}
    if not adapters:
        raise ValueError("params hold no LoRA adapters; call add_adapters (or load_peft_adapter) first")
    adapted = {p.rsplit("/", 1)[0] for p in adapters}
    extra: set[str] = set()
    for name in csv_names(additional_target):
        if name == "lm_head" and "lm_head/kernel" not in flat and "embed_tokens/embedding" in flat:
            raise ConfigError("additional_target: this model ties lm_head to embed_tokens (tie_word_embeddings); "
                              "name embed_tokens, which trains both")
        matched = saved_module_paths(flat, name)
        if not matched:
            modules = sorted({p.split("/")[-2] for p in flat if p.rsplit("/", 1)[-1] not in ADAPTER_LEAVES})
            raise ConfigError(f"additional_target: module '{name}' not found; choose from {', '.join(modules)}")
        both = sorted({p.rsplit("/", 1)[0] for p in matched} & adapted)
        if both:
            raise ConfigError(f"additional_target: '{name}' selects {', '.join(both)}, which LoRA adapts; a module "
                              f"is either adapted (lora_target) or fully trained (additional_target), not both")
        extra |= matched
    return Partition(trainable=frozenset(adapters | extra))


def merge_adapters(params: dict, scale: float) -> dict:
    """Fold `scale * A @ B` (DoRA: and the magnitudes) into each adapted kernel (in fp32, stored back in the kernel's dtype) and
    drop the adapters. A tree without adapters comes back unchanged."""
    out = _copy(params)
    path = expert_path(out)
    if path is not None and EXPERT_GATE_UP in _get(out, path):  # fused [gate | up] delta, split in two
        experts = _get(out, path)
        node = experts.pop(EXPERT_GATE_UP)
        delta = jnp.einsum("leir,lero->leio", jnp.asarray(node["lora_a"], jnp.float32),
                           jnp.asarray(node["lora_b"], jnp.float32), precision=jax.lax.Precision.HIGHEST)
        for name, part in zip(("gate_proj", "up_proj"), jnp.split(delta, 2, axis=-1)):
            kernel = experts[name]["kernel"]
            experts[name]["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * part).astype(kernel.dtype)

    def walk(node: dict):
        for value in node.values():
            if isinstance(value, dict):
                if "lora_a" in value:
                    kernel = value["kernel"]
                    a, b = value.pop("lora_a"), value.pop("lora_b")
                    delta_LIO = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                           precision=jax.lax.Precision.HIGHEST)
                    merged_LIO = jnp.asarray(kernel, jnp.float32) + scale * delta_LIO
                    if "lora_magnitude" in value:  # DoRA: columns rescaled to the learned magnitudes
                        norm_LO = dora_column_norm(kernel, a, b, scale)
                        merged_LIO = merged_LIO * (jnp.asarray(value.pop("lora_magnitude"), jnp.float32)
                                                   / norm_LO)[:, None, :]
                    value["kernel"] = merged_LIO.astype(kernel.dtype)
                walk(value)

    walk(out)
    return out


# --- PEFT adapter files -----------------------------------------------------------------------------

def _module_path(params: dict, hf_module: str) -> tuple[str, ...] | None:
    """`model.layers.3.self_attn.q_proj` -> (layers, self_attn, q_proj) when params hold it (layer dropped)."""
    parts = hf_module.split(".")
    if parts[:1] == ["model"]:
        parts = parts[1:]
    if parts[:1] == [LAYERS] and len(parts) > 2 and parts[1].isdigit():
        parts = [LAYERS, *parts[2:]]
    node = params
    for key in parts:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return tuple(parts) if isinstance(node, dict) else None


def read_adapter_config(path: Path) -> dict:
    config_file = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise MissingPath(f"adapter {path} does not exist: give a PEFT adapter directory ({ADAPTER_CONFIG} + "
                          f"{ADAPTER_WEIGHTS})")
    if not config_file.is_file():
        raise MissingPath(f"{path} is not a PEFT adapter directory: no {ADAPTER_CONFIG}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{config_file}: peft_type {config['peft_type']!r} is not supported (only LORA)")
    unsupported = {
        "bias": ("none", None), "fan_in_fan_out": (False, None),
        "lora_bias": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
        "layers_to_transform": (None,), "layer_replication": (None,),
        "trainable_token_indices": (None,), "use_qalora": (False, None),
    }
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa"):
        raise InputError(f"{config_file}: init_lora_weights={init!r}: an unconverted PiSSA adapter applies to a residual "
                         f"base that PEFT recomputes on load, which jaxsft does not do; load the converted adapter "
                         f"(LLaMA-Factory's and jaxsft's `pissa_converted` directory, written with pissa_convert: true)")
    if config.get("target_parameters") and sorted(config["target_parameters"]) != sorted(PEFT_EXPERT_PARAMETERS):
        raise InputError(f"{config_file}: target_parameters={config['target_parameters']!r} is not supported by jaxsft "
                         f"(supported: {list(PEFT_EXPERT_PARAMETERS)!r}, LoRA on the routed experts); merge this "
                         f"adapter with PEFT first")
    for key, allowed in unsupported.items():
        if config.get(key, allowed[0]) not in allowed:
            raise InputError(f"{config_file}: {key}={config[key]!r} is not supported by jaxsft "
                             f"(supported: {allowed[0]!r}); merge this adapter with PEFT first")
    return config


def adapter_scale(adapter_config: dict) -> float:
    """The scale a PEFT adapter_config.json implies (PEFT's lora_alpha default is 8)."""
    return lora_scale(float(adapter_config.get("lora_alpha", 8)), int(adapter_config["r"]),
                      bool(adapter_config.get("use_rslora", False)))


def check_adapter_dir(path: str | os.PathLike) -> tuple[Path, dict]:
    """`adapter_name_or_path` checked before any weights load: one directory, with an adapter_config.json
    jaxsft applies and safetensors weights. Returns the directory and its config."""
    path = Path(path).expanduser()
    if "," in str(path) and not path.exists():
        raise ConfigError(f"adapter_name_or_path {str(path)!r}: pass one adapter directory (several "
                         "comma-separated adapters are not supported)")
    config = read_adapter_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = " (adapter_model.bin holds pickled weights, which are not loaded: unpickling runs code)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise MissingPath(f"no {ADAPTER_WEIGHTS} in {path}{pickled}")
    return path, config


def load_peft_adapter(path: str | os.PathLike, params: dict, model_cfg: ModelConfig,
                      dtype=None) -> tuple[dict, float]:
    """Read a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into the tree:
    adapters beside their kernels (in the kernel's dtype unless `dtype`), `modules_to_save` weights in
    place of the base ones. Returns (params, lora scale)."""
    path, config = check_adapter_dir(path)
    weights = path / ADAPTER_WEIGHTS
    if has_adapters(params):
        raise ValueError("params already hold LoRA adapters; merge them (merge_adapters) before loading another")
    rank, scale = int(config["r"]), adapter_scale(config)
    L = model_cfg.num_layers

    out = _copy(params)
    pieces: dict[tuple[tuple[str, ...], str], dict[int, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    expert_pieces: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu), safe_open(weights, framework="flax") as f:  # flax reads bf16
        for name in f.keys():
            short = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            if is_other_tower(short, model_cfg):  # PEFT matched a module name in the vision tower too
                raise InputError(f"{weights}: tensor {name!r} adapts the model's vision tower or projector, which "
                                 f"jaxsft carries through unchanged (it trains and merges the language model only); "
                                 f"use an adapter of the language model alone (as LLaMA-Factory trains them), or "
                                 f"merge this one with PEFT")
            if short.startswith(model_cfg.peft_prefix):  # a multimodal model's text tower: as a text model's
                short = "model." + short[len(model_cfg.peft_prefix):]
            expert = _PEFT_EXPERT_NAME.fullmatch(short)
            if expert is not None and config.get("target_parameters"):
                node = EXPERT_GATE_UP if expert[2] else "down_proj"  # gate_up_proj is the inner wrapper
                expert_pieces.setdefault((node, expert[3]), {})[int(expert[1])] = np.asarray(f.get_tensor(name))
                continue
            match = _PEFT_LORA_NAME.fullmatch(short)
            if match is None:
                saved[short] = np.asarray(f.get_tensor(name))
                continue
            layer, module, which = int(match[1]), match[2], match[3] or "M"  # M: DoRA's magnitude
            module_path = _module_path(out, f"model.layers.{layer}.{module}")
            if module_path is None or "kernel" not in _get(out, module_path) or layer >= L:
                raise InputError(f"{weights}: tensor {name!r} names no linear layer of this {model_cfg.family} "
                                 f"model ({L} layers); was the adapter trained on another model?")
            pieces.setdefault((module_path, which), {})[layer] = np.asarray(f.get_tensor(name))

    for (module_path, which), by_layer in pieces.items():
        missing = sorted(set(range(L)) - set(by_layer))
        if missing:
            raise InputError(f"{weights}: lora_{which} of {'.'.join(module_path[1:])} is missing for layer(s) "
                             f"{missing}; adapters on a subset of layers are not supported")
        module = _get(out, module_path)
        _, fan_in, fan_out = module["kernel"].shape
        want = {"A": (rank, fan_in), "B": (fan_out, rank), "M": (fan_out,)}[which]
        for layer, value in by_layer.items():
            if value.shape != want:
                raise InputError(f"{weights}: layer {layer} {'.'.join(module_path[1:])}.lora_{which} has shape "
                                 f"{value.shape}, expected {want} (r={rank} from {ADAPTER_CONFIG})")
        stacked = np.stack([by_layer[i].T for i in range(L)])
        leaf = {"A": "lora_a", "B": "lora_b", "M": "lora_magnitude"}[which]
        module[leaf] = jnp.asarray(stacked, dtype or module["kernel"].dtype)
    for module_path, which in pieces:
        need = ("A", "B", "M") if config.get("use_dora") else ("A", "B")
        for other in need:
            if (module_path, other) not in pieces:
                name = "lora_magnitude_vector" if other == "M" else f"lora_{other}"
                raise InputError(f"{weights}: {'.'.join(module_path[1:])} has adapter weights but no {name}")

    if config.get("target_parameters"):
        _load_expert_adapters(out, expert_pieces, rank, L, weights, dtype)
    if saved:
        _load_modules_to_save(out, saved, model_cfg, config, weights)
    return out, scale


def _load_expert_adapters(out: dict, pieces: dict[tuple[str, str], dict[int, np.ndarray]], rank: int, L: int,
                          weights: Path, dtype) -> None:
    """The experts' adapters of a PEFT target_parameters adapter (layout: `_peft_expert_state`) into the tree."""
    path = expert_path(out)
    if path is None:
        raise InputError(f"{weights}: the adapter targets expert parameters but this model has no routed experts")
    experts = _get(out, path)
    _, E, D, F = experts["gate_proj"]["kernel"].shape
    shapes = {EXPERT_GATE_UP: (D, 2 * F), "down_proj": (F, D)}
    for node, (fan_in, fan_out) in shapes.items():
        want = {"A": (E * rank, fan_in), "B": (fan_out, rank * E)}
        for which in ("A", "B"):
            by_layer = pieces.get((node, which), {})
            if sorted(by_layer) != list(range(L)):
                raise InputError(f"{weights}: lora_{which} of mlp.experts.{node} is missing for layer(s) "
                                 f"{sorted(set(range(L)) - set(by_layer))}")
            for layer, value in by_layer.items():
                if value.shape != want[which]:
                    raise InputError(f"{weights}: layer {layer} mlp.experts.{node} lora_{which} has shape "
                                     f"{value.shape}, expected {want[which]} (E={E}, r={rank})")
        dtype_ = dtype or experts["down_proj"]["kernel"].dtype
        a = np.stack([pieces[(node, "A")][i].reshape(E, rank, fan_in).transpose(0, 2, 1) for i in range(L)])
        b = np.stack([pieces[(node, "B")][i].reshape(fan_out, rank, E).transpose(2, 1, 0) for i in range(L)])
        experts.setdefault(node, {}).update(lora_a=jnp.asarray(a, dtype_), lora_b=jnp.asarray(b, dtype_))


def _load_modules_to_save(out: dict, saved: dict[str, np.ndarray], model_cfg: ModelConfig, config: dict,
                          weights: Path) -> None:
    """Put PEFT `modules_to_save` tensors (HF names) in place of the base weights."""
    if model_cfg.tie_word_embeddings and ("lm_head.weight" in saved or "model.embed_tokens.weight" in saved):
        if not config.get("ensure_weight_tying", False):
            raise InputError(f"{weights}: the model ties lm_head to embed_tokens but this adapter saves an untied "
                             "copy (ensure_weight_tying is false); merge it with PEFT, then load the merged model")
        embed, head = saved.pop("model.embed_tokens.weight", None), saved.pop("lm_head.weight", None)
        if embed is not None and head is not None and not np.array_equal(embed, head):
            raise InputError(f"{weights}: tied embed_tokens and lm_head copies differ")
        saved["model.embed_tokens.weight"] = embed if embed is not None else head
    for name, value in saved.items():
        module, _, suffix = name.rpartition(".")
        layered = re.fullmatch(r"model\.layers\.(\d+)\..+", module)
        module_path = _module_path(out, module)
        node = None if module_path is None else _get(out, module_path)
        leaf = {"bias": "bias"}.get(suffix) or next((k for k in ("kernel", "scale", "embedding")
                                                     if node is not None and k in node), None)
        if node is None or leaf is None or leaf not in node:
            raise InputError(f"{weights}: tensor {name!r} is neither a LoRA weight nor a weight of this "
                             f"{model_cfg.family} model")
        value = value.T if leaf == "kernel" else value
        current = node[leaf]
        want = current.shape[1:] if layered else current.shape
        if value.shape != want:
            raise InputError(f"{weights}: {name!r} has shape {value.shape}, expected {want}")
        if layered:
            updated = np.array(current)
            updated[int(layered[1])] = value
            node[leaf] = jnp.asarray(updated, current.dtype)
        else:
            node[leaf] = jnp.asarray(value, current.dtype)


def _experts_adapted(params: dict) -> bool:
    path = expert_path(params)
    return path is not None and EXPERT_GATE_UP in _get(params, path)


def adapted_modules(params: dict) -> list[str]:
    """Names of the modules that hold adapters, in tree order (`experts` last, for the routed experts)."""
    return ([name for name, path in _linear_modules(params).items() if "lora_a" in _get(params, path)]
            + ([EXPERTS] if _experts_adapted(params) else []))


def adapter_rank(params: dict) -> int:
    """The rank of the adapters the params hold (they all share one)."""
    modules = _linear_modules(params)
    ranks = {_get(params, modules[n])["lora_a"].shape[-1] for n in adapted_modules(params) if n != EXPERTS}
    if _experts_adapted(params):
        experts = _get(params, expert_path(params))
        ranks |= {experts[n]["lora_a"].shape[-1] for n in (EXPERT_GATE_UP, "down_proj")}
    if len(ranks) != 1:
        raise ValueError(f"expected adapters of one rank, found ranks {sorted(ranks) or 'none'}")
    return ranks.pop()


def peft_state_dict(params: dict, model_cfg: ModelConfig, modules_to_save: list[str] | tuple = (),
                    dtype=None) -> dict[str, np.ndarray]:
    """PEFT's tensor names and shapes for the adapters (`lora_A.weight [r, in]`, `lora_B.weight [out, r]`
    per layer) and for the fully trained `modules_to_save`, as host numpy arrays."""
    cast = (lambda x: np.asarray(x).astype(dtype)) if dtype is not None else np.asarray
    state: dict[str, np.ndarray] = {}
    modules = _linear_modules(params)
    if _experts_adapted(params):
        state.update(_peft_expert_state(params, model_cfg, cast))
    for name in adapted_modules(params):
        if name == EXPERTS:
            continue
        module = _get(params, modules[name])
        a_LIR, b_LRO = cast(module["lora_a"]), cast(module["lora_b"])
        hf_module = ".".join(modules[name][1:])
        for i in range(model_cfg.num_layers):
            base = f"{PEFT_PREFIX}{model_cfg.peft_prefix}layers.{i}.{hf_module}"
            state[f"{base}.lora_A.weight"] = np.ascontiguousarray(a_LIR[i].T)
            state[f"{base}.lora_B.weight"] = np.ascontiguousarray(b_LRO[i].T)
            if "lora_magnitude" in module:
                state[f"{base}.lora_magnitude_vector"] = np.ascontiguousarray(cast(module["lora_magnitude"])[i])
    names = csv_names(modules_to_save)
    if names:
        flat = {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        subtree: dict = {}
        for path in sorted(set().union(*(saved_module_paths(flat, n) for n in names))):
            node = subtree
            *parents, leaf = path.split("/")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = cast(flat[path])
        if not subtree:
            raise ConfigError(f"modules_to_save {names} match no module of the params")
        for name, value in params_to_hf_state_dict(subtree, model_cfg).items():
            if name.startswith(model_cfg.hf_prefix):  # PEFT names modules as the loaded torch model does
                name = model_cfg.peft_prefix + name[len(model_cfg.hf_prefix):]
            state[PEFT_PREFIX + name] = value
        if model_cfg.tie_word_embeddings and "embed_tokens" in names:  # PEFT's ensure_weight_tying layout
            state[PEFT_PREFIX + "lm_head.weight"] = state[PEFT_PREFIX + "model.embed_tokens.weight"]
    return state


def _peft_expert_state(params: dict, model_cfg: ModelConfig, cast) -> dict[str, np.ndarray]:
    """The experts' adapters as PEFT's ParamWrapper saves them for a 3-D parameter [E, out, in] of
    transformers (nested wrappers on one module: the first registered parameter, gate_up_proj, is the
    inner one, named `experts.base_layer.lora_*`; down_proj the outer, `experts.lora_*`). lora_A.weight is
    [E * r, in] with row e * r + j; lora_B.weight is [out, r * E] with column j * E + e (ParamWrapper
    reshapes it to [out, r, E]). The delta per expert is scale * B_e @ A_e, as ours is scale * a_e @ b_e."""
    path = expert_path(params)
    experts = _get(params, path)
    module = ".".join(path[1:])
    state: dict[str, np.ndarray] = {}
    nodes = [experts[EXPERT_GATE_UP], experts["down_proj"]]
    for depth, node in enumerate(nodes):
        a_LEIR, b_LERO = cast(node["lora_a"]), cast(node["lora_b"])
        L, E, I, R = a_LEIR.shape
        O = b_LERO.shape[-1]
        nest = "base_layer." * (len(nodes) - 1 - depth)
        for i in range(L):
            base = f"{PEFT_PREFIX}{model_cfg.peft_prefix}layers.{i}.{module}.{nest}"
            state[base + "lora_A.weight"] = np.ascontiguousarray(a_LEIR[i].transpose(0, 2, 1).reshape(E * R, I))
            state[base + "lora_B.weight"] = np.ascontiguousarray(b_LERO[i].transpose(2, 1, 0).reshape(O, R * E))
    return state
