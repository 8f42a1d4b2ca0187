"""`streaming: true`: rows are read lazily (jsonl line by line, columnar files through `datasets` streaming),
encoded by the shared row encoder (`jaxsft.data.encode`, same error policy as in memory) as they come and
shuffled and packed per buffer of `buffer_size` examples, so a dataset never sits in memory whole.

Differences from the in-memory path (and from LF streaming): examples are shuffled within a buffer, not
across the dataset; `interleave_*` draws sources with a seeded RNG per (seed, epoch) (not HF's interleave
order). `val_size` must be a count: the eval split is the first N rows of epoch 0's stream, held by their
identity (source, row number), and training skips exactly those rows in every epoch, wherever a later
epoch's mix puts them. Rows always carry `weights` (per-token loss weights; a stream cannot know ahead
whether a later answer carries one, and a run's batches keep one layout). With several processes, the rows
of a buffer past the last multiple of `process_count` are skipped so every process gets the same number of
rows.

The training iterator goes from epoch to epoch until the loop stops: the planned steps are counted from
epoch 0 (`batches_per_epoch`), and an interleaved mix holds a different number of rows each epoch, so a
run never ends short of its plan. Its state is (epoch, rows read before the current buffer, rows of the
buffer already emitted): resuming re-reads (without re-tokenizing) up to that point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np

from jaxsft.data import sources
from jaxsft.data.args import DataArgs
from jaxsft.data.encode import (Counts, encode_list, encode_rows, report_dropped, report_truncated,
                                 supervised_examples)
from jaxsft.data.packing import Example, bucket_for, eval_batches, fit_width, greedy_knapsack, make_row, stack_rows
from jaxsft.data.registry import DatasetAttr
from jaxsft.errors import ConfigError

RowId = tuple[int, int]  # (source index, row number in that source's stream)


def _raw_rows(attrs: list, strategy: str, probs: list[float] | None, seed: int,
              epoch: int) -> Iterator[tuple[RowId, DatasetAttr, Any]]:
    """((source, row number), source, row) of the merged stream of one epoch."""
    if len(attrs) == 1 or strategy == "concat":
        for k, attr in enumerate(attrs):
            for i, row in enumerate(sources.iter_rows(attr)):
                yield (k, i), attr, row
        return
    rng = np.random.default_rng([seed, epoch])
    its = [enumerate(sources.iter_rows(a)) for a in attrs]
    exhausted = [False] * len(attrs)
    p = np.asarray(probs if probs else [1.0] * len(attrs), float)
    p = p / p.sum()
    while True:
        k = int(rng.choice(len(attrs), p=p))
        nxt = next(its[k], None)
        if nxt is None:
            exhausted[k] = True
            if strategy.endswith("under") or all(exhausted):
                return
            its[k] = enumerate(sources.iter_rows(attrs[k]))
            nxt = next(its[k], None)
            if nxt is None:
                return
        yield (k, nxt[0]), attrs[k], nxt[1]


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, data: "StreamingSFTData", seed: int, num_epochs: int | None, tally: Counts | None = None):
        super().__init__()
        self._d, self._seed, self._num_epochs, self._tally = data, seed, num_epochs, tally
        self.set_state({"epoch": 0, "consumed": 0, "emitted": 0})

    def _done(self) -> bool:
        return self._num_epochs is not None and self._epoch >= self._num_epochs

    def _open(self) -> None:
        d = self._d
        rows = ((attr, i, row) for (k, i), attr, row in
                _raw_rows(d.attrs, d.args.mix_strategy, d.probs, self._seed, self._epoch)
                if (k, i) not in d.held_out)
        self._stream = itertools.islice(rows, self._consumed, None)
        self._bins: list[list[int]] | None = None
        self._whole_epoch, self._gave_rows = self._consumed == 0 and self._emitted == 0, False

    def _fill(self) -> None:
        """Read and encode the next buffer of examples; shuffle and pack it."""
        d = self._d
        counts = Counts()
        self._examples: list[Example] = []
        for example in supervised_examples(self._stream, d.template, d.tokenizer, d.args, counts):
            self._examples.append(example)
            if len(self._examples) == d.args.buffer_size:
                break
        self._read = counts.rows
        if self._tally is not None:
            self._tally.add(counts)
        rng = np.random.default_rng([self._seed, self._epoch, self._consumed])
        order = rng.permutation(len(self._examples)).tolist()
        if d.args.packing:
            bins, _ = greedy_knapsack([len(e[0]) for e in self._examples], d.seq_len, order)
            self._bins = [bins[i] for i in rng.permutation(len(bins))]
        else:
            self._bins = [[i] for i in order]
        self._usable = len(self._bins) // d.process_count * d.process_count

    def __next__(self) -> dict[str, np.ndarray]:
        d = self._d
        while True:
            if self._done():
                raise StopIteration
            if self._bins is None:
                self._fill()
                if self._read == 0:  # the epoch's stream is exhausted: next epoch
                    if self._whole_epoch and not self._gave_rows:  # a whole epoch gave no row: stop cycling
                        raise StopIteration
                    self._epoch, self._consumed, self._emitted = self._epoch + 1, 0, 0
                    if not self._done():
                        self._open()
                    continue
            if self._emitted < self._usable:
                g = self._emitted
                self._emitted += 1
                if g % d.process_count == d.process_index:
                    self._gave_rows = True
                    return make_row(self._examples, self._bins[g], d.seq_len, d.pad_id, weighted=True)
                continue
            self._consumed += self._read
            self._emitted = 0
            self._bins = None

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed": self._consumed, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._consumed, self._emitted = state["epoch"], state["consumed"], state["emitted"]
        self._bins = None
        if not self._done():
            self._open()


class _StreamDataset(grain.IterDataset):
    def __init__(self, data: "StreamingSFTData", seed: int, num_epochs: int | None):
        super().__init__()
        self._data, self._seed, self._num_epochs = data, seed, num_epochs

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self._data, self._seed, self._num_epochs)


@dataclass
class StreamingSFTData:
    args: DataArgs
    tokenizer: Any
    template: Any
    attrs: list
    probs: list[float] | None
    pad_id: int
    held_out: frozenset[RowId]  # the rows of `dataset` kept for eval (val_size): never trained on
    eval: list[Example] | None
    stats: dict[str, Any] = field(default_factory=dict)
    process_index: int = 0
    process_count: int = 1
    train: list = field(default_factory=list)  # streaming keeps no training examples in memory
    retention: list[Example] | None = None  # `retention_dataset`, in memory (replay needs in-memory data)
    replay = None
    streaming = True
    weighted = True  # rows carry per-token loss weights (see the module docstring)

    @property
    def seq_len(self) -> int:
        return self.args.cutoff_len

    @property
    def packing(self) -> bool:
        return self.args.packing

    def batches_per_epoch(self, rows_per_process: int) -> int:
        """Whole batches in epoch 0 (the seed's draw of the mix), counted by one pass over the stream; the
        pass also counts, and reports as an in-memory run does, the rows dropped and the examples truncated."""
        key = ("batches_per_epoch", rows_per_process)
        if key not in self.stats:
            tally = Counts()
            rows = sum(1 for _ in _StreamIterator(self, self.args.seed, 1, tally))
            self.stats[key] = rows // rows_per_process
            if "train_examples" not in self.stats:
                self.stats.update(train_rows_read=tally.rows, train_examples=tally.examples,
                                  train_dropped=tally.dropped, train_dropped_reasons=tally.reasons,
                                  train_tokens=tally.tokens, train_label_tokens=tally.label_tokens,
                                  train_truncated=tally.truncated, train_truncated_tokens=tally.truncated_tokens)
                report_dropped("train", tally)
                report_truncated("train", tally, self.args.cutoff_len)
        return self.stats[key]

    @classmethod
    def build(cls, args: DataArgs, tokenizer, template, *, train: bool = True, process_index: int = 0,
              process_count: int = 1) -> "StreamingSFTData":
        if args.max_samples is not None:
            raise ConfigError("max_samples cannot be used with streaming (as in LLaMA-Factory).")
        if 0 < args.val_size < 1:
            raise ConfigError(f"val_size: {args.val_size} is a fraction; with streaming, val_size must be a "
                              f"number of rows (>= 1).")
        attrs = sources.resolve(args.dataset, args.dataset_dir) if args.dataset else []
        for attr in attrs:  # a column typo must not stream empty turns (in memory, load_rows checks all rows)
            sources.check_head_columns(attr)
        probs = sources.parse_probs(args.interleave_probs, len(attrs), args.mix_strategy) if attrs else None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        data = cls(args, tokenizer, template, attrs, probs, pad_id, frozenset(), None, {"streaming": True},
                   process_index, process_count)
        if args.val_size >= 1 and attrs:
            head = list(itertools.islice(_raw_rows(attrs, args.mix_strategy, probs, args.seed, 0),
                                         int(args.val_size)))
            data.held_out = frozenset(row_id for row_id, _, _ in head)
            data.eval, _ = encode_list(((attr, i, row) for (_, i), attr, row in head), template, tokenizer, args)
        elif args.eval_dataset:
            e_rows, e_attrs, e_refs = sources.load_mixed(args.eval_dataset, args)
            data.eval, _ = encode_rows(e_rows, e_attrs, e_refs, template, tokenizer, args)
        return data

    def train_iterator(self, rows_per_process: int, seed: int, num_epochs: int | None = None,
                       buckets: list[int] | None = None, group_by_length: bool = False) -> grain.DatasetIterator:
        """Batches of this process's rows, epoch after epoch (all of them with `num_epochs: None`). `buckets`:
        with one process, each batch is cut to the smallest bucket holding its longest row (with several,
        processes cannot see each other's rows of a batch, so rows keep `seq_len`). `group_by_length` has no
        effect on a stream."""
        batch_fn = stack_rows
        if buckets and self.process_count == 1:
            def batch_fn(rows):
                longest = max(int(np.count_nonzero(r["segment_ids"])) for r in rows)
                return fit_width(stack_rows(rows), bucket_for(longest, buckets), self.pad_id)
        ds = _StreamDataset(self, seed, num_epochs).batch(rows_per_process, drop_remainder=True, batch_fn=batch_fn)
        return iter(ds)

    def eval_batches(self, rows_per_process: int, buckets: list[int] | None = None):
        return eval_batches(self.eval or [], self.seq_len, self.pad_id, self.packing, rows_per_process,
                            self.process_index, self.process_count, buckets)

    def retention_batches(self, rows_per_process: int, buckets: list[int] | None = None):
        return eval_batches(self.retention or [], self.seq_len, self.pad_id, self.packing, rows_per_process,
                            self.process_index, self.process_count, buckets)
