"""Where rows come from: `dataset_info.json` entries (`jaxsft.data.registry`), local files, saved HF datasets,
the hub.

`dataset: a,b` names registry entries or paths to json / jsonl / csv / parquet / arrow files or to a folder
saved with `datasets.Dataset.save_to_disk`.

Mixing and splitting reuse Hugging Face `datasets` on index tables, so `interleave_*` and `val_size` pick
exactly the rows LLaMA-Factory picks for the same seed.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxsft.config import hub_offline
from jaxsft.data.registry import (COLUMN_KEYS, REGISTRY, DatasetAttr, check_entry, inside, is_saved_dataset,
                                  local_path, present_datasets, read_registry, split_names)
from jaxsft.errors import ConfigError, InputError, MissingPath, UserError

FILE_TYPES = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


def _detect(attr: DatasetAttr, head: list[dict[str, Any]]) -> None:
    """Guess the format of a file named directly (not through the registry) from its first rows."""
    first = dict(head[0]) if head else {}
    for row in head[1:]:
        for key, value in row.items():
            first.setdefault(key, value)
    for key in ("conversations", "messages"):
        turns = first.get(key)
        if isinstance(turns, list):
            attr.formatting, attr.messages = "sharegpt", key
            if turns and isinstance(turns[0], dict) and "role" in turns[0]:
                attr.role_tag, attr.content_tag, attr.user_tag, attr.assistant_tag = "role", "content", "user", \
                    "assistant"
                attr.observation_tag, attr.function_tag = "tool", "function_call"
            attr.system = "system" if "system" in first else None
            attr.tools = "tools" if "tools" in first else None
            return
    attr.formatting = "alpaca"
    if "text" in first and not {"instruction", "output"} & set(first):  # plain text rows: {"text": ...}
        attr.prompt, attr.query, attr.response = "text", None, None
        return
    attr.system = "system" if "system" in first else None
    attr.history = "history" if "history" in first else None


def resolve(names: str | Sequence[str] | None, dataset_dir: str) -> list[DatasetAttr]:
    """Dataset names / paths -> DatasetAttr list, with errors that say what exists."""
    names = split_names(names)
    registry = read_registry(dataset_dir) if dataset_dir != "ONLINE" else None
    base = Path(dataset_dir)
    attrs = []
    for name in names:
        if registry is not None and name in registry:
            info = registry[name]
            check_entry(name, info, base / REGISTRY)  # first: a misspelled `file_name` is named as such
            if "file_name" in info:
                path = inside(base, info["file_name"], f"dataset {name!r}")
                if not path.exists():
                    raise MissingPath(
                        f"dataset {name!r} in {base / REGISTRY} names {info['file_name']!r}, which is not in "
                        f"{base.resolve()}. Add the file there, or use one of the datasets present: "
                        f"{', '.join(present_datasets(dataset_dir)) or '(none)'}."
                    )
                attr = DatasetAttr(name, "disk" if is_saved_dataset(path) else "file", str(path))
            elif "hf_hub_url" in info:
                attr = DatasetAttr(name, "hf_hub", info["hf_hub_url"])
            else:
                kinds = ", ".join(k for k in info if k.endswith("_url") or k.endswith("_name")) or "no source"
                raise InputError(f"dataset {name!r} in {base / REGISTRY} has {kinds}; jaxsft reads file_name "
                                 "(local) and hf_hub_url (online) entries.")
            attr.join(info)
            if attr.ranking:
                raise InputError(f"dataset {name!r} is a ranking (preference) dataset; SFT needs ranking: false.")
            columns = info.get("columns") or {}
            media = [key for key in ("images", "videos", "audios") if columns.get(key)]
            if media:
                raise InputError(f"dataset {name!r} has {' and '.join(media)} (columns in {base / REGISTRY}); jaxsft "
                                 f"trains text-only models: use a text dataset")
            if columns.get("kto_tag"):
                raise InputError(f"dataset {name!r} is a KTO dataset (columns.kto_tag in {base / REGISTRY}), which "
                                 f"LLaMA-Factory's SFT drops; jaxsft has no KTO stage: use an SFT dataset")
            attrs.append(attr)
            continue
        path = local_path(name, base)
        if path is not None:
            attr = DatasetAttr(name, "disk" if is_saved_dataset(path) else "file", str(path))
            _detect(attr, _head(attr))
            attrs.append(attr)
        elif dataset_dir == "ONLINE" or (registry is None and "/" in name and not name.startswith((".", "/"))):
            attrs.append(DatasetAttr(name, "hf_hub", name))
        else:
            known = sorted(registry) if registry else []
            hint = difflib.get_close_matches(name, known, n=3)
            raise InputError((
                f"Unknown dataset {name!r}: not an entry of {base / REGISTRY}"
                + (" (no such file)" if registry is None else "")
                + " and no file or folder at that path. "
                + (f"Did you mean {', '.join(hint)}? " if hint else "")
                + (f"Datasets present in {dataset_dir}: {', '.join(present_datasets(dataset_dir))}." if known else "")
            ).rstrip())
    return attrs


REQUIRED_COLUMNS = ("prompt", "response", "messages")  # without them a row has no conversation
# Default columns that must exist when the registry does not name them (a file without a response column is
# still a valid predict set).
CONVERSATION_ROLES = {"alpaca": ("prompt",), "sharegpt": ("messages",), "openai": ("messages",)}


def check_columns(attr: DatasetAttr, columns: set[str], file: str) -> None:
    """The columns a registry entry names exist in its data: a typo in a column that carries the conversation
    (prompt, response, messages) would train on empty turns, so it is an error; an optional one (query, system,
    history, tools) that is absent is read as empty, and a warning says so."""
    for role in CONVERSATION_ROLES[attr.formatting]:  # columns the defaults name carry the conversation too
        column = getattr(attr, role)
        if role not in attr.named_columns and column and column not in columns:
            close = difflib.get_close_matches(column, sorted(columns), n=1, cutoff=0.6)
            raise InputError(f"dataset {attr.name!r}: {file} has no column {column!r}, where {attr.formatting} data "
                             f"keeps the {role} (its columns: {', '.join(sorted(columns)) or 'none'})."
                             f"{f' Did you mean {close[0]!r}?' if close else ''} Rename the column, or name it in "
                             f"{REGISTRY} (\"columns\": {{\"{role}\": ...}})")
    for role, column in attr.named_columns.items():
        if column not in columns:
            close = difflib.get_close_matches(column, sorted(columns), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            text = (f"dataset {attr.name!r}: columns.{role} names {column!r}, which is not a column of {file} (its "
                    f"columns: {', '.join(sorted(columns)) or 'none'}).{hint}")
            if role in REQUIRED_COLUMNS:
                raise InputError(f"{text} Fix {REGISTRY}")
            if role in COLUMN_KEYS[:7]:
                logging.getLogger("jaxsft").warning("%s It is read as empty", text)


def _columns_of(rows: Sequence) -> set[str]:
    names = getattr(rows, "column_names", None)
    if names is not None:
        return set(names)
    columns: set[str] = set()
    for row in rows:
        if isinstance(row, dict):
            columns.update(row)
    return columns


def _file_type(attr: DatasetAttr) -> tuple[str, list[str]]:
    path = Path(attr.path)
    files = sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else [str(path)]
    types = {FILE_TYPES.get(Path(f).suffix[1:]) for f in files}
    if None in types or len(types) != 1:
        raise InputError(f"dataset {attr.name!r} ({attr.path}): files must all be one of "
                         f"{', '.join(sorted(FILE_TYPES))}; found {', '.join(Path(f).name for f in files)}.")
    return types.pop(), files


def _not_utf8(file: str, data: bytes, e: UnicodeDecodeError, line_offset: int = 0) -> InputError:
    line = line_offset + data[:e.start].count(b"\n") + 1
    return InputError(f"{file}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason}); "
                      "re-save the file as UTF-8")


def _unreadable(attr: DatasetAttr, kind: str, e: Exception) -> InputError:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the reader's error
        cause = cause.__cause__ or cause.__context__
    reason = " ".join(f"{type(cause).__name__}: {cause}".split())
    where = attr.path if attr.name == attr.path else f"dataset {attr.name!r} ({attr.path})"
    return InputError(f"{where}: cannot be read as {kind}: {reason}")


def _read_json(file: str) -> list[Any]:
    data = Path(file).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of the data
    except UnicodeDecodeError as e:
        raise _not_utf8(file, data, e) from None
    if file.endswith(".jsonl") or (not text.lstrip().startswith("[")):
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{file}, line {line_no}: invalid JSON: {e}") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(rows, list):
        raise InputError(f"{file}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _hf_dataset(attr: DatasetAttr, streaming: bool):
    import datasets

    if attr.load_from == "disk":
        ds = datasets.load_from_disk(attr.path)
        if isinstance(ds, datasets.DatasetDict):
            if attr.split not in ds:
                raise InputError(f"dataset {attr.name!r} ({attr.path}) has splits {list(ds)}, not {attr.split!r}")
            ds = ds[attr.split]
        return ds.to_iterable_dataset() if streaming else ds
    if attr.load_from == "hf_hub":
        if hub_offline("HF_DATASETS_OFFLINE"):
            raise InputError(f"dataset {attr.name!r} is on the hub ({attr.path}) but the hub is offline "
                             "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it and name the local path.")
        return datasets.load_dataset(attr.path, name=attr.subset, data_dir=attr.folder, split=attr.split,
                                     streaming=streaming)
    kind, files = _file_type(attr)
    try:
        return datasets.load_dataset(kind, data_files=files, split=attr.split, streaming=streaming)
    except Exception as e:  # the csv / parquet / arrow reader's own error, about the user's file
        raise _unreadable(attr, kind, e) from e


def _head(attr: DatasetAttr, n: int = 100) -> list[dict[str, Any]]:
    head = []
    for row in iter_rows(attr):
        if len(head) == n:
            break
        if isinstance(row, dict):
            head.append(row)
    return head


def check_head_columns(attr: DatasetAttr, n: int = 100) -> list[dict[str, Any]]:
    """check_columns on the first `n` rows, for readers that never hold the whole dataset (streaming, a dry
    run); returns those rows."""
    head = _head(attr, n)
    if head:
        check_columns(attr, _columns_of(head), attr.path)
    return head


def load_rows(attr: DatasetAttr, max_samples: int | None = None, seed: int = 42) -> Sequence[dict[str, Any]]:
    """All rows of one dataset, random access (a list, or a Hugging Face Dataset for columnar files)."""
    if attr.load_from == "file" and _file_type(attr)[0] == "json":
        rows: Sequence = [row for f in _file_type(attr)[1] for row in _read_json(f)]
    else:
        rows = _hf_dataset(attr, streaming=False)
    if len(rows):
        check_columns(attr, _columns_of(rows), attr.path)
    if attr.num_samples is not None:  # LF: a permutation, repeated (with replacement) past the dataset size
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(rows))[:attr.num_samples]
        if attr.num_samples > len(idx):
            idx = np.concatenate([idx, rng.choice(len(rows), attr.num_samples - len(idx))])
        rows = _Select(rows, idx.tolist())
    if max_samples is not None:
        rows = _Select(rows, list(range(min(max_samples, len(rows)))))
    return rows


def iter_rows(attr: DatasetAttr) -> Iterator[dict[str, Any]]:
    """Rows one at a time, without loading the dataset into memory (jsonl is read line by line)."""
    if attr.load_from == "file":
        kind, files = _file_type(attr)
        if kind == "json":
            for file in files:
                if file.endswith(".jsonl"):
                    with open(file, "rb") as f:
                        for line_no, raw in enumerate(f, 1):
                            try:
                                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                            except UnicodeDecodeError as e:
                                raise _not_utf8(file, raw, e, line_no - 1) from None
                            if line.strip():
                                try:
                                    yield json.loads(line)
                                except json.JSONDecodeError as e:
                                    raise InputError(f"{file}, line {line_no}: invalid JSON: {e}") from None
                else:
                    yield from _read_json(file)
            return
    try:
        yield from _hf_dataset(attr, streaming=True)
    except UserError:
        raise
    except Exception as e:  # streaming readers fail on the first row, not when opened
        raise _unreadable(attr, attr.load_from if attr.load_from != "file" else _file_type(attr)[0], e) from e


def row_number(rows: Sequence, i: int) -> int:
    """The row number in its file of row `i` of `load_rows`'s result (num_samples / max_samples select)."""
    return rows.indices[i] if isinstance(rows, _Select) else i


def load_mixed(names: str | Sequence[str] | None, args) -> tuple[list[Sequence], list[DatasetAttr], list[RowRef]]:
    """(rows of each dataset, the datasets, the merged row order) for `dataset` or `eval_dataset` names,
    read with the data arguments' dataset_dir, max_samples, seed, mix_strategy and interleave_probs."""
    attrs = resolve(names, args.dataset_dir)
    rows_of = [load_rows(a, args.max_samples, args.seed) for a in attrs]
    probs = parse_probs(args.interleave_probs, len(attrs), args.mix_strategy)
    return rows_of, attrs, mix([len(r) for r in rows_of], args.mix_strategy, probs, args.seed)


class _Select(Sequence):
    def __init__(self, rows: Sequence, indices: list[int]):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.rows[self.indices[i]]


@dataclass(frozen=True)
class RowRef:
    """A row of the merged dataset: which source, which row in it."""

    source: int
    row: int


def mix(lengths: list[int], strategy: str, probs: list[float] | None, seed: int) -> list[RowRef]:
    """The merged row order for datasets of these sizes: LF's `merge_dataset` (concat or HF interleave)."""
    if len(lengths) == 1 or strategy == "concat":
        return [RowRef(s, r) for s, n in enumerate(lengths) for r in range(n)]
    if not strategy.startswith("interleave"):
        raise ConfigError(f"Unknown mix_strategy {strategy!r}: use concat, interleave_under or interleave_over.")
    import datasets

    tables = [datasets.Dataset.from_dict({"s": [s] * n, "r": list(range(n))}) for s, n in enumerate(lengths)]
    mixed = datasets.interleave_datasets(
        tables, probabilities=probs, seed=seed,
        stopping_strategy="first_exhausted" if strategy.endswith("under") else "all_exhausted",
    )
    return [RowRef(s, r) for s, r in zip(mixed["s"], mixed["r"])]


def split(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) positions: HF `train_test_split` with LF's arguments, so the same rows go to eval."""
    if val_size <= 1e-6:
        return list(range(n)), []
    import datasets

    size = int(val_size) if val_size > 1 else val_size
    if isinstance(size, int) and size >= n:
        raise InputError(f"val_size: {size} rows held out for evaluation, but the dataset has only {n}; lower "
                         f"val_size (a count, or a fraction < 1)")
    try:
        parts = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=size, seed=seed)
    except ValueError as e:  # e.g. a fraction of a handful of rows leaves no training row
        raise InputError(f"val_size: {val_size} cannot split the dataset's {n} rows ({e}); lower val_size") from None
    return list(parts["train"]["i"]), list(parts["test"]["i"])


def parse_probs(value: str | Sequence[float] | None, n: int, strategy: str) -> list[float] | None:
    if value is None:
        return None
    if strategy == "concat":
        raise ConfigError("interleave_probs is only valid with mix_strategy interleave_under or interleave_over.")
    probs = [float(p) for p in split_names(value)] if isinstance(value, str) else [float(p) for p in value]
    if len(probs) != n:
        raise ConfigError(f"interleave_probs has {len(probs)} values for {n} datasets.")
    return probs
