"""The SFT data pipeline: rows -> conversations -> (ids, labels) once -> per-epoch packed, sharded batches.

`build_datasets(args, tokenizer)` reads, converts and tokenizes everything once (kept in memory; or
saved to / loaded from `tokenized_path` in LLaMA-Factory's tokenized layout). Batches come from a grain
`MapDataset` over (epoch, row): each epoch shuffles the examples with (seed, epoch), packs them (greedy
knapsack over the whole epoch), shuffles the rows, gives row `j * process_count + process_index` to this
process, and batches `rows_per_process` rows; the iterator's `get_state()` / `set_state()` resume exactly.
With `streaming: true`, see `jaxsft.data.streaming`.
"""

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import grain
import numpy as np

from jaxsft.data import sources
from jaxsft.data.formats import InvalidExample, to_conversation
from jaxsft.data.packing import (Example, batch_widths, efficiency, empty_row, greedy_knapsack, make_row, plan_epoch,
                                 stack_rows)
from jaxsft.data.supervised import IGNORE_INDEX, encode_supervised
from jaxsft.data.templates import get_template
from jaxsft.errors import ConfigError, InputError

logger = logging.getLogger(__name__)
MAX_REASONS = 5
DEFAULTS = dict(
    eval_dataset=None, dataset_dir="data", template=None, cutoff_len=2048, max_samples=None, val_size=0.0,
    train_on_prompt=False, mask_history=False, packing=False, neat_packing=False, streaming=False,
    mix_strategy="concat", interleave_probs=None, seed=42, tokenized_path=None, skip_invalid_examples=False,
    default_system=None, enable_thinking=True, preprocessing_num_workers=None, preserve_thinking=False,
    tool_format=None, disable_shuffling=False,
)


def _arg(args: Any, name: str) -> Any:
    return getattr(args, name, DEFAULTS.get(name))


@dataclass
class Counts:
    """What preprocessing did to one split."""

    rows: int = 0  # rows read
    examples: int = 0  # examples kept
    dropped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few, with file / row / field
    tokens: int = 0
    label_tokens: int = 0  # learned targets (labels after the first token that are not IGNORE_INDEX)
    truncated: int = 0  # kept examples that cutoff_len cut
    truncated_tokens: int = 0  # the tokens cut from them

    def drop(self, reason: str) -> None:
        self.dropped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def add(self, other: "Counts") -> None:
        """Fold in the counts of another part of the same split (a worker's chunk), in order."""
        self.rows, self.examples = self.rows + other.rows, self.examples + other.examples
        self.tokens, self.label_tokens = self.tokens + other.tokens, self.label_tokens + other.label_tokens
        self.dropped += other.dropped
        self.truncated += other.truncated
        self.truncated_tokens += other.truncated_tokens
        self.reasons.extend(other.reasons[:MAX_REASONS - len(self.reasons)])


def learned(labels: np.ndarray) -> int:
    return int(np.count_nonzero(labels[1:] != IGNORE_INDEX))


# Below this many rows, starting worker processes (each imports transformers) costs more than it saves.
MIN_ROWS_PER_WORKER = 2000


def encode_rows(rows_of: list[Sequence], attrs: list, refs: Sequence[sources.RowRef], template, tokenizer,
                args: Any) -> tuple[list[Example], Counts]:
    """Convert and tokenize the referenced rows; drop (and count) invalid ones and ones with nothing to learn.

    With `preprocessing_num_workers` > 1 and enough rows, chunks are encoded in spawned worker processes
    (spawn, not fork: the parent may already run JAX threads); results and counts keep the row order.
    """
    workers = min(int(_arg(args, "preprocessing_num_workers") or 1), len(refs) // max(MIN_ROWS_PER_WORKER, 1))
    if workers <= 1:
        return _encode_serial(rows_of, attrs, refs, template, tokenizer, args)
    import concurrent.futures
    import multiprocessing

    settings = {name: _arg(args, name) for name in DEFAULTS}
    chunk = -(-len(refs) // (workers * 4))
    chunks = [list(refs[i:i + chunk]) for i in range(0, len(refs), chunk)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker,
                                                initargs=(rows_of, attrs, template, tokenizer, settings)) as pool:
        parts = list(pool.map(_encode_chunk, chunks))
    examples, counts = [], Counts()
    for part_examples, part_counts in parts:
        examples.extend(part_examples)
        counts.add(part_counts)
    return examples, counts


_WORKER: dict[str, Any] = {}


def _init_worker(rows_of, attrs, template, tokenizer, settings) -> None:
    _WORKER.update(rows_of=rows_of, attrs=attrs, template=template, tokenizer=tokenizer,
                   args=SimpleNamespace(**settings))


def _encode_chunk(refs: list) -> tuple[list[Example], Counts]:
    w = _WORKER
    return _encode_serial(w["rows_of"], w["attrs"], refs, w["template"], w["tokenizer"], w["args"])


def encode_each(rows_of: list[Sequence], attrs: list, refs: Sequence[sources.RowRef], args: Any, counts: Counts,
                encode: Callable[[Any], tuple]) -> Iterator[tuple[str, int, tuple]]:
    """(file, row number, encode(conversation)) for every referenced row that converts and encodes. A
    malformed row raises InvalidExample (file, row, field), or with `skip_invalid_examples` is dropped and
    counted, as are the rows LLaMA-Factory drops. Shared by training examples and predict prompts."""
    for ref in refs:
        attr, rows = attrs[ref.source], rows_of[ref.source]
        row_no = rows.indices[ref.row] if isinstance(rows, sources._Select) else ref.row
        counts.rows += 1
        try:
            encoded = encode(to_conversation(rows[ref.row], attr, attr.path, row_no))
        except InvalidExample as e:
            if e.kind == "malformed" and not _arg(args, "skip_invalid_examples"):
                raise
            counts.drop(str(e))
            continue
        except ValueError as e:  # a function_call / tools field that is not the JSON LF expects
            if not _arg(args, "skip_invalid_examples"):
                raise InvalidExample(attr.path, row_no, attr.messages or "", str(e)) from None
            counts.drop(f"{attr.path}, row {row_no}: {e}")
            continue
        yield attr.path, row_no, encoded


def _encode_serial(rows_of: list[Sequence], attrs: list, refs: Sequence[sources.RowRef], template, tokenizer,
                   args: Any) -> tuple[list[Example], Counts]:
    counts = Counts()
    examples: list[Example] = []
    cutoff, on_prompt, history = _arg(args, "cutoff_len"), _arg(args, "train_on_prompt"), _arg(args, "mask_history")
    preserve = bool(_arg(args, "preserve_thinking"))

    sizes: dict = {}

    def encode(conversation):
        return encode_supervised(conversation, tokenizer, template, cutoff, on_prompt, history, preserve, sizes)

    for path, row_no, (ids, labels) in encode_each(rows_of, attrs, refs, args, counts, encode):
        example = (np.asarray(ids, np.int32), np.asarray(labels, np.int32))
        n_learned = learned(example[1])
        if n_learned == 0:
            counts.drop(f"{path}, row {row_no}: no label tokens left after truncation to cutoff_len={cutoff}")
            continue
        examples.append(example)
        counts.examples += 1
        if sizes["full"] > len(ids):
            counts.truncated, counts.truncated_tokens = counts.truncated + 1, counts.truncated_tokens + sizes["full"] \
                - len(ids)
        counts.tokens += len(ids)
        counts.label_tokens += n_learned
    return examples, counts


def _load(names, args: Any) -> tuple[list[Sequence], list, list[sources.RowRef]]:
    attrs = sources.resolve(names, _arg(args, "dataset_dir"))
    rows_of = [sources.load_rows(a, _arg(args, "max_samples"), _arg(args, "seed")) for a in attrs]
    probs = sources.parse_probs(_arg(args, "interleave_probs"), len(attrs), _arg(args, "mix_strategy"))
    refs = sources.mix([len(r) for r in rows_of], _arg(args, "mix_strategy"), probs, _arg(args, "seed"))
    return rows_of, attrs, refs


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

    def rows_per_epoch(self, rows_per_process: int, seed: int = 0) -> int:
        """Rows this process reads per epoch (whole batches only; the same on every process)."""
        total = len(plan_epoch(self.lengths, self.seq_len, seed, 0, self.packing))
        return (total // self.process_count) // rows_per_process * rows_per_process

    def batches_per_epoch(self, rows_per_process: int) -> int:
        return self.rows_per_epoch(rows_per_process) // rows_per_process

    def train_dataset(self, rows_per_process: int, seed: int, num_epochs: int, buckets: Sequence[int] | None = None,
                      group_by_length: bool = False) -> grain.MapDataset:
        """Batches of `rows_per_process` rows. `buckets`: the lengths a batch may be padded to (the smallest one
        holding the longest row of the global batch, the same on every process); None pads to `seq_len`."""
        group = 50 * rows_per_process * self.process_count if group_by_length and not self.packing else 0
        rows = _EpochRows(self, self.rows_per_epoch(rows_per_process, seed), seed, num_epochs, rows_per_process,
                          list(buckets) if buckets else [self.seq_len], group)
        if len(rows) == 0:
            raise ConfigError(f"{len(self.train)} training examples make no full batch of {rows_per_process} rows "
                             f"per process x {self.process_count} processes; lower the batch size.")
        return grain.MapDataset.source(rows).batch(rows_per_process, drop_remainder=True, batch_fn=stack_rows)

    def train_iterator(self, rows_per_process: int, seed: int = 42, num_epochs: int = 1,
                       buckets: Sequence[int] | None = None, group_by_length: bool = False) -> grain.DatasetIterator:
        """Batches of `rows_per_process` rows for `num_epochs` epochs; checkpoint with get_state()/set_state()."""
        ds = self.train_dataset(rows_per_process, seed, num_epochs, buckets, group_by_length)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

    def eval_batches(self, rows_per_process: int, buckets: Sequence[int] | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Every eval example once (packed when training is), in order; short batches padded with empty rows
        (all targets IGNORE_INDEX), the same number of batches on every process. Each global batch is padded
        to the smallest of `buckets` holding its longest row (None: `seq_len`)."""
        if not self.eval:
            return
        lengths = [len(ids) for ids, _ in self.eval]
        plan = greedy_knapsack(lengths, self.seq_len)[0] if self.packing else [[i] for i in range(len(lengths))]
        mine = plan[self.process_index::self.process_count]
        per_process = -(-len(plan) // self.process_count)
        n_batches = -(-per_process // rows_per_process)
        widths = batch_widths([sum(lengths[i] for i in m) for m in plan], rows_per_process * self.process_count,
                              list(buckets) if buckets else [self.seq_len])
        for b in range(n_batches):
            members = mine[b * rows_per_process:(b + 1) * rows_per_process]
            rows = [make_row(self.eval, m, widths[b], self.pad_id) for m in members]
            rows += [empty_row(widths[b], self.pad_id)] * (rows_per_process - len(rows))
            yield stack_rows(rows)

    def __post_init__(self) -> None:
        self.lengths = [len(ids) for ids, _ in self.train]


class _EpochRows(Sequence):
    """Random access to this process's rows across epochs: row i is (epoch i // R, j = i % R)."""

    def __init__(self, data: SFTData, rows_per_epoch: int, seed: int, num_epochs: int, rows_per_batch: int,
                 buckets: list[int], group: int = 0):
        self.data, self.rows_per_epoch, self.seed, self.num_epochs = data, rows_per_epoch, seed, num_epochs
        self.rows_per_batch, self.buckets, self.group = rows_per_batch, buckets, group
        self._plans: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.rows_per_epoch * self.num_epochs

    def _plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's rows (example indices, all processes) and the padded length of each global batch."""
        with self._lock:
            if epoch not in self._plans:
                if len(self._plans) > 2:
                    self._plans.pop(min(self._plans))
                d = self.data
                plan = plan_epoch(d.lengths, d.seq_len, self.seed, epoch, d.packing, d.shuffle, self.group)
                widths = batch_widths([sum(d.lengths[i] for i in m) for m in plan],
                                      self.rows_per_batch * d.process_count, self.buckets)
                self._plans[epoch] = (plan, widths)
            return self._plans[epoch]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        epoch, j = divmod(i, self.rows_per_epoch)
        d = self.data
        plan, widths = self._plan(epoch)
        return make_row(d.train, plan[j * d.process_count + d.process_index], widths[j // self.rows_per_batch],
                        d.pad_id)


def _split_stats(name: str, examples: list[Example], counts: Counts, seq_len: int, packing: bool) -> dict:
    lengths = [len(ids) for ids, _ in examples]
    rows = len(greedy_knapsack(lengths, seq_len)[0]) if packing else len(lengths)
    return {f"{name}_rows_read": counts.rows, f"{name}_examples": counts.examples, f"{name}_dropped": counts.dropped,
            f"{name}_dropped_reasons": counts.reasons, f"{name}_tokens": counts.tokens,
            f"{name}_label_tokens": counts.label_tokens, f"{name}_packed_rows": rows,
            f"{name}_truncated": counts.truncated, f"{name}_truncated_tokens": counts.truncated_tokens,
            f"{name}_packing_efficiency": efficiency(lengths, rows, seq_len)}


def build_datasets(args: Any, tokenizer, *, process_index: int = 0, process_count: int = 1):
    """Everything training and evaluation read, from LLaMA-Factory-named data arguments (see DEFAULTS).

    The tokenizer is fixed in place as LF does (a template's EOS / pad / stop words). Returns an `SFTData`,
    or a `streaming.StreamingSFTData` when `args.streaming`.
    """
    if _arg(args, "mask_history") and _arg(args, "train_on_prompt"):
        raise ConfigError("mask_history and train_on_prompt cannot both be true (as in LLaMA-Factory).")
    if _arg(args, "eval_dataset") and _arg(args, "val_size") > 1e-6:
        raise ConfigError("Set either val_size or eval_dataset, not both (as in LLaMA-Factory).")
    template = get_template(
        _arg(args, "template") or "empty", tokenizer, default_system=_arg(args, "default_system"),
        enable_thinking=_arg(args, "enable_thinking"), train_on_prompt=_arg(args, "train_on_prompt"),
        tool_format=_arg(args, "tool_format"),
    )
    seq_len = int(_arg(args, "cutoff_len"))
    packing = bool(_arg(args, "packing") or _arg(args, "neat_packing"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shuffle = not _arg(args, "disable_shuffling")
    if _arg(args, "streaming"):
        from jaxsft.data.streaming import StreamingSFTData

        return StreamingSFTData.build(args, tokenizer, template, process_index=process_index,
                                      process_count=process_count)
    tokenized_path = _arg(args, "tokenized_path")
    if tokenized_path and Path(tokenized_path).is_dir() and any(Path(tokenized_path).iterdir()):
        logger.warning("Loading the tokenized dataset from %s; other data arguments are ignored.", tokenized_path)
        train, evals = load_tokenized(tokenized_path)
        stats = {"source": f"tokenized_path {tokenized_path}"}
        stats.update(_split_stats("train", train, _counts_of(train), seq_len, packing))
        if evals is not None:
            stats.update(_split_stats("eval", evals, _counts_of(evals), seq_len, packing))
        return SFTData(train, evals, seq_len, pad_id, packing, stats, process_index, process_count, shuffle)

    rows_of, attrs, refs = _load(_arg(args, "dataset"), args)
    train_pos, eval_pos = sources.split(len(refs), float(_arg(args, "val_size") or 0), _arg(args, "seed"))
    train, counts = encode_rows(rows_of, attrs, [refs[i] for i in train_pos], template, tokenizer, args)
    stats = _split_stats("train", train, counts, seq_len, packing)
    evals = None
    if eval_pos:
        evals, eval_counts = encode_rows(rows_of, attrs, [refs[i] for i in eval_pos], template, tokenizer, args)
    elif _arg(args, "eval_dataset"):
        e_rows, e_attrs, e_refs = _load(_arg(args, "eval_dataset"), args)
        evals, eval_counts = encode_rows(e_rows, e_attrs, e_refs, template, tokenizer, args)
    if evals is not None:
        stats.update(_split_stats("eval", evals, eval_counts, seq_len, packing))
    _report_dropped("train", counts)
    _report_truncated("train", counts, seq_len)
    if evals is not None:
        _report_dropped("eval", eval_counts)
        _report_truncated("eval", eval_counts, seq_len)
    if not train:
        read = ", ".join(f"{attr.path} ({len(rows)} rows)" for attr, rows in zip(attrs, rows_of))
        why = (f"{counts.dropped} of {counts.rows} rows were dropped, first reasons: " + "; ".join(counts.reasons)
               if counts.rows else "no rows to train on")
        raise InputError(f"No training examples left after preprocessing {read}: {why}. Fix those rows, or the "
                         f"dataset's formatting/columns in dataset_info.json; a run with no data would train nothing.")
    if tokenized_path:
        save_tokenized(tokenized_path, train, evals)
    return SFTData(train, evals, seq_len, pad_id, packing, stats, process_index, process_count, shuffle)


def _report_dropped(split: str, counts: Counts) -> None:
    if counts.dropped:
        logger.warning("%s data: dropped %d of %d rows (the run goes on without them); first reasons:\n  %s",
                       split, counts.dropped, counts.rows, "\n  ".join(counts.reasons))


TRUNCATED_WARN = 0.05  # above this share of examples cut by cutoff_len, the report is a warning


def _report_truncated(split: str, counts: Counts, cutoff: int) -> None:
    """Every run says how many examples cutoff_len cut and how many tokens that lost."""
    if not counts.examples:
        return
    share = counts.truncated / counts.examples
    level = logging.WARNING if share > TRUNCATED_WARN else logging.INFO
    hint = "; raise cutoff_len to keep more" if share > TRUNCATED_WARN else ""
    logger.log(level, "%s data: %d of %d examples (%.1f%%) were longer than cutoff_len=%d and were truncated, "
               "%d tokens cut%s", split, counts.truncated, counts.examples, 100 * share, cutoff,
               counts.truncated_tokens, hint)


def _counts_of(examples: list[Example]) -> Counts:
    return Counts(rows=len(examples), examples=len(examples), tokens=sum(len(i) for i, _ in examples),
                  label_tokens=sum(learned(labels) for _, labels in examples))


def save_tokenized(path: str, train: list[Example], evals: list[Example] | None) -> None:
    """LLaMA-Factory's tokenized layout: a DatasetDict (train / validation) of input_ids, attention_mask, labels."""
    import datasets

    def table(examples: list[Example]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "input_ids": [ids.tolist() for ids, _ in examples],
            "attention_mask": [[1] * len(ids) for ids, _ in examples],
            "labels": [labels.tolist() for _, labels in examples],
        })

    splits = {"train": table(train)}
    if evals is not None:
        splits["validation"] = table(evals)
    datasets.DatasetDict(splits).save_to_disk(path)
    logger.info("Tokenized dataset saved at %s.", path)


def load_tokenized(path: str) -> tuple[list[Example], list[Example] | None]:
    import datasets

    saved = datasets.load_from_disk(path)
    if not isinstance(saved, datasets.DatasetDict):
        saved = datasets.DatasetDict({"train": saved})
    if "position_ids" in saved["train"].column_names:
        raise ValueError(f"{path} holds rows packed by LLaMA-Factory; jaxsft packs itself. Re-tokenize with "
                         "packing: false in LLaMA-Factory, or point tokenized_path at a new folder.")

    def examples(split) -> list[Example]:
        split = split.with_format("numpy")
        return [(np.asarray(r["input_ids"], np.int32), np.asarray(r["labels"], np.int32)) for r in split]

    return examples(saved["train"]), (examples(saved["validation"]) if "validation" in saved else None)
