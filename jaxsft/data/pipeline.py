"""The SFT data pipeline: rows -> conversations -> (ids, labels) once -> per-epoch packed, sharded batches.

`build_datasets(args, tokenizer)` reads, converts and tokenizes everything once (kept in memory; or
saved to / loaded from `tokenized_path` in LLaMA-Factory's tokenized layout). Batches come from a grain
`MapDataset` over (epoch, row): each epoch shuffles the examples with (seed, epoch), packs them (greedy
knapsack over the whole epoch), shuffles the rows, gives row `j * process_count + process_index` to this
process, and batches `rows_per_process` rows, every row once per epoch (the last batch filled up with empty
rows, as Hugging Face's Trainer reads a short last batch); the iterator's `get_state()` / `set_state()` resume
exactly.
With `streaming: true`, see `jaxsft.data.streaming`. Rows are encoded by `jaxsft.data.encode`.
"""

import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxsft.data import cache, sources
from jaxsft.data import replay as replay_mod
from jaxsft.data.args import DataArgs
from jaxsft.data.encode import Counts, encode_rows, learned, make_template, report_dropped, report_truncated
from jaxsft.data.packing import (Example, WeightedExample, batch_widths, efficiency, empty_row, eval_batches,
                                 greedy_knapsack, is_weighted, make_row, plan_epoch, stack_rows, weights_of)
from jaxsft.data.streaming import StreamingSFTData
from jaxsft.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


@dataclass
class SFTData:
    """Encoded train / eval examples and the batches made from them."""

    train: list[Example]
    eval: list[Example] | None
    seq_len: int
    pad_id: int
    packing: bool
    stats: dict[str, Any]
    process_index: int = 0
    process_count: int = 1
    shuffle: bool = True  # false: `disable_shuffling`, examples and rows keep the dataset order
    counts: dict[str, Counts] | None = None  # split -> what preprocessing did, row by row (None: from a cache)
    retention: list[Example] | None = None  # `retention_dataset`: scored, never trained on
    replay: list[Example] | None = None  # `replay_dataset`: general text filling `replay_ratio` of each row
    replay_ratio: float = 0.0
    streaming = False

    def rows_per_epoch(self, rows_per_process: int, batch_multiple: int = 1, drop_last: bool = False) -> int:
        """Rows this process reads per epoch, the same on every process: every row of the epoch once (as
        Hugging Face's Trainer, whose last batch is short), the last global batch filled up with empty rows,
        then whole empty batches up to a multiple of `batch_multiple` (the accumulation steps: an epoch ends
        on an optimizer step whose last micro-batches may be empty). Empty rows add no loss and no gradient.
        `drop_last` (`dataloader_drop_last`): the rows of an incomplete last batch sit the epoch out instead."""
        return self.batches_per_epoch(rows_per_process, batch_multiple, drop_last) * rows_per_process

    def batches_per_epoch(self, rows_per_process: int, batch_multiple: int = 1, drop_last: bool = False) -> int:
        rows, global_rows = self.plan_rows(), rows_per_process * self.process_count
        batches = rows // global_rows if drop_last else -(-rows // global_rows)
        return -(-batches // batch_multiple) * batch_multiple

    def plan_rows(self) -> int:
        """Rows of an epoch's plan (packed rows, or examples); the same every epoch (packing depends only on
        the lengths). Packing is planned once per row capacity (a replay run's SFT capacity is set later)."""
        if not self.packing:
            return len(self.lengths)
        if self.sft_capacity not in self._plan_rows:
            self._plan_rows[self.sft_capacity] = len(plan_epoch(self.lengths, self.sft_capacity, 0, 0, True))
        return self._plan_rows[self.sft_capacity]

    def train_dataset(self, rows_per_process: int, seed: int, num_epochs: int, buckets: Sequence[int] | None = None,
                      group_by_length: bool = False, batch_multiple: int = 1, drop_last: bool = False
                      ) -> grain.MapDataset:
        """Batches of `rows_per_process` rows. `buckets`: the lengths a batch may be padded to (the smallest one
        holding the longest row of the global batch, the same on every process); None pads to `seq_len`."""
        rows = _EpochRows(self, self.rows_per_epoch(rows_per_process, batch_multiple, drop_last), seed, num_epochs,
                          rows_per_process, buckets, group_by_length)
        if len(rows) == 0:
            raise ConfigError(f"{len(self.train)} training examples make no full batch of {rows_per_process} rows "
                              f"per process x {self.process_count} processes; lower the batch size, or leave "
                              f"dataloader_drop_last false")
        return grain.MapDataset.source(rows).batch(rows_per_process, drop_remainder=True, batch_fn=stack_rows)

    def train_iterator(self, rows_per_process: int, seed: int, num_epochs: int = 1,
                       buckets: Sequence[int] | None = None, group_by_length: bool = False,
                       batch_multiple: int = 1, drop_last: bool = False) -> grain.DatasetIterator:
        """Batches of `rows_per_process` rows for `num_epochs` epochs; checkpoint with get_state()/set_state()."""
        ds = self.train_dataset(rows_per_process, seed, num_epochs, buckets, group_by_length, batch_multiple,
                                drop_last)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

    def eval_batches(self, rows_per_process: int, buckets: Sequence[int] | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Every eval example once (packed when training is), in order (`packing.eval_batches`)."""
        return eval_batches(self.eval or [], self.seq_len, self.pad_id, self.packing, rows_per_process,
                            self.process_index, self.process_count, buckets)

    def epoch_plan(self, rows_per_process: int, seed: int, epoch: int, buckets: Sequence[int] | None = None,
                   group_by_length: bool = False) -> tuple[list[list[int]], list[int]]:
        """The epoch's rows (example indices, all processes) and the padded length of each global batch, as
        `train_dataset` reads them."""
        return self.epoch_rows(rows_per_process, seed, epoch, buckets, group_by_length)[:2]

    def epoch_rows(self, rows_per_process: int, seed: int, epoch: int, buckets: Sequence[int] | None = None,
                   group_by_length: bool = False) -> tuple[list[list[int]], list[int], Any]:
        """`epoch_plan`, and the replay pieces of each row (a `replay.ReplayPlan`; None without replay)."""
        group = 50 * rows_per_process * self.process_count if group_by_length and not self.packing else 0
        plan = plan_epoch(self.lengths, self.sft_capacity, seed, epoch, self.packing, self.shuffle, group)
        row_lengths = [sum(self.lengths[i] for i in m) for m in plan]
        replay = None
        if self.replay:
            replay = replay_mod.ReplayPlan(self.replay, row_lengths, self.seq_len, self.replay_ratio, seed, epoch)
            row_lengths = [n + r for n, r in zip(row_lengths, replay.tokens)]
        widths = batch_widths(row_lengths, rows_per_process * self.process_count,
                              list(buckets) if buckets else [self.seq_len])
        return plan, widths, replay

    def retention_batches(self, rows_per_process: int, buckets: Sequence[int] | None = None
                          ) -> Iterator[dict[str, np.ndarray]]:
        """Every retention example once, batched as eval examples are."""
        return eval_batches(self.retention or [], self.seq_len, self.pad_id, self.packing, rows_per_process,
                            self.process_index, self.process_count, buckets)

    @property
    def sft_capacity(self) -> int:
        """Tokens of a row the SFT examples may fill: all of it, less the replay share."""
        return replay_mod.sft_capacity(self.seq_len, self.replay_ratio) if self.replay else self.seq_len

    def __post_init__(self) -> None:
        self.lengths = [len(ex[0]) for ex in self.train]
        self._plan_rows: dict[int, int] = {}  # row capacity -> rows of an epoch (packed)
        self.weighted = is_weighted(self.train)  # batches carry `weights` (answers with loss weights)


class _EpochRows(Sequence):
    """Random access to this process's rows across epochs: row i is (epoch i // R, j = i % R)."""

    def __init__(self, data: SFTData, rows_per_epoch: int, seed: int, num_epochs: int, rows_per_batch: int,
                 buckets: Sequence[int] | None, group_by_length: bool = False):
        self.data, self.rows_per_epoch, self.seed, self.num_epochs = data, rows_per_epoch, seed, num_epochs
        self.rows_per_batch, self.buckets, self.group_by_length = rows_per_batch, buckets, group_by_length
        self._plans: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.rows_per_epoch * self.num_epochs

    def _plan(self, epoch: int) -> tuple[list[list[int]], list[int], Any]:
        """The epoch's rows (example indices, all processes), the padded length of each global batch, and
        the replay pieces of each row (None without replay)."""
        with self._lock:
            if epoch not in self._plans:
                if len(self._plans) > 2:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = self.data.epoch_rows(self.rows_per_batch, self.seed, epoch, self.buckets,
                                                          self.group_by_length)
            return self._plans[epoch]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        epoch, j = divmod(i, self.rows_per_epoch)
        d = self.data
        plan, widths, replay = self._plan(epoch)
        g = j * d.process_count + d.process_index
        b = j // self.rows_per_batch
        width = widths[b] if b < len(widths) else min(self.buckets or [d.seq_len])  # an all-empty batch: narrow
        if g >= len(plan):  # filling the epoch's last batch
            row = empty_row(width, d.pad_id, d.weighted)
            return {**row, "replay": np.zeros_like(row["segment_ids"])} if replay is not None else row
        row = make_row(d.train, plan[g], width, d.pad_id, d.weighted)
        return replay.fill(row, g) if replay is not None else row


def _split_stats(name: str, examples: list[Example], counts: Counts, seq_len: int, packing: bool) -> dict:
    lengths = [len(ids) for ids, _ in examples]
    rows = len(greedy_knapsack(lengths, seq_len)[0]) if packing else len(lengths)
    return {f"{name}_rows_read": counts.rows, f"{name}_examples": counts.examples, f"{name}_dropped": counts.dropped,
            f"{name}_dropped_reasons": counts.reasons, f"{name}_tokens": counts.tokens,
            f"{name}_label_tokens": counts.label_tokens, f"{name}_packed_rows": rows,
            f"{name}_truncated": counts.truncated, f"{name}_truncated_tokens": counts.truncated_tokens,
            f"{name}_packing_efficiency": efficiency(lengths, rows, seq_len),
            f"{name}_weighted_examples": sum(getattr(e, "weights", None) is not None for e in examples)}


def build_datasets(args: DataArgs, tokenizer, *, train: bool = True, process_index: int = 0,
                   process_count: int = 1, allow_empty: bool = False) -> "SFTData | StreamingSFTData":
    """Everything training and evaluation read (`_build_datasets`), with the `retention_dataset` and
    `replay_dataset` examples when training."""
    data = _build_datasets(args, tokenizer, train=train, process_index=process_index, process_count=process_count,
                           allow_empty=allow_empty)
    if train and (args.retention_dataset or args.replay_dataset):
        template = make_template(args, tokenizer)
        counts_of = getattr(data, "counts", None)
        if args.retention_dataset:
            data.retention = _side_examples("retention", args.retention_dataset, args, template, tokenizer,
                                            data.stats, counts_of)
        if args.replay_dataset:
            data.replay = _side_examples("replay", args.replay_dataset, args, template, tokenizer, data.stats,
                                         counts_of)
            data.replay_ratio = args.replay_ratio
    return data


def _side_examples(split: str, names: str, args: DataArgs, template, tokenizer, stats: dict,
                   counts_of: dict | None = None) -> list[Example]:
    """The examples of a dataset read beside the training data (retention, replay): encoded once, cached in
    `data_cache_dir` under their own key, their counts added to `stats` as `{split}_*` (and, when encoded
    here, to `counts_of[split]`)."""
    side = args.replace(dataset=names, eval_dataset=None, val_size=0.0, max_samples=args.max_samples)
    key = cache.cache_key(side, sources.resolve(names, args.dataset_dir), tokenizer, split) \
        if args.data_cache_dir else None
    hit = cache.load(args.data_cache_dir, key) if key and not args.overwrite_cache else None
    if hit is not None:
        examples, _, side_stats = hit
    else:
        rows_of, attrs, refs = sources.load_mixed(names, side)
        examples, counts = encode_rows(rows_of, attrs, refs, template, tokenizer, side)
        side_stats = _split_stats(split, examples, counts, args.cutoff_len, args.packing)
        if counts_of is not None:
            counts_of[split] = counts
        report_dropped(split, counts)
        report_truncated(split, counts, args.cutoff_len)
        if key:
            cache.save(args.data_cache_dir, key, examples, None, side_stats)
    if not examples:
        raise InputError(f"{split}_dataset {names}: no examples left after preprocessing (see the warnings above)")
    stats.update(side_stats)
    return examples


def _build_datasets(args: DataArgs, tokenizer, *, train: bool = True, process_index: int = 0,
                    process_count: int = 1, allow_empty: bool = False) -> "SFTData | StreamingSFTData":
    """Everything training and evaluation read. The training split is built only with `train`; the eval
    split is `eval_dataset`, or the `val_size` rows of `dataset` (the same rows whether or not training
    runs), as LLaMA-Factory reads them.

    The tokenizer is fixed in place as LF does (a template's EOS / pad / stop words). Returns an `SFTData`,
    or a `streaming.StreamingSFTData` when `args.streaming`. A training split left empty by preprocessing is
    an error, unless `allow_empty` (the data report shows why it is empty).
    """
    if not isinstance(args, DataArgs):
        raise TypeError(f"build_datasets takes DataArgs (DataArgs.from_config(cfg)), not {type(args).__name__}")
    if args.mask_history and args.train_on_prompt:
        raise ConfigError("mask_history and train_on_prompt cannot both be true (as in LLaMA-Factory).")
    if args.eval_dataset and args.val_size > 1e-6:
        raise ConfigError("Set either val_size or eval_dataset, not both (as in LLaMA-Factory).")
    if train and not args.dataset and not (args.tokenized_path and _has_tokenized(args.tokenized_path)):
        raise ConfigError("training needs data: set dataset (dataset_info.json names or file paths).")
    template = make_template(args, tokenizer)
    seq_len, packing, shuffle = args.cutoff_len, args.packing, not args.disable_shuffling
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if args.streaming:
        return StreamingSFTData.build(args, tokenizer, template, train=train, process_index=process_index,
                                      process_count=process_count)
    tokenized_path = args.tokenized_path
    if tokenized_path and _has_tokenized(tokenized_path):
        logger.warning("Loading the tokenized dataset from %s; other data arguments are ignored.", tokenized_path)
        train_examples, evals = load_tokenized(tokenized_path)
        train_examples = train_examples if train else []
        stats = {"source": f"tokenized_path {tokenized_path}"}
        if train:
            stats.update(_split_stats("train", train_examples, _counts_of(train_examples), seq_len, packing))
        if evals is not None:
            stats.update(_split_stats("eval", evals, _counts_of(evals), seq_len, packing))
        _split_across_processes(False, process_count)
        return SFTData(train_examples, evals, seq_len, pad_id, packing, stats, process_index, process_count,
                       shuffle)

    key = None
    if args.data_cache_dir:
        names = ",".join(n for n in (args.dataset if (train or args.val_size > 1e-6) else None, args.eval_dataset)
                         if n)
        key = cache.cache_key(args, sources.resolve(names, args.dataset_dir), tokenizer, train) if names else None
        hit = cache.load(args.data_cache_dir, key) if key and not args.overwrite_cache else None
        if hit is not None:
            train_examples, evals, stats = hit
            logger.info("Tokenized data loaded from the tokenized-data cache (%s): data files, tokenizer, template "
                        "and data keys are unchanged; set overwrite_cache: true to tokenize again.",
                        Path(args.data_cache_dir).expanduser() / key)
            for split in ("train", "eval"):  # what preprocessing dropped is said on every run
                if stats.get(f"{split}_dropped"):
                    report_dropped(split, Counts(rows=stats[f"{split}_rows_read"], dropped=stats[f"{split}_dropped"],
                                                  reasons=list(stats[f"{split}_dropped_reasons"])))
            if tokenized_path and train:
                save_tokenized(tokenized_path, train_examples, evals)
            _split_across_processes(False, process_count)
            return SFTData(train_examples, evals, seq_len, pad_id, packing, stats, process_index, process_count,
                           shuffle)

    # Several hosts: each tokenizes its block of the rows and all get every block, when all of them tokenize.
    split = _split_across_processes(True, process_count)
    hosts = {"process_index": process_index, "process_count": process_count} if split else {}
    train_examples: list[Example] = []
    evals, eval_counts, stats, counts_of = None, Counts(), {}, {}
    if args.dataset and (train or args.val_size > 1e-6):
        rows_of, attrs, refs = sources.load_mixed(args.dataset, args)
        train_pos, eval_pos = sources.split(len(refs), args.val_size, args.seed)
        if train:
            train_examples, counts = encode_rows(rows_of, attrs, [refs[i] for i in train_pos], template, tokenizer,
                                                 args, **hosts)
            stats.update(_split_stats("train", train_examples, counts, seq_len, packing))
            counts_of["train"] = counts
            report_dropped("train", counts)
            report_truncated("train", counts, seq_len)
            if not train_examples and not allow_empty:
                read = ", ".join(f"{attr.path} ({len(rows)} rows)" for attr, rows in zip(attrs, rows_of))
                why = (f"{counts.dropped} of {counts.rows} rows were dropped, first reasons: "
                       + "; ".join(counts.reasons) if counts.rows else "no rows to train on")
                raise InputError(f"No training examples left after preprocessing {read}: {why}. Fix those rows, "
                                 f"or the dataset's formatting/columns in dataset_info.json; a run with no data "
                                 f"would train nothing.")
        if eval_pos:
            evals, eval_counts = encode_rows(rows_of, attrs, [refs[i] for i in eval_pos], template, tokenizer, args,
                                             **hosts)
    if args.eval_dataset:
        e_rows, e_attrs, e_refs = sources.load_mixed(args.eval_dataset, args)
        evals, eval_counts = encode_rows(e_rows, e_attrs, e_refs, template, tokenizer, args, **hosts)
    if evals is not None:
        stats.update(_split_stats("eval", evals, eval_counts, seq_len, packing))
        counts_of["eval"] = eval_counts
        report_dropped("eval", eval_counts)
        report_truncated("eval", eval_counts, seq_len)
    for split in ("train", "eval"):
        if stats.get(f"{split}_weighted_examples"):
            logger.info("%s data: %d of %d examples carry per-token loss weights (answers marked weight: w); the "
                        "loss is sum(w * ce) / sum(w)", split, stats[f"{split}_weighted_examples"],
                        stats[f"{split}_examples"])
    if key:
        cache.save(args.data_cache_dir, key, train_examples, evals, stats)
    if tokenized_path and train:
        save_tokenized(tokenized_path, train_examples, evals)
    return SFTData(train_examples, evals, seq_len, pad_id, packing, stats, process_index, process_count, shuffle,
                   counts_of)


def _split_across_processes(tokenizing: bool, process_count: int) -> bool:
    """Whether the JAX processes split tokenization: every one of them must tokenize (a host that found its
    tokenized_path or data-cache entry does not). Each process calls this once per build_datasets, on every
    path, as it is a collective. Processes simulated in one (tests) tokenize everything each."""
    if process_count <= 1:
        return False
    import jax

    if jax.process_count() != process_count:
        return False
    from jaxsft.data import hosts

    return hosts.all_agree(tokenizing)


def _has_tokenized(path: str) -> bool:
    return Path(path).is_dir() and any(Path(path).iterdir())


def _counts_of(examples: list[Example]) -> Counts:
    return Counts(rows=len(examples), examples=len(examples), tokens=sum(len(i) for i, _ in examples),
                  label_tokens=sum(learned(labels) for _, labels in examples))


def save_tokenized(path: str, train: list[Example], evals: list[Example] | None) -> None:
    """LLaMA-Factory's tokenized layout: a DatasetDict (train / validation) of input_ids, attention_mask, labels,
    typed as `datasets` types LF's Python lists (int32, int8, int64), built from flat arrays one column at a
    time, not row by row; and jaxsft's `weights` column (float32 per-token loss weights) when answers carry
    weights."""
    import datasets

    splits = {"train": datasets.Dataset(_arrow_table(train))}
    if evals is not None:
        splits["validation"] = datasets.Dataset(_arrow_table(evals))
    # Written beside the folder and renamed into place: a run killed while saving leaves no half dataset that
    # the next run would take for a finished one.
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        datasets.DatasetDict(splits).save_to_disk(str(partial))
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder named as tokenized_path is filled
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("Tokenized dataset saved at %s.", path)


def _arrow_table(examples: list[Example]):
    import pyarrow as pa

    lengths = np.fromiter((len(ids) for ids, _ in examples), np.int64, len(examples))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def column(values: np.ndarray, dtype) -> "pa.ListArray":
        return pa.ListArray.from_arrays(offsets, pa.array(values.astype(dtype)))

    ids = np.concatenate([i for i, _ in examples]) if examples else np.zeros(0, np.int32)
    labels = np.concatenate([lab for _, lab in examples]) if examples else np.zeros(0, np.int32)
    columns = {"input_ids": column(ids, np.int32), "attention_mask": column(np.ones(len(ids)), np.int8),
               "labels": column(labels, np.int64)}
    if is_weighted(examples):
        columns["weights"] = column(np.concatenate([weights_of(e) for e in examples]), np.float32)
    return pa.table(columns)


def load_tokenized(path: str) -> tuple[list[Example], list[Example] | None]:
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except Exception as e:  # datasets' own error about the user's folder
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise InputError(f"tokenized_path: {path} cannot be read as a saved dataset ({type(e).__name__}: {reason}); "
                         f"point tokenized_path at a new folder to tokenize into it") from None
    if not isinstance(saved, datasets.DatasetDict):
        saved = datasets.DatasetDict({"train": saved})
    if "position_ids" in saved["train"].column_names:
        raise InputError(f"{path} holds rows packed by LLaMA-Factory; jaxsft packs itself. Re-tokenize with "
                         "packing: false in LLaMA-Factory, or point tokenized_path at a new folder.")

    def examples(split) -> list[Example]:
        if not len(split):
            return []
        table = split.with_format("arrow")[:]  # whole columns, not row by row
        ids, labels = (table.column(name).combine_chunks() for name in ("input_ids", "labels"))
        cuts = np.asarray(ids.offsets)[1:-1]
        pairs = list(zip(np.split(np.asarray(ids.flatten(), np.int32), cuts),
                         np.split(np.asarray(labels.flatten(), np.int32), cuts)))
        if "weights" not in table.column_names:
            return pairs
        weights = np.split(np.asarray(table.column("weights").combine_chunks().flatten(), np.float32), cuts)
        return [WeightedExample(*pair, w) if not np.array_equal(w, weights_of(pair)) else pair
                for pair, w in zip(pairs, weights)]

    return examples(saved["train"]), (examples(saved["validation"]) if "validation" in saved else None)
