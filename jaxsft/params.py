"""Param-tree plumbing: flat views, and the trainable/frozen split used by full, freeze and LoRA tuning.

The train step differentiates only the trainable part; the optimizer only ever sees it. Freeze
tuning trains a contiguous range of layers of the stacked (scanned) layer arrays, so a stacked leaf
can be split along its layer axis; `merge` puts the two halves back in order for the forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from jaxsft.config import Config, ConfigError

Flat = dict[str, Any]
LAYERS = "layers"


def flatten(tree: dict, prefix: str = "") -> Flat:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat: Flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Flat) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which leaves train: whole leaves, plus stacked layer leaves trained on `layer_range` only."""
    trainable: frozenset[str]
    sliced: frozenset[str] = frozenset()
    layer_range: tuple[int, int] = (0, 0)
    layer_ids: tuple[int, ...] = ()  # trained layers when not one range (LLaMA Pro's expanded blocks)

    def trained_layers(self) -> tuple[int, ...]:
        return self.layer_ids or tuple(range(*self.layer_range))

    def describe(self, flat: Flat) -> str:
        def size(path):
            n = flat[path].size
            if path in self.sliced:
                n = n // flat[path].shape[0] * len(self.trained_layers())
            return n
        trained = sum(size(p) for p in self.trainable | self.sliced)
        total = sum(v.size for v in flat.values())
        return f"trainable params: {trained:,d} || all params: {total:,d} || trainable%: {100 * trained / total:.4f}"


def split(flat: Flat, part: Partition) -> tuple[Flat, Flat]:
    """Flat params -> (trainable, frozen). Sliced leaves contribute to both."""
    lo, hi = part.layer_range
    trainable, frozen = {}, {}
    for path, value in flat.items():
        if path in part.trainable:
            trainable[path] = value
        elif path in part.sliced and part.layer_ids:
            ids = list(part.layer_ids)
            rest = [i for i in range(value.shape[0]) if i not in part.layer_ids]
            trainable[path], frozen[path] = value[jnp.asarray(ids)], value[jnp.asarray(rest)]
        elif path in part.sliced:
            trainable[path] = value[lo:hi]
            frozen[path] = jnp.concatenate([value[:lo], value[hi:]]) if (lo > 0 and hi < value.shape[0]) \
                else (value[:lo] if lo > 0 else value[hi:])
        else:
            frozen[path] = value
    return trainable, frozen


def merge(trainable: Flat, frozen: Flat, part: Partition) -> dict:
    """(trainable, frozen) -> the nested param tree the model runs on."""
    flat = dict(frozen)
    lo = part.layer_range[0]
    for path, value in trainable.items():
        if path in part.sliced and part.layer_ids:
            rest = frozen[path]
            total = rest.shape[0] + value.shape[0]
            order = [i for i in range(total) if i not in part.layer_ids] + list(part.layer_ids)
            where = [order.index(i) for i in range(total)]  # layer i sits at this row of [rest; value]
            flat[path] = jnp.take(jnp.concatenate([rest, value]), jnp.asarray(where), axis=0)
        elif path in part.sliced:
            rest = frozen[path]
            flat[path] = jnp.concatenate([rest[:lo], value, rest[lo:]])
        else:
            flat[path] = value
    return unflatten(flat)


def full_partition(flat: Flat) -> Partition:
    return Partition(trainable=frozenset(flat))


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def freeze_partition(flat: Flat, cfg: Config, num_layers: int) -> Partition:
    """LLaMA-Factory's freeze tuning: last N layers (first N when negative), chosen modules, extras."""
    n = cfg.freeze_trainable_layers
    lo, hi = (max(0, num_layers - n), num_layers) if n > 0 else (0, min(-n, num_layers))
    layer_ids: tuple[int, ...] = ()
    if cfg.use_llama_pro:  # the expanded blocks: every stride-th layer, as LLaMA-Factory picks them
        if num_layers % n:
            raise ConfigError(f"use_llama_pro: the model's {num_layers} layers are not divisible by "
                              f"freeze_trainable_layers ({n}), the number of expanded blocks")
        stride = num_layers // n
        layer_ids = tuple(range(stride - 1, num_layers, stride))
        lo, hi = layer_ids[0], layer_ids[-1] + 1
    layer_modules = sorted({p.split("/")[1] for p in flat if p.startswith(LAYERS + "/")})
    outer_modules = sorted({p.split("/")[0] for p in flat if not p.startswith(LAYERS + "/")})
    modules = _csv(cfg.freeze_trainable_modules) or ["all"]
    for name in modules:
        if name != "all" and name not in layer_modules:
            raise ConfigError(f"freeze_trainable_modules: module '{name}' not found, choose from "
                              f"{', '.join(layer_modules)}")
    extras = _csv(cfg.freeze_extra_modules)
    for name in extras:
        if name not in outer_modules:
            raise ConfigError(f"freeze_extra_modules: module '{name}' not found, choose from "
                              f"{', '.join(outer_modules)}")
    sliced = {p for p in flat if p.startswith(LAYERS + "/")
              and ("all" in modules or p.split("/")[1] in modules)}
    whole = {p for p in flat if p.split("/")[0] in extras}
    if len(layer_ids) == hi - lo:  # the expanded blocks happen to form one range
        layer_ids = ()
    if lo == 0 and hi == num_layers and not layer_ids:  # every layer trains: no need to slice
        whole |= sliced
        sliced = set()
    return Partition(trainable=frozenset(whole), sliced=frozenset(sliced), layer_range=(lo, hi), layer_ids=layer_ids)


def count(flat: Iterable) -> int:
    return sum(int(v.size) for v in jax.tree_util.tree_leaves(flat))
