"""The data arguments: what the data layer reads, taken once from the run's `Config`.

Frozen and picklable (tokenizer worker processes get a copy); every data module reads this object,
never the config or a table of defaults of its own. Names and defaults are LLaMA-Factory's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DataArgs:
    dataset: str | None = None
    eval_dataset: str | None = None
    retention_dataset: str | None = None  # forgetting meter: scored, never trained on
    replay_dataset: str | None = None  # general text mixed into packed rows
    replay_ratio: float = 0.0
    dataset_dir: str = "data"
    template: str = "empty"
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool = False  # packing or neat_packing: jaxsft always packs block-diagonally
    streaming: bool = False
    buffer_size: int = 16384
    mix_strategy: str = "concat"
    interleave_probs: str | None = None
    seed: int = 42
    tokenized_path: str | None = None
    skip_invalid_examples: bool = False
    default_system: str | None = None
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    tool_format: str | None = None
    preprocessing_num_workers: int | None = None
    disable_shuffling: bool = False
    data_cache_dir: str | None = None  # tokenized-data cache (jaxsft.data.cache); None: off
    overwrite_cache: bool = False  # tokenize again and overwrite the cache entry

    @classmethod
    def from_config(cls, cfg) -> "DataArgs":
        """The data arguments of a (resolved) `jaxsft.config.Config`."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
        values["packing"] = bool(cfg.packing or cfg.neat_packing)
        values["template"] = cfg.template or "empty"
        return cls(**values)

    def replace(self, **changes) -> "DataArgs":
        return dataclasses.replace(self, **changes)
