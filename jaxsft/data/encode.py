"""One row encoder and one error policy, for every way rows are read: in memory, streamed, predict prompts.

A row is `(source, row number, row)`. `encode_each` converts and encodes rows one by one: a malformed row
stops the run with an `InvalidExample` (file, row, field), or with `skip_invalid_examples` is dropped and
counted, as are the rows LLaMA-Factory drops. `supervised_examples` turns rows into training examples
(ids, labels) and drops the ones with nothing left to learn; `encode_rows` does it for a list of rows,
in worker processes (`jaxsft.data.workers`) when `preprocessing_num_workers` asks for them.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from jaxsft.data import sources
from jaxsft.data.args import DataArgs
from jaxsft.data.batch_tokenize import TextTokenizer, prefetch
from jaxsft.data.formats import InvalidExample, row_place, to_conversation
from jaxsft.data.packing import Example, WeightedExample
from jaxsft.data.registry import DatasetAttr
from jaxsft.data.supervised import IGNORE_INDEX, encode_text, encode_weighted
from jaxsft.data.templates import Template, get_template

logger = logging.getLogger(__name__)
MAX_REASONS = 5
MAX_LISTED = 1000  # dropped rows kept with file, row and reason (the data report lists them)
MAX_SAMPLES = 100  # (file, row) of the first kept examples; the first rows that learn nothing
# Below this many rows per worker, starting worker processes costs more than it saves (idle 2-core box,
# BENCHMARKS.md: 2 workers were 0.61x of 1 on 4,995 rows, 1.24x on 49,950).
MIN_ROWS_PER_WORKER = 10_000
Row = tuple[DatasetAttr, int, Any]  # (source, row number in its file, the row)


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
    prompt_label_tokens: int = 0  # learned targets inside prompts (train_on_prompt)
    no_labels: int = 0  # rows dropped for having no label token
    dropped_rows: list[tuple[str, int, str]] = field(default_factory=list)  # (file, row, reason), the first few
    kept_rows: list[tuple[str, int]] = field(default_factory=list)  # (file, row) of the first kept examples
    truncated_rows: list[tuple[str, int, int, int]] = field(default_factory=list)  # (file, row, tokens, tokens kept)
    unlearned: list[tuple[str, int, Example]] = field(default_factory=list)  # first rows dropped for no labels

    def drop(self, reason: str, file: str = "", row: int = -1) -> None:
        self.dropped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        if len(self.dropped_rows) < MAX_LISTED:
            self.dropped_rows.append((file, row, reason))

    def add(self, other: "Counts") -> None:
        """Fold in the counts of another part of the same split (a worker's chunk), in order."""
        self.rows, self.examples = self.rows + other.rows, self.examples + other.examples
        self.tokens, self.label_tokens = self.tokens + other.tokens, self.label_tokens + other.label_tokens
        self.dropped += other.dropped
        self.truncated += other.truncated
        self.truncated_tokens += other.truncated_tokens
        self.prompt_label_tokens += other.prompt_label_tokens
        self.no_labels += other.no_labels
        self.reasons.extend(other.reasons[:MAX_REASONS - len(self.reasons)])
        self.dropped_rows.extend(other.dropped_rows[:MAX_LISTED - len(self.dropped_rows)])
        self.kept_rows.extend(other.kept_rows[:MAX_SAMPLES - len(self.kept_rows)])
        self.truncated_rows.extend(other.truncated_rows[:MAX_LISTED - len(self.truncated_rows)])
        self.unlearned.extend(other.unlearned[:MAX_REASONS - len(self.unlearned)])


def report_dropped(split: str, counts: Counts) -> None:
    if counts.dropped:
        logger.warning("%s data: dropped %d of %d rows (the run goes on without them); first reasons:\n  %s",
                       split, counts.dropped, counts.rows, "\n  ".join(counts.reasons))


TRUNCATED_WARN = 0.05  # above this share of examples cut by cutoff_len, the report is a warning


def report_truncated(split: str, counts: Counts, cutoff: int) -> None:
    """Every run says how many examples cutoff_len cut and how many tokens that lost."""
    if not counts.examples:
        return
    share = counts.truncated / counts.examples
    level = logging.WARNING if share > TRUNCATED_WARN else logging.INFO
    hint = "; raise cutoff_len to keep more" if share > TRUNCATED_WARN else ""
    logger.log(level, "%s data: %d of %d examples (%.1f%%) were longer than cutoff_len=%d and were truncated, "
               "%d tokens cut%s", split, counts.truncated, counts.examples, 100 * share, cutoff,
               counts.truncated_tokens, hint)


def make_template(args: DataArgs, tokenizer):
    """The configured template; fixes the tokenizer in place as LF does (a template's EOS / pad / stop words)."""
    return get_template(args.template or "empty", tokenizer, default_system=args.default_system,
                        enable_thinking=args.enable_thinking, train_on_prompt=args.train_on_prompt,
                        tool_format=args.tool_format)


def learned(labels: np.ndarray) -> int:
    return int(np.count_nonzero(labels[1:] != IGNORE_INDEX))


def rows_at(rows_of: Sequence[Sequence], attrs: Sequence[DatasetAttr],
            refs: Iterable[sources.RowRef]) -> Iterator[Row]:
    """The referenced rows of in-memory datasets, with their row numbers in the files."""
    for ref in refs:
        rows = rows_of[ref.source]
        yield attrs[ref.source], sources.row_number(rows, ref.row), rows[ref.row]


def encode_each(rows: Iterable[Row], args: DataArgs, counts: Counts, encode: Callable[[Any, Any], tuple],
                tokenizer, chunk: int = 1) -> Iterator[tuple[str, int, tuple]]:
    """(file, row number, encode(conversation, tokenizer)) for every row that converts and encodes; the error
    policy. With `chunk` > 1, rows are taken that many at a time and the texts of a chunk are tokenized with
    one batched call (`jaxsft.data.batch_tokenize`; same ids). Chunks read ahead: a consumer that stops
    early (streaming) must use chunk 1."""
    if chunk <= 1:
        for attr, row_no, row in rows:
            counts.rows += 1
            encoded = _guarded(attr, row_no, args, counts, lambda: encode(to_conversation(row, attr, attr.path,
                                                                                             row_no), tokenizer))
            if encoded is not _DROPPED:
                yield attr.path, row_no, encoded
        return
    it = iter(rows)
    while block := list(itertools.islice(it, chunk)):
        conversations = [_converted(attr, row_no, row) for attr, row_no, row in block]
        fast = prefetch(tokenizer, [c for c in conversations if not isinstance(c, Exception)], encode)
        for (attr, row_no, _row), conversation in zip(block, conversations):
            counts.rows += 1
            encoded = _guarded(attr, row_no, args, counts, lambda: encode(_raise_or(conversation), fast))
            if encoded is not _DROPPED:
                yield attr.path, row_no, encoded


_DROPPED = object()


def _converted(attr, row_no: int, row) -> Any:
    """The row's conversation, or the exception converting it raised (raised again, in row order, later)."""
    try:
        return to_conversation(row, attr, attr.path, row_no)
    except Exception as e:  # noqa: BLE001 - kept, and raised where the row's turn comes
        return e


def _raise_or(value):
    if isinstance(value, Exception):
        raise value
    return value


def _guarded(attr, row_no: int, args: DataArgs, counts: Counts, make: Callable[[], tuple]) -> Any:
    """make(), or _DROPPED for a row the error policy drops (counted); a malformed row raises."""
    try:
        return make()
    except InvalidExample as e:
        if e.kind == "malformed" and not args.skip_invalid_examples:
            raise
        counts.drop(str(e), e.file, e.row)
    except ValueError as e:  # a function_call / tools field that is not the JSON LF expects
        if not args.skip_invalid_examples:
            field = attr.messages if attr.formatting != "alpaca" and attr.messages else "<row>"
            raise InvalidExample(attr.path, row_no, field, str(e)) from None
        counts.drop(f"{row_place(attr.path, row_no)}: {e}", attr.path, row_no)
    return _DROPPED


# Rows rendered and tokenized together on the in-memory path.
CHUNK = 1024


def supervised_examples(rows: Iterable[Row], template, tokenizer, args: DataArgs,
                        counts: Counts, chunk: int = 1) -> Iterator[Example]:
    """Training examples (ids, labels as int32; a `WeightedExample` when answers carry loss weights) of the
    rows; rows with no label token left are dropped. `chunk`: see `encode_each`."""
    sizes: dict = {}

    def encode(conversation, tok):
        if conversation.plain:
            return (*encode_text(conversation.messages[0].content, tok, args.cutoff_len, sizes, args.template), None)
        return encode_weighted(conversation, tok, template, args.cutoff_len, args.train_on_prompt,
                               args.mask_history, args.preserve_thinking, sizes)

    for path, row_no, (ids, labels, weights) in encode_each(rows, args, counts, encode, tokenizer, chunk):
        example = (np.asarray(ids, np.int32), np.asarray(labels, np.int32))
        if weights is not None:
            example = WeightedExample(*example, weights)
        n_learned = learned(example[1])
        if n_learned == 0:
            why = (f"no label tokens left after truncation to cutoff_len={args.cutoff_len}" if sizes["full"] > len(ids)
                   else "no label tokens: every answer is marked train: false (or weight 0)"
                   if sizes.get("unlearned_answers") else "no label tokens: the template learns nothing of this row")
            counts.drop(f"{row_place(path, row_no)}: {why}", path, row_no)
            counts.no_labels += 1
            if len(counts.unlearned) < MAX_REASONS:
                counts.unlearned.append((path, row_no, example))
            continue
        counts.examples += 1
        if len(counts.kept_rows) < MAX_SAMPLES:
            counts.kept_rows.append((path, row_no))
        counts.prompt_label_tokens += sizes["prompt_learned"]
        if sizes["full"] > len(ids):  # cutoff_len cut it
            counts.truncated, counts.truncated_tokens = counts.truncated + 1, counts.truncated_tokens + sizes["full"] \
                - len(ids)
            if len(counts.truncated_rows) < MAX_LISTED:
                counts.truncated_rows.append((path, row_no, sizes["full"], len(ids)))
        counts.tokens += len(ids)
        counts.label_tokens += n_learned
        yield example


def encode_list(rows: Iterable[Row], template, tokenizer, args: DataArgs) -> tuple[list[Example], Counts]:
    counts = Counts()
    return list(supervised_examples(rows, template, tokenizer, args, counts, CHUNK)), counts


_TEXT_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def text_tokenizer(tokenizer, template):
    """What encodes the rows: for a named template, the tokenizer's bare Rust core (`TextTokenizer`: same ids,
    no transformers round trip, cheap to send to workers) where it is equivalent, else the tokenizer itself.
    Remembered per tokenizer (and its vocabulary size, which templates may grow)."""
    if not isinstance(template, Template) or isinstance(tokenizer, TextTokenizer):
        return tokenizer
    try:
        size = len(tokenizer)
        known = _TEXT_TOKENIZERS.get(tokenizer)
    except TypeError:  # not weak-referenceable / no len: use it as it is
        return tokenizer
    if known is None or known[0] != size:
        known = (size, TextTokenizer.of(tokenizer))
        _TEXT_TOKENIZERS[tokenizer] = known
    return known[1] or tokenizer


def encode_rows(rows_of: list[Sequence], attrs: list, refs: Sequence[sources.RowRef], template, tokenizer,
                args: DataArgs, process_index: int = 0, process_count: int = 1) -> tuple[list[Example], Counts]:
    """Training examples of the referenced rows, in order, with what was dropped.

    With several processes (hosts), each encodes its block of the rows and all get every block
    (`jaxsft.data.hosts`). With `preprocessing_num_workers` > 1 and enough rows, equal slices of a block are
    encoded in worker processes (`jaxsft.data.workers`); results and counts keep the row order.
    """
    if process_count > 1:
        from jaxsft.data import hosts
        from jaxsft.data.workers import flatten, unflatten

        def work(start: int, end: int):
            examples, counts = encode_rows(rows_of, attrs, refs[start:end], template, tokenizer, args)
            return flatten(examples), counts

        start, end = hosts.block(len(refs), process_index, process_count)
        logger.info("process %d of %d tokenizes rows %d-%d of %d; the other processes tokenize the rest",
                    process_index, process_count, start, end, len(refs))
        examples, counts = [], Counts()
        for flat, part_counts in hosts.run_split(work, len(refs), process_index, process_count):
            examples.extend(unflatten(*flat))
            counts.add(part_counts)
        return examples, counts
    tokenizer = text_tokenizer(tokenizer, template)
    workers = min(int(args.preprocessing_num_workers or 1), len(refs) // max(MIN_ROWS_PER_WORKER, 1))
    if workers <= 1:
        return _encode_serial(rows_of, attrs, refs, template, tokenizer, args)
    from jaxsft.data import workers as pool

    size = -(-len(refs) // workers)
    jobs = [(list(rows_at(rows_of, attrs, refs[i:i + size])), template, tokenizer, args)
            for i in range(0, len(refs), size)]
    examples, counts = [], Counts()
    for flat, part_counts in pool.run(jobs, threads=(os.cpu_count() or 1) // workers):
        examples.extend(pool.unflatten(*flat))
        counts.add(part_counts)
    return examples, counts


def _encode_serial(rows_of, attrs, refs, template, tokenizer, args: DataArgs) -> tuple[list[Example], Counts]:
    return encode_list(rows_at(rows_of, attrs, refs), template, tokenizer, args)
