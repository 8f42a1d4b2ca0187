"""Replay against forgetting: general text filling a fixed share of every packed row.

With `replay_dataset` and `replay_ratio` r, the SFT examples of an epoch are packed into rows of
`sft_capacity = floor((1 - r) * cutoff_len)` tokens (an example longer than that gets a row of its own),
and the rest of each row is filled with replay tokens: a row of s SFT tokens gets about s * r / (1 - r)
of them (rounded, the rounding carried to the next row, never more than the row's free room), so replay
tokens are r of the real tokens of every batch and of the epoch. The replay text is one stream per epoch:
the replay examples in an order shuffled with (seed, epoch), back to back, wrapping around when the epoch
needs more; row g takes the tokens from the stream offset where row g - 1 stopped. A piece of an example
cut at a row's end is its own segment (positions restart at 0) and its labels are the example's labels.

Everything is a pure function of (seed, epoch, row), so the data iterator's position (grain's state, in
every checkpoint) is the replay stream's position too, and a resumed run sees the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxsft.data.packing import IGNORE_INDEX, Example


def sft_capacity(seq_len: int, ratio: float) -> int:
    """Tokens of a row the SFT examples may fill."""
    return max(int(seq_len * (1.0 - ratio)), 1)


def replay_tokens(sft_tokens: Sequence[int], seq_len: int, ratio: float) -> np.ndarray:
    """Replay tokens of each row: sft * r / (1 - r), rounded with the remainder carried forward, capped by
    the room left in the row."""
    out = np.zeros(len(sft_tokens), np.int64)
    carry = 0.0
    for g, s in enumerate(sft_tokens):
        want = s * ratio / (1.0 - ratio) + carry
        n = min(max(int(round(want)), 0), seq_len - int(s))
        out[g], carry = n, want - n
    return out


class ReplayPlan:
    """The replay pieces of one epoch's rows (all processes); `fill(row, g)` adds row g's."""

    def __init__(self, examples: Sequence[Example], sft_tokens: Sequence[int], seq_len: int, ratio: float,
                 seed: int, epoch: int):
        self.examples = examples
        self.tokens = replay_tokens(sft_tokens, seq_len, ratio)
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(examples))
        self.order = order
        lengths = np.array([len(examples[i][0]) for i in order], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each example in `order`
        self.offsets = np.concatenate([[0], np.cumsum(self.tokens)])  # stream offset of each row's first token

    def pieces(self, g: int) -> list[tuple[int, int, int]]:
        """(example index, start, end) of the replay tokens of row g, in stream order."""
        total = int(self.starts[-1])
        at, need, out = int(self.offsets[g]) % total, int(self.tokens[g]), []
        while need > 0:
            k = int(np.searchsorted(self.starts, at, side="right")) - 1
            start = at - int(self.starts[k])
            end = min(int(self.starts[k + 1]) - int(self.starts[k]), start + need)
            out.append((int(self.order[k]), start, end))
            need -= end - start
            at = (at + end - start) % total
        return out

    def fill(self, row: dict[str, np.ndarray], g: int) -> dict[str, np.ndarray]:
        """Row g (SFT examples at its start) with its replay pieces after them and a `replay` marker
        (1 on replay tokens)."""
        row = {k: v.copy() for k, v in row.items()}
        seg = row["segment_ids"]
        at, segment = int((seg > 0).sum()), int(seg.max())
        replay = np.zeros_like(seg)
        for i, start, end in self.pieces(g):
            ids, labels = self.examples[i]
            n = end - start
            segment += 1
            row["input_ids"][at:at + n] = ids[start:end]
            row["targets"][at:at + n - 1] = labels[start + 1:end]
            row["targets"][at + n - 1] = IGNORE_INDEX
            seg[at:at + n] = segment
            row["positions"][at:at + n] = np.arange(n, dtype=np.int32)
            replay[at:at + n] = 1
            if "weights" in row:  # a weighted run (per-message loss weights): replay targets weigh 1
                row["weights"][at:at + n] = row["targets"][at:at + n] != IGNORE_INDEX
            at += n
        row["replay"] = replay
        return row
