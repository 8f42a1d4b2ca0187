"""Greedy knapsack packing and the row layout of `docs/internals.md` (input_ids, targets, segment_ids, positions,
and `weights` when a dataset's answers carry loss weights).

`greedy_knapsack` makes the same choices as LLaMA-Factory's (sort ascending; fill each bin by repeatedly
taking the largest length that still fits; among equal lengths the last one seen goes first) in
O(n + C) time instead of LF's O(n^2) list pops, using a predecessor structure over lengths 1..C (a
union-find that skips emptied lengths). Differences from LF, on purpose:
- jaxsft packs a whole epoch's examples at once (LF packs each 1000-example preprocessing batch on its
  own), so fewer rows are left part-empty;
- the capacity is `cutoff_len` tokens: targets are already shifted, so an example of n tokens needs n
  positions and yields n-1 targets (LF encodes at `cutoff_len - 1` when packing and pads rows to
  `cutoff_len`, which wastes one position per row).
"""

from collections.abc import Iterator, Sequence

import numpy as np

IGNORE_INDEX = -100
Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels), int32, same length; or a WeightedExample


class WeightedExample(tuple):
    """An example whose label tokens carry loss weights other than 1: unpacks as `(input_ids, labels)` like
    any example; `weights` is float32 per position, aligned with labels (0 where the label is IGNORE_INDEX).
    Only such examples carry weights, so data without weights costs nothing more."""

    def __new__(cls, input_ids: np.ndarray, labels: np.ndarray, weights: np.ndarray):
        self = super().__new__(cls, (input_ids, labels))
        self.weights = weights
        return self

    def __reduce__(self):
        return WeightedExample, (self[0], self[1], self.weights)


def weights_of(example: Example) -> np.ndarray:
    """Per-position loss weights of an example's labels: its own, else 1 on every label token."""
    weights = getattr(example, "weights", None)
    return weights if weights is not None else (np.asarray(example[1]) != IGNORE_INDEX).astype(np.float32)


def is_weighted(examples) -> bool:
    """Whether any example carries loss weights (then its batches carry a `weights` array)."""
    return any(getattr(e, "weights", None) is not None for e in examples or ())


def greedy_knapsack(
    lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None
) -> tuple[list[list[int]], list[int]]:
    """(bins of example indices, indices too long to fit). `order`: the order examples are seen (ties)."""
    order = range(len(lengths)) if order is None else order
    stacks: list[list[int]] = [[] for _ in range(capacity + 1)]
    too_long = []
    for i in order:
        n = int(lengths[i])
        if n > capacity or n <= 0:
            too_long.append(i)
        else:
            stacks[n].append(i)
    # parent[l] == l: length l still has examples; else follow parent down to the next candidate; 0 = none
    parent = [ln if stacks[ln] else ln - 1 for ln in range(capacity + 1)]
    parent[0] = 0

    def largest_at_most(ln: int) -> int:
        root = ln
        while parent[root] != root:
            root = parent[root]
        while parent[ln] != root:  # path compression
            parent[ln], ln = root, parent[ln]
        return root

    remaining = len(order) - len(too_long)
    bins = []
    while remaining:
        room, current = capacity, []
        while (ln := largest_at_most(room)) > 0:
            current.append(stacks[ln].pop())
            room -= ln
            if not stacks[ln]:
                parent[ln] = ln - 1
        remaining -= len(current)
        bins.append(current)
    return bins, too_long


def make_row(examples: Sequence[Example], members: Sequence[int], seq_len: int, pad_id: int,
             weighted: bool = False) -> dict[str, np.ndarray]:
    """One row of length `seq_len` holding `examples[m]` for m in members, back to back, then padding.
    `weighted`: the row also has `weights` (float32, the loss weight of each target; 0 on padding)."""
    input_ids = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, IGNORE_INDEX, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    weights = np.zeros(seq_len, np.float32) if weighted else None
    start = 0
    for segment, m in enumerate(members, 1):
        ids, labels = examples[m]
        n = len(ids)
        if start + n > seq_len:
            raise ValueError(f"examples of {start + n} tokens do not fit a row of {seq_len}")
        input_ids[start:start + n] = ids
        targets[start:start + n - 1] = labels[1:]  # the last token of an example predicts nothing
        segment_ids[start:start + n] = segment
        positions[start:start + n] = np.arange(n, dtype=np.int32)
        if weighted:
            weights[start:start + n - 1] = weights_of(examples[m])[1:]
        start += n
    row = {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids, "positions": positions}
    if weighted:
        row["weights"] = weights
    return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def length_buckets(seq_len: int, smallest: int = 64) -> list[int]:
    """The row lengths a batch may be padded to: 64, 96, 128, 192, 256, 384, ... (two steps per doubling,
    so a batch wastes at most a third of its positions on rounding up), ending at `seq_len`. Few and fixed,
    so the train step compiles for at most ~2 log2(seq_len / 64) + 1 shapes."""
    sizes, base = [], smallest
    while base < seq_len:
        sizes += [s for s in (base, base * 3 // 2) if s < seq_len]
        base *= 2
    return sizes + [seq_len]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens (the last bucket if none does)."""
    i = int(np.searchsorted(np.asarray(buckets), length))
    return int(buckets[min(i, len(buckets) - 1)])


def batch_widths(row_lengths: Sequence[int], rows_per_batch: int, buckets: Sequence[int]) -> list[int]:
    """The padded length of each global batch of `rows_per_batch` consecutive rows: the bucket of its longest
    row. Every process computes it from the whole plan, so all of them pad a batch alike."""
    lengths = np.asarray(row_lengths, np.int64)
    n = len(lengths) // rows_per_batch * rows_per_batch
    longest = lengths[:n].reshape(-1, rows_per_batch).max(axis=1) if n else np.zeros(0, np.int64)
    tail = [int(lengths[n:].max())] if n < len(lengths) else []
    return [bucket_for(int(m), buckets) for m in [*longest.tolist(), *tail]]


def fit_width(batch: dict[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch (rows on the last axis) cut or padded to `width` positions; cutting drops only padding."""
    have = batch["input_ids"].shape[-1]
    if have >= width:
        if have > width and (batch["segment_ids"][..., width:] != 0).any():
            raise ValueError(f"a row holds more than {width} tokens")
        return {k: v[..., :width] for k, v in batch.items()}
    fill = {"input_ids": pad_id, "targets": IGNORE_INDEX, "segment_ids": 0, "positions": 0, "replay": 0,
            "weights": 0.0}
    pad = [(0, 0)] * (batch["input_ids"].ndim - 1) + [(0, width - have)]
    return {k: np.pad(v, pad, constant_values=fill[k]) for k, v in batch.items()}


def empty_row(seq_len: int, pad_id: int, weighted: bool = False) -> dict[str, np.ndarray]:
    return make_row([], [], seq_len, pad_id, weighted)


def eval_batches(examples: Sequence[Example], seq_len: int, pad_id: int, packing: bool, rows_per_process: int,
                 process_index: int = 0, process_count: int = 1, buckets: Sequence[int] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Every example once (packed when training is), in order; short batches padded with empty rows (all
    targets IGNORE_INDEX), the same number of batches on every process. Each global batch is padded to the
    smallest of `buckets` holding its longest row (None: `seq_len`). Rows carry `weights` when any example
    does."""
    if not examples:
        return
    weighted = is_weighted(examples)
    lengths = [len(ids) for ids, _ in examples]
    plan = greedy_knapsack(lengths, seq_len)[0] if packing else [[i] for i in range(len(lengths))]
    mine = plan[process_index::process_count]
    per_process = -(-len(plan) // process_count)
    widths = batch_widths([sum(lengths[i] for i in m) for m in plan], rows_per_process * process_count,
                          list(buckets) if buckets else [seq_len])
    for b in range(-(-per_process // rows_per_process)):
        members = mine[b * rows_per_process:(b + 1) * rows_per_process]
        rows = [make_row(examples, m, widths[b], pad_id, weighted) for m in members]
        rows += [empty_row(widths[b], pad_id, weighted)] * (rows_per_process - len(rows))
        yield stack_rows(rows)


def plan_epoch(
    lengths: Sequence[int], seq_len: int, seed: int, epoch: int, packing: bool, shuffle: bool = True,
    group: int = 0,
) -> list[list[int]]:
    """The rows of one epoch, as lists of example indices: examples shuffled (seed, epoch), then packed
    (ties between equal lengths follow the shuffle) and the rows shuffled; or one example per row.
    Without `shuffle`, examples and rows keep their order (every epoch the same). `group` > 0 (unpacked,
    `group_by_length`): each run of `group` shuffled examples is sorted longest first, as Hugging Face's
    LengthGroupedSampler does with its megabatches, so a batch holds examples of similar length."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if not packing:
        if group > 0:
            lengths_ = np.asarray(lengths)
            order = np.concatenate([chunk[np.argsort(-lengths_[chunk], kind="stable")]
                                    for chunk in np.split(order, range(group, len(order), group))] or [order])
        return [[int(i)] for i in order]
    bins, too_long = greedy_knapsack(lengths, seq_len, order.tolist())
    bins += [[i] for i in too_long]  # longer than `seq_len` (a replay run's SFT capacity): a row of its own
    return [bins[i] for i in rng.permutation(len(bins))] if shuffle else bins


def efficiency(lengths: Sequence[int], num_rows: int, seq_len: int) -> float:
    """Non-pad fraction of the rows."""
    return float(np.sum(lengths)) / (num_rows * seq_len) if num_rows else 0.0
