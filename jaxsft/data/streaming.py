"""`streaming: true`: rows are read lazily (jsonl line by line, columnar files through `datasets` streaming),
tokenized as they come and packed per buffer of `preprocessing_batch_size` examples (1000, LF's batch), so
a dataset never sits in memory whole.

Differences from the in-memory path (and from LF streaming): examples are shuffled within a buffer, not
across the dataset (LF uses a 16384-row shuffle buffer before splitting); `val_size` must be a count and
takes the first rows; `interleave_*` draws sources with a seeded RNG (not HF's interleave order). With
several processes, the rows of a buffer past the last multiple of `process_count` are skipped so every
process gets the same number of rows. The iterator state is (epoch, raw rows consumed before the current
buffer, rows of the buffer already emitted): resuming re-reads (without re-tokenizing) up to that point.
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np

from jaxsft.data import sources
from jaxsft.data.formats import InvalidExample, to_conversation
from jaxsft.data.packing import Example, bucket_for, fit_width, greedy_knapsack, make_row, stack_rows
from jaxsft.data.pipeline import SFTData, _arg, encode_rows, learned
from jaxsft.data.supervised import encode_supervised


def _raw_rows(attrs: list, strategy: str, probs: list[float] | None, seed: int, epoch: int) -> Iterator[tuple]:
    """(attr, row number, row) of the merged stream."""
    if len(attrs) == 1 or strategy == "concat":
        for attr in attrs:
            for i, row in enumerate(sources.iter_rows(attr)):
                yield attr, i, row
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
        yield attrs[k], nxt[0], nxt[1]


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, data: "StreamingSFTData", seed: int, num_epochs: int):
        super().__init__()
        self._d, self._seed, self._num_epochs = data, seed, num_epochs
        self.set_state({"epoch": 0, "consumed": 0, "emitted": 0})

    def _open(self) -> None:
        d = self._d
        stream = _raw_rows(d.attrs, d.mix_strategy, d.probs, self._seed, self._epoch)
        self._stream = itertools.islice(stream, d.skip_rows + self._consumed, None)
        self._bins: list[list[int]] | None = None

    def _fill(self) -> None:
        """Read and encode the next buffer of examples; pack it."""
        d = self._d
        self._examples: list[Example] = []
        self._read = 0
        for attr, row_no, row in self._stream:
            self._read += 1
            try:
                conv = to_conversation(row, attr, attr.path, row_no)
                ids, labels = encode_supervised(conv, d.tokenizer, d.template, d.seq_len, d.train_on_prompt,
                                                d.mask_history, d.preserve_thinking)
            except (InvalidExample, ValueError) as e:
                if not d.skip_invalid and not (isinstance(e, InvalidExample) and e.kind == "dropped"):
                    raise
                continue
            example = (np.asarray(ids, np.int32), np.asarray(labels, np.int32))
            if learned(example[1]):
                self._examples.append(example)
            if len(self._examples) == d.buffer_size:
                break
        rng = np.random.default_rng([self._seed, self._epoch, self._consumed])
        order = rng.permutation(len(self._examples)).tolist()
        if d.packing:
            bins, _ = greedy_knapsack([len(e[0]) for e in self._examples], d.seq_len, order)
            self._bins = [bins[i] for i in rng.permutation(len(bins))]
        else:
            self._bins = [[i] for i in order]
        self._usable = len(self._bins) // d.process_count * d.process_count

    def __next__(self) -> dict[str, np.ndarray]:
        d = self._d
        while True:
            if self._epoch >= self._num_epochs:
                raise StopIteration
            if self._bins is None:
                self._fill()
                if self._read == 0:  # the stream is exhausted: next epoch
                    self._epoch, self._consumed, self._emitted = self._epoch + 1, 0, 0
                    if self._epoch < self._num_epochs:
                        self._open()
                    continue
            if self._emitted < self._usable:
                g = self._emitted
                self._emitted += 1
                if g % d.process_count == d.process_index:
                    return make_row(self._examples, self._bins[g], d.seq_len, d.pad_id)
                continue
            self._consumed += self._read
            self._emitted = 0
            self._bins = None

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed": self._consumed, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._consumed, self._emitted = state["epoch"], state["consumed"], state["emitted"]
        self._bins = None
        if self._epoch < self._num_epochs:
            self._open()


class _StreamDataset(grain.IterDataset):
    def __init__(self, data: "StreamingSFTData", seed: int, num_epochs: int):
        super().__init__()
        self._data, self._seed, self._num_epochs = data, seed, num_epochs

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self._data, self._seed, self._num_epochs)


@dataclass
class StreamingSFTData:
    tokenizer: Any
    template: Any
    attrs: list
    mix_strategy: str
    probs: list[float] | None
    seq_len: int
    pad_id: int
    packing: bool
    train_on_prompt: bool
    mask_history: bool
    preserve_thinking: bool
    skip_invalid: bool
    buffer_size: int
    skip_rows: int  # the first rows, kept for eval (val_size)
    eval: list[Example] | None
    stats: dict[str, Any] = field(default_factory=dict)
    process_index: int = 0
    process_count: int = 1
    train: list = field(default_factory=list)  # streaming keeps no training examples in memory

    def batches_per_epoch(self, rows_per_process: int, seed: int = 42) -> int:
        """Counted by one pass over the stream (everything is tokenized once; memory stays bounded)."""
        key = ("batches_per_epoch", rows_per_process, seed)
        if key not in self.stats:
            rows = sum(1 for _ in _StreamIterator(self, seed, 1))
            self.stats[key] = rows // rows_per_process
        return self.stats[key]

    @classmethod
    def build(cls, args: Any, tokenizer, template, *, process_index: int = 0, process_count: int = 1):
        if _arg(args, "max_samples") is not None:
            raise ValueError("max_samples cannot be used with streaming (as in LLaMA-Factory).")
        val_size = float(_arg(args, "val_size") or 0)
        if 0 < val_size < 1:
            raise ValueError("With streaming, val_size must be a number of rows (>= 1), not a fraction.")
        attrs = sources.resolve(_arg(args, "dataset"), _arg(args, "dataset_dir"))
        probs = sources.parse_probs(_arg(args, "interleave_probs"), len(attrs), _arg(args, "mix_strategy"))
        data = cls(tokenizer, template, attrs, _arg(args, "mix_strategy"), probs, int(_arg(args, "cutoff_len")),
                   tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                   bool(_arg(args, "packing") or _arg(args, "neat_packing")), bool(_arg(args, "train_on_prompt")),
                   bool(_arg(args, "mask_history")), bool(_arg(args, "preserve_thinking")),
                   bool(_arg(args, "skip_invalid_examples")), int(getattr(args, "preprocessing_batch_size", 1000)),
                   int(val_size), None, {"streaming": True}, process_index, process_count)
        if val_size >= 1:
            head = list(itertools.islice(_raw_rows(attrs, data.mix_strategy, probs, _arg(args, "seed"), 0),
                                         int(val_size)))
            data.eval, _ = _encode_head(head, data, args)
        elif _arg(args, "eval_dataset"):
            from jaxsft.data.pipeline import _load

            e_rows, e_attrs, e_refs = _load(_arg(args, "eval_dataset"), args)
            data.eval, _ = encode_rows(e_rows, e_attrs, e_refs, template, tokenizer, args)
        return data

    def train_iterator(self, rows_per_process: int, seed: int = 42, num_epochs: int = 1,
                       buckets: list[int] | None = None, group_by_length: bool = False) -> grain.DatasetIterator:
        """`buckets`: with one process, each batch is cut to the smallest bucket holding its longest row (with
        several, processes cannot see each other's rows of a batch, so rows keep `seq_len`). `group_by_length`
        has no effect on a stream."""
        batch_fn = stack_rows
        if buckets and self.process_count == 1:
            def batch_fn(rows):
                longest = max(int(np.count_nonzero(r["segment_ids"])) for r in rows)
                return fit_width(stack_rows(rows), bucket_for(longest, buckets), self.pad_id)
        ds = _StreamDataset(self, seed, num_epochs).batch(rows_per_process, drop_remainder=True, batch_fn=batch_fn)
        return iter(ds)

    def eval_batches(self, rows_per_process: int, buckets: list[int] | None = None):
        if not self.eval:
            return iter(())
        view = SFTData([], self.eval, self.seq_len, self.pad_id, self.packing, {}, self.process_index,
                       self.process_count)
        return view.eval_batches(rows_per_process, buckets)


def _encode_head(head: list[tuple], data: StreamingSFTData, args: Any):
    attrs = sorted({id(a): a for a, _, _ in head}.values(), key=lambda a: data.attrs.index(a))
    index = {id(a): k for k, a in enumerate(attrs)}
    rows_of: list[dict] = [dict() for _ in attrs]
    refs = []
    for attr, row_no, row in head:
        rows_of[index[id(attr)]][row_no] = row
        refs.append(sources.RowRef(index[id(attr)], row_no))
    return encode_rows(rows_of, attrs, refs, data.template, data.tokenizer, args)
