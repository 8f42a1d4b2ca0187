"""Greedy knapsack packing and the row layout of `docs/internals.md` (input_ids, targets, segment_ids, positions).

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

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels), int32, same length


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


def make_row(examples: Sequence[Example], members: Sequence[int], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of length `seq_len` holding `examples[m]` for m in members, back to back, then padding."""
    input_ids = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, IGNORE_INDEX, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
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
        start += n
    return {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids, "positions": positions}


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "targets", "segment_ids", "positions")}


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return make_row([], [], seq_len, pad_id)


def plan_epoch(
    lengths: Sequence[int], seq_len: int, seed: int, epoch: int, packing: bool, shuffle: bool = True
) -> list[list[int]]:
    """The rows of one epoch, as lists of example indices: examples shuffled (seed, epoch), then packed
    (ties between equal lengths follow the shuffle) and the rows shuffled; or one example per row.
    Without `shuffle`, examples and rows keep their order (every epoch the same)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if not packing:
        return [[int(i)] for i in order]
    bins, _ = greedy_knapsack(lengths, seq_len, order.tolist())
    return [bins[i] for i in rng.permutation(len(bins))] if shuffle else bins


def efficiency(lengths: Sequence[int], num_rows: int, seq_len: int) -> float:
    """Non-pad fraction of the rows."""
    return float(np.sum(lengths)) / (num_rows * seq_len) if num_rows else 0.0
