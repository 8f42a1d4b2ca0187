"""The dataset registry: `dataset_info.json` entries (LLaMA-Factory's keys: `file_name`, `hf_hub_url`,
`formatting`, `columns`, `tags`, `split`, `num_samples`), checked key by key, and the paths they name.

Paths named by the registry must stay inside `dataset_dir`; the user's own config may name any absolute path.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxsft.errors import InputError

REGISTRY = "dataset_info.json"
@dataclass
class DatasetAttr:
    """One dataset: where it is and how its columns map (LF's `parser.DatasetAttr`, text-only)."""

    name: str
    load_from: str  # "file" | "disk" | "hf_hub"
    path: str
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    system: str | None = None
    tools: str | None = None
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"
    train_tag: str | None = "train"  # jaxsft: an answer turn's key for `train: false` (None: not read)
    weight_tag: str | None = "weight"  # jaxsft: an answer turn's key for its loss weight (None: not read)

    named_columns: dict[str, str] = field(default_factory=dict)  # role -> column, as the registry names them

    @property
    def is_text(self) -> bool:
        """Plain text (LLaMA-Factory's pre-training layout, `columns: {prompt: text}`): alpaca with a prompt
        column and no response, query or history; every token is learned, no template."""
        return self.formatting == "alpaca" and bool(self.prompt) and not (self.response or self.query or
                                                                           self.history)

    def join(self, info: dict[str, Any]) -> None:
        """Apply a registry entry's `formatting`, `columns`, `tags`, ... (LF's `DatasetAttr.join`)."""
        for key, default in (("formatting", "alpaca"), ("ranking", False), ("subset", None), ("split", "train"),
                             ("folder", None), ("num_samples", None)):
            setattr(self, key, info.get(key, default))
        if "columns" in info:  # LF sets every column, absent ones to None
            for key in ("prompt", "query", "response", "history", "messages", "system", "tools"):
                setattr(self, key, info["columns"].get(key))
            self.named_columns = {k: v for k, v in info["columns"].items() if isinstance(v, str) and v}
        if "tags" in info:
            for key in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                        "system_tag"):
                setattr(self, key, info["tags"].get(key))
            for key in ("train_tag", "weight_tag"):  # jaxsft's own: absent keeps the default
                setattr(self, key, info["tags"].get(key, getattr(DatasetAttr, key)))
        if self.formatting not in ("alpaca", "sharegpt", "openai"):
            raise InputError(f"dataset {self.name!r}: unknown formatting {self.formatting!r} "
                             "(use alpaca, sharegpt or openai)")


def split_names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item).strip() for item in value]


def read_registry(dataset_dir: str) -> dict[str, Any] | None:
    path = Path(dataset_dir) / REGISTRY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def inside(base: Path, relative: str, what: str) -> Path:
    """`base / relative` for a path the registry names. The path text is checked (relative, no '..'),
    not where a symlink in dataset_dir points: linking big files into the data folder is fine."""
    if os.path.isabs(relative) or Path(relative).is_absolute():
        raise InputError(f"{what}: absolute path {relative!r} in {REGISTRY}; registry paths are relative to "
                         f"dataset_dir ({base}). Put an absolute path in your own config instead.")
    if ".." in Path(relative.replace("\\", "/")).parts:
        raise InputError(f"{what}: path {relative!r} escapes dataset_dir ({base}); '..' is not allowed in "
                         f"{REGISTRY}. Put an absolute path in your own config instead.")
    return (base / relative).absolute()


# What LLaMA-Factory's dataset_info.json entries may hold (data/README.md of LLaMA-Factory 0.9).
ENTRY_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting",
              "ranking", "subset", "split", "folder", "num_samples", "columns", "tags")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
               "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
            "system_tag", "train_tag", "weight_tag")


def _unknown(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f", did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})")


def check_entry(name: str, info: Any, registry: Path) -> None:
    """A misspelled key in a registry entry would be ignored (and e.g. the default columns used): refuse it."""
    where = f"dataset {name!r} in {registry}"
    if not isinstance(info, dict):
        raise InputError(f"{where}: expected an object of keys (file_name, formatting, columns, ...), got "
                         f"{type(info).__name__}")
    for key in info:
        if key not in ENTRY_KEYS:
            raise InputError(f"{where}: {_unknown(key, ENTRY_KEYS)}")
    for group, known in (("columns", COLUMN_KEYS), ("tags", TAG_KEYS)):
        value = info.get(group, {})
        if not isinstance(value, dict):
            raise InputError(f"{where}: {group!r} must be an object, got {type(value).__name__}")
        for key in value:
            if key not in known:
                raise InputError(f"{where}, {group}: {_unknown(key, known)}")


def present_datasets(dataset_dir: str) -> list[str]:
    """Registry entries whose files exist (what a user can train on right now)."""
    registry = read_registry(dataset_dir) or {}
    return sorted(n for n, info in registry.items() if "file_name" in info
                  and (Path(dataset_dir) / info["file_name"]).exists())


def local_path(name: str, base: Path) -> Path | None:
    if os.path.isabs(name):
        return Path(name) if Path(name).exists() else None
    candidate = base / name
    if candidate.exists():
        return inside(base, name, f"dataset {name!r}")
    if Path(name).exists():  # relative to the working directory: the user's own path
        return Path(name).resolve()
    return None


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists())
