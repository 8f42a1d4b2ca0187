"""The tokenized-data cache: an unchanged rerun loads its examples instead of tokenizing again.

An entry is keyed by everything the examples depend on: the data files (path, size, modification time),
the tokenizer's files, the data arguments (template, cutoff_len, masking, mixing, split, seed, ...) and
the source of the code that encodes them. Anything changed is a new key (the old entries age out: the
newest `KEEP` stay). Entries are flat numpy arrays (ids, labels, offsets per split; per-token loss
weights and which examples carry them, when any does) and the split statistics, written to a temporary
folder and renamed, so a reader never sees half an entry.
Datasets read from the hub are not cached (nothing local says whether they changed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxsft.data.packing import Example, WeightedExample, is_weighted, weights_of

logger = logging.getLogger(__name__)
KEEP = 8  # entries kept per cache folder (the most recently used)
LAYOUT = 2  # of an entry's arrays; part of the key (2: per-token loss weights)
# Data arguments that change where or how fast examples are made, not which examples.
_NOT_IN_KEY = ("preprocessing_num_workers", "tokenized_path", "data_cache_dir", "overwrite_cache", "buffer_size",
               "streaming", "retention_dataset", "replay_dataset", "replay_ratio")
_CODE = ("formats.py", "templates.py", "tool_format.py", "supervised.py", "sources.py", "encode.py", "cache.py",
         "pipeline.py")


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _files_of(path: Path) -> list:
    if path.is_file():
        return [_file_stamp(path)]
    return [_file_stamp(p) for p in sorted(path.rglob("*")) if p.is_file()]


def cache_key(args: Any, attrs: list, tokenizer, train: bool) -> str | None:
    """The hex key of what `args` + these datasets + this tokenizer make, or None when it cannot be known
    (a hub dataset, a tokenizer without local files)."""
    if any(a.load_from == "hf_hub" or not Path(a.path).exists() for a in attrs):
        return None
    tokenizer_dir = Path(getattr(tokenizer, "name_or_path", "") or "")
    if not tokenizer_dir.is_dir():
        return None
    options = {k: v for k, v in dataclasses.asdict(args).items() if k not in _NOT_IN_KEY}
    here = Path(__file__).parent
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "options": options, "train": train, "layout": LAYOUT,
        "data": [[dataclasses.asdict(a), _files_of(Path(a.path))] for a in attrs],
        "tokenizer_special": sorted(map(str, tokenizer.all_special_tokens)),
    }, sort_keys=True, default=str).encode())
    for p in sorted(tokenizer_dir.iterdir()):  # tokenizer.json, vocab, merges, configs, chat template
        if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template",
                                               "added_tokens")) or p.suffix == ".model"):
            digest.update(p.name.encode())
            digest.update(p.read_bytes())
    for name in _CODE:
        if (here / name).is_file():
            digest.update((here / name).read_bytes())
    return digest.hexdigest()[:32]


def _pack(examples: list[Example]) -> dict[str, np.ndarray]:
    lengths = np.fromiter((len(ids) for ids, _ in examples), np.int64, len(examples))
    arrays = {"ids": np.concatenate([ids for ids, _ in examples]) if examples else np.zeros(0, np.int32),
              "labels": np.concatenate([lab for _, lab in examples]) if examples else np.zeros(0, np.int32),
              "offsets": np.concatenate([[0], np.cumsum(lengths)])}
    if is_weighted(examples):
        arrays["weights"] = np.concatenate([weights_of(e) for e in examples])
        arrays["weighted"] = np.array([getattr(e, "weights", None) is not None for e in examples])
    return arrays


def _unpack(arrays) -> list[Example]:
    ids, labels, offsets = arrays["ids"], arrays["labels"], arrays["offsets"]
    spans = zip(offsets[:-1].tolist(), offsets[1:].tolist())
    if "weights" not in arrays:
        return [(ids[a:b], labels[a:b]) for a, b in spans]
    weights, weighted = arrays["weights"], arrays["weighted"]
    return [WeightedExample(ids[a:b], labels[a:b], weights[a:b]) if weighted[i] else (ids[a:b], labels[a:b])
            for i, (a, b) in enumerate(spans)]


def load(cache_dir: str, key: str) -> tuple[list[Example], list[Example] | None, dict] | None:
    entry = Path(cache_dir).expanduser() / key
    if not (entry / "stats.json").is_file():
        return None
    try:
        stats = json.loads((entry / "stats.json").read_text())
        with np.load(entry / "train.npz") as f:
            train = _unpack(f)
        evals = None
        if (entry / "eval.npz").is_file():
            with np.load(entry / "eval.npz") as f:
                evals = _unpack(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a damaged entry is a miss
        logger.warning("ignoring the damaged tokenized-data cache entry %s: %s", entry, e)
        return None
    os.utime(entry)  # recently used: kept longest
    return train, evals, stats


def save(cache_dir: str, key: str, train: list[Example], evals: list[Example] | None, stats: dict) -> None:
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        np.savez(tmp / "train.npz", **_pack(train))
        if evals is not None:
            np.savez(tmp / "eval.npz", **_pack(evals))
        (tmp / "stats.json").write_text(json.dumps(stats, default=str))
        try:
            tmp.rename(root / key)
        except OSError:  # another process wrote the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not write the tokenized-data cache in %s: %s", root, e)
        return
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)
    for old in entries[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
