"""The label audit: the data as training reads it, measured and checked, for `jaxsft inspect` (`report.py` renders it).

Measured: rows read, examples kept, rows dropped (file, row, reason), examples truncated (file, row, tokens
cut), the share of tokens learned, duplicate examples, example lengths and learned tokens per example, the sum
of loss weights (when the data has weights), and how full the batches of an epoch are (packed rows, or examples
padded to the length buckets), from the same plan `SFTData.train_dataset` batches.

Checked, and flagged at the top of the report:
- nothing is learned (every row dropped for want of labels, or the template learns nothing of a probe
  conversation);
- prompt text is learned: targets inside prompts (`train_on_prompt`), a probe whose user or system text is
  learned, or text before the answer learned (the assistant header: a chat template that does not split at its
  generation prompt);
- learned text that holds another turn's chat markup (a user or system header of a known template): rows
  rendered with a chat template already, or columns mapped to the wrong fields;
- a named template whose turn markers the model's own chat template never uses;
- eval examples equal to training examples; no full training batch; many truncated or dropped rows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxsft.data.args import DataArgs
from jaxsft.data.encode import Counts, make_template
from jaxsft.data.formats import Conversation, Message, row_place
from jaxsft.data.supervised import IGNORE_INDEX, encode_supervised
from jaxsft.data.templates import TEMPLATES

SCAN_LIMIT = 1000  # examples whose learned text is searched for chat markup
PROBE = Conversation("sysprobe", "", [Message("user", "userprobe1"), Message("assistant", "answerprobe1"),
                                      Message("user", "userprobe2"), Message("assistant", "answerprobe2")])


@dataclass
class Finding:
    level: str  # "error" (nothing would be learned), "warning" (something wrong is learned), "note"
    title: str
    detail: str


@dataclass
class Sample:
    """One encoded example to render: where it came from, its tokens, labels and (when the data has them)
    per-token loss weights."""

    origin: tuple[str, int] | None
    ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None
    kept: bool = True
    pieces: list[tuple[int, int, str]] = field(default_factory=list)  # (first token, end token, text)
    special: set[int] = field(default_factory=set)  # ids of the tokenizer's special tokens


def token_pieces(tokenizer, ids: Sequence[int], context: int = 4) -> list[tuple[int, int, str]]:
    """The text of each token, decoded in context (so a leading space or a character split over several
    byte tokens comes out right); tokens that only together make a character share one piece."""
    ids = [int(i) for i in ids]
    pieces, start = [], 0
    for i in range(len(ids)):
        lo = max(0, start - context)
        before = tokenizer.decode(ids[lo:start], skip_special_tokens=False)
        text = tokenizer.decode(ids[lo:i + 1], skip_special_tokens=False)
        if text.endswith("\ufffd") and i + 1 < len(ids) and i - start < 3:
            continue  # an incomplete UTF-8 character: take the next token with it
        pieces.append((start, i + 1, text[len(before):] if text.startswith(before)
                       else tokenizer.decode(ids[start:i + 1], skip_special_tokens=False)))
        start = i + 1
    return pieces


def rendered(tokenizer, sample: Sample) -> Sample:
    sample.pieces = token_pieces(tokenizer, sample.ids)
    sample.special = special_ids(tokenizer)
    return sample


@dataclass
class SplitAudit:
    name: str
    counts: Counts
    lengths: np.ndarray  # tokens per kept example
    learned: np.ndarray  # learned targets per kept example
    weight_sum: float | None = None  # the loss weights of the learned targets summed, when any example has weights
    keys: list[bytes] = field(default_factory=list, repr=False)  # one per example: its token ids (duplicates)
    weight_tokens: dict[float, int] = field(default_factory=dict)  # loss weight -> learned tokens carrying it

    @property
    def duplicates(self) -> int:
        """Examples whose tokens equal an earlier example's."""
        return len(self.keys) - len(set(self.keys))


@dataclass
class Fill:
    """One epoch of training batches, as `SFTData.train_dataset` lays them out."""

    packing: bool
    cutoff_len: int
    batch_rows: int  # rows per global batch
    rows: int  # packed rows (or examples) in the epoch
    batches: int  # batches of the epoch; the last one filled up with empty rows
    tokens: int  # real tokens in the batches
    positions: int  # positions they are padded to
    knapsack: float  # packing: tokens / (rows x cutoff_len) over all rows
    buckets: list[tuple[int, int, int, int]] = field(default_factory=list)  # (width, batches, tokens, positions)
    replay_tokens: int = 0  # of `tokens`, those from replay_dataset

    @property
    def fill(self) -> float:
        return self.tokens / self.positions if self.positions else 0.0


@dataclass
class Audit:
    settings: dict[str, Any]
    splits: list[SplitAudit]
    fill: Fill | None
    findings: list[Finding]
    samples: list[Sample]
    probe: Sample | None


def parts(example) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, labels, per-token loss weights or None) of an example (weights: an example's `weights`)."""
    weights = getattr(example, "weights", None)
    return example[0], example[1], (example[2] if weights is None and len(example) > 2 else weights)


def learned_mask(labels: np.ndarray) -> np.ndarray:
    """Positions whose label is a target (the first token is predicted by nothing)."""
    mask = np.asarray(labels) != IGNORE_INDEX
    if len(mask):
        mask[0] = False
    return mask


def split_audit(name: str, examples: Sequence, counts: Counts) -> SplitAudit:
    lengths = np.array([len(parts(ex)[0]) for ex in examples], np.int64)
    masks = [learned_mask(parts(ex)[1]) for ex in examples]
    learned = np.array([int(m.sum()) for m in masks], np.int64)
    weights = [parts(ex)[2] for ex in examples]  # examples without their own weights learn each target at 1
    weight_sum, weight_tokens = None, {}
    if any(w is not None for w in weights):
        learned_weights = np.concatenate([np.ones(int(m.sum())) if w is None else np.asarray(w, np.float64)[m]
                                          for w, m in zip(weights, masks)])
        weight_sum = float(learned_weights.sum())
        values, counts_ = np.unique(learned_weights, return_counts=True)
        weight_tokens = {float(v): int(n) for v, n in zip(values, counts_)}
    keys = [hashlib.blake2b(np.asarray(parts(ex)[0], np.int32).tobytes(), digest_size=16).digest() for ex in examples]
    return SplitAudit(name, counts, lengths, learned, weight_sum, keys, weight_tokens)


def overlap(train: SplitAudit, evals: SplitAudit) -> int:
    """Eval examples whose tokens equal a training example's."""
    seen = set(train.keys)
    return sum(1 for key in evals.keys if key in seen)


def fill_of(data, batch_rows: int, seed: int, buckets: Sequence[int] | None, group_by_length: bool) -> Fill:
    """How full epoch 0's batches are: `data.epoch_plan` (the plan training batches) on one process."""
    plan, widths, replay = data.epoch_rows(batch_rows, seed, 0, buckets, group_by_length)
    lengths = np.asarray(data.lengths, np.int64)
    row_tokens = np.array([int(lengths[m].sum()) for m in plan], np.int64)
    replayed = np.asarray(replay.tokens, np.int64) if replay is not None else np.zeros(len(plan), np.int64)
    row_tokens = row_tokens + replayed
    batches = -(-len(plan) // batch_rows)  # the last one filled up with empty rows
    per_width: dict[int, list[int]] = {}
    for b in range(batches):
        entry = per_width.setdefault(widths[b], [0, 0, 0])
        entry[0] += 1
        entry[1] += int(row_tokens[b * batch_rows:(b + 1) * batch_rows].sum())
        entry[2] += widths[b] * batch_rows
    table = [(w, n, t, p) for w, (n, t, p) in sorted(per_width.items())]
    knapsack = float(row_tokens.sum()) / (len(plan) * data.seq_len) if len(plan) else 0.0
    return Fill(data.packing, data.seq_len, batch_rows, len(plan), batches, sum(t for _, _, t, _ in table),
                sum(p for *_, p in table), knapsack, table, int(replayed.sum()))


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def learned_texts(tokenizer, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The decoded runs of learned targets (the labels: an efficient_eos template learns the EOS of an answer
    on the first token of the next prompt)."""
    labels = np.asarray(labels)
    return [tokenizer.decode(labels[a:b].tolist(), skip_special_tokens=False) for a, b in _spans(learned_mask(labels))]


def probe_template(template, tokenizer, args: DataArgs) -> tuple[Sample, list[Finding]]:
    """Encode a two-turn probe conversation as training would and check what its labels learn."""
    ids, labels = encode_supervised(PROBE, tokenizer, template, max(args.cutoff_len, 4096), args.train_on_prompt,
                                    args.mask_history, args.preserve_thinking)
    sample = rendered(tokenizer, Sample(None, np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
    texts = learned_texts(tokenizer, sample.ids, sample.labels)
    findings = []
    if not texts:
        findings.append(Finding("error", "The template learns nothing",
                                f"A probe conversation encoded with template '{args.template}' has no label tokens: "
                                "training would learn nothing. Check the template (template: auto needs a chat "
                                "template that renders assistant turns)."))
        return sample, findings
    joined = "".join(texts)
    prompt_hits = [w for w in ("sysprobe", "userprobe1", "userprobe2") if w in joined]
    if prompt_hits:
        why = ("train_on_prompt is true" if args.train_on_prompt else
               "the template puts prompt text into the learned part")
        findings.append(Finding("warning", "Prompt text is learned",
                                f"The probe's system/user text ({', '.join(prompt_hits)}) is learned: {why}."))
    headers = []
    for text in texts:
        before = text.split("answerprobe", 1)[0] if "answerprobe" in text else ""
        before = re.sub(r"<think>.*?</think>", "", before, flags=re.DOTALL)
        for hit in prompt_hits:
            before = before.split(hit)[-1]
        if before.strip():
            headers.append(before)
    if headers and not args.train_on_prompt:
        findings.append(Finding("warning", "The assistant header is learned",
                                f"Text before the answer is learned: {headers[0]!r}. The template's turn boundary "
                                "falls before the assistant header (a chat template that ignores "
                                "add_generation_prompt, or the wrong template for this model)."))
    return sample, findings


def special_ids(tokenizer) -> set[int]:
    return {int(i) for i in tokenizer.all_special_ids} | {
        int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}


def template_mismatch(template, tokenizer, args: DataArgs) -> Finding | None:
    """A named template whose special tokens the model's own chat template never uses (a Llama template for a
    Qwen model, say): the model would learn turn markers it was not trained with. None when the tokenizer has
    no chat template, or its template cannot render the probe."""
    from jaxsft.data.templates import ChatTemplate

    if args.template == "auto" or not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        theirs = ChatTemplate().encode_multiturn(tokenizer, PROBE.messages, PROBE.system, PROBE.tools)
    except Exception:  # noqa: BLE001 - a chat template that refuses the probe (raise_exception, strict roles)
        return None
    ours = template.encode_multiturn(tokenizer, PROBE.messages, PROBE.system, PROBE.tools)
    special = special_ids(tokenizer) - {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                        tokenizer.unk_token_id}  # turn markers: a template may leave BOS to encode
    used = [{int(t) for pair in pairs for part in pair for t in part} & special for pairs in (ours, theirs)]
    extra = used[0] - used[1]
    if not extra:
        return None
    names = lambda ids: ", ".join(sorted(tokenizer.convert_ids_to_tokens(sorted(ids)))) or "none"  # noqa: E731
    return Finding("warning", f"Template '{args.template}' does not match the model's chat template",
                   f"It uses special tokens the model's own chat template never uses ({names(extra)}); the model's "
                   f"template uses {names(used[1])}. Pick the model's template (template: auto uses it).")


def chat_markers() -> list[str]:
    """User and system headers of the known templates (the text before `{{content}}`), with markup in them."""
    found = set()
    for template in TEMPLATES.values():
        for slots in (template.user, template.system):
            for slot in slots:
                if isinstance(slot, str) and "{{content}}" in slot:
                    head = slot.split("{{content}}", 1)[0].strip()
                    if len(head) >= 5 and re.search(r"[<\[#|]", head):
                        found.add(head)
    return sorted(found)


def scan_markup(tokenizer, examples: Sequence, origins: Sequence[tuple[str, int]], limit: int = SCAN_LIMIT
                ) -> Finding | None:
    """Learned text of the first `limit` examples that holds a known user/system header."""
    markers = chat_markers()
    hits = []
    for k, example in enumerate(examples[:limit]):
        ids, labels, _ = parts(example)
        text = "".join(learned_texts(tokenizer, ids, labels))
        marker = next((m for m in markers if m in text), None)
        if marker:
            where = row_place(*origins[k]) if k < len(origins) else f"example {k}"
            hits.append(f"{where} ({marker!r})")
    if not hits:
        return None
    return Finding("warning", "Learned text holds chat markup",
                   f"{len(hits)} of the first {min(limit, len(examples))} examples learn another turn's header "
                   f"(rows already rendered with a chat template, or columns mapped to the wrong fields): "
                   + "; ".join(hits[:5]) + (" ..." if len(hits) > 5 else ""))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def data_findings(split: SplitAudit, args: DataArgs) -> list[Finding]:
    c = split.counts
    findings = []
    unlearned = c.no_labels
    if c.rows and not c.examples:
        findings.append(Finding("error", f"No {split.name} example learns anything",
                                f"All {c.rows} rows were dropped ({unlearned} for having no label tokens); "
                                f"training would stop here. First reasons: " + "; ".join(c.reasons[:3])))
    elif unlearned:
        findings.append(Finding("warning", f"{plural(unlearned, split.name + ' row')} learn"
                                f"{'s' if unlearned == 1 else ''} nothing",
                                f"{unlearned} rows have no label tokens and are dropped (listed below)."))
    if c.prompt_label_tokens:
        share = c.prompt_label_tokens / max(c.label_tokens, 1)
        findings.append(Finding("warning", "Prompt tokens are learned",
                                f"{c.prompt_label_tokens} of the {c.label_tokens} learned {split.name} tokens "
                                f"({100 * share:.1f}%) are prompt tokens (train_on_prompt: "
                                f"{str(args.train_on_prompt).lower()})."))
    other = c.dropped - unlearned
    if other:
        findings.append(Finding("note", f"{plural(other, split.name + ' row')} dropped",
                                "Rows that could not become examples (listed below with their reasons)."))
    if c.examples and c.truncated / c.examples > 0.05:
        findings.append(Finding("note", f"{plural(c.truncated, split.name + ' example')} truncated",
                                f"{100 * c.truncated / c.examples:.1f}% of the examples are longer than "
                                f"cutoff_len={args.cutoff_len}; {c.truncated_tokens} tokens are cut."))
    return findings


SETTINGS = ("dataset", "eval_dataset", "dataset_dir", "template", "cutoff_len", "packing", "train_on_prompt",
            "mask_history", "val_size", "max_samples", "per_device_train_batch_size", "length_buckets",
            "group_by_length", "seed", "retention_dataset", "replay_dataset", "replay_ratio", "model_name_or_path")


def audit_data(cfg, tokenizer, batch_rows: int, num_examples: int = 10) -> Audit:
    """Read the data of `cfg` as training would (template, cutoff, packing, and batches of `batch_rows` rows per
    global batch) and audit it. Every row is encoded afresh (no data cache) so each dropped row is listed;
    a stream is read whole, in memory, with the same encoder."""
    from jaxsft.data.packing import length_buckets
    from jaxsft.data.pipeline import build_datasets

    args = DataArgs.from_config(cfg).replace(data_cache_dir=None, streaming=False)
    data = build_datasets(args, tokenizer, train=bool(args.dataset), allow_empty=True)
    template = make_template(args, tokenizer)
    probe, findings = probe_template(template, tokenizer, args)
    mismatch = template_mismatch(template, tokenizer, args)
    findings += [mismatch] if mismatch else []
    splits = []
    for name, examples in (("train", data.train), ("eval", data.eval), ("retention", data.retention),
                           ("replay", data.replay)):
        counts = (data.counts or {}).get(name)
        if counts is None:  # loaded from tokenized_path: no rows behind the examples
            if not examples:
                continue
            counts = Counts(rows=len(examples), examples=len(examples),
                            tokens=sum(len(parts(ex)[0]) for ex in examples))
            counts.label_tokens = sum(int(learned_mask(parts(ex)[1]).sum()) for ex in examples)
        splits.append(split_audit(name, examples or [], counts))
        findings += data_findings(splits[-1], args)
        if examples:
            scan = scan_markup(tokenizer, examples, counts.kept_rows)
            findings += [scan] if scan else []
    names = {split.name: split for split in splits}
    if "train" in names and "eval" in names and (shared := overlap(names["train"], names["eval"])):
        findings.append(Finding("warning", f"{plural(shared, 'eval example')} also in the training data",
                                f"{shared} of the {len(names['eval'].keys)} eval examples have the same tokens as a "
                                "training example: eval loss and accuracy overstate how well the model generalizes."))
    fill = None
    if data.train:
        buckets = length_buckets(cfg.cutoff_len) if cfg.length_buckets else None
        fill = fill_of(data, batch_rows, cfg.seed, buckets, cfg.group_by_length)
        if (empty := fill.batches * batch_rows - fill.rows) > fill.rows:
            findings.append(Finding("warning", "Most of the last batch is empty",
                                    f"The {fill.rows} {'packed rows' if fill.packing else 'examples'} of an epoch fill "
                                    f"{fill.batches} batch(es) of {batch_rows} rows (per_device_train_batch_size x "
                                    f"data-parallel devices): {empty} empty rows complete them, compute spent on "
                                    f"nothing. Lower per_device_train_batch_size or add data."))
    samples = []
    if splits:
        first = splits[0]
        shown = data.train if first.name == "train" else data.eval
        for k, example in enumerate((shown or [])[:num_examples]):
            ids, labels, weights = parts(example)
            origin = first.counts.kept_rows[k] if k < len(first.counts.kept_rows) else None
            samples.append(rendered(tokenizer, Sample(origin, ids, labels, weights)))
        for path, row, example in first.counts.unlearned[:max(0, num_examples - len(samples))]:
            ids, labels, weights = parts(example)
            samples.append(rendered(tokenizer, Sample((path, row), ids, labels, weights, kept=False)))
    if cfg.streaming:
        findings.append(Finding("note", "Streaming data read in memory",
                                "With streaming: true training reads a stream; this report reads the same rows in "
                                "memory with the same encoder, so counts and examples match, but the batch plan is "
                                "the in-memory one" + (" and val_size holds out random rows, not the stream's first"
                                                       if cfg.val_size else "") + "."))
    order = {"error": 0, "warning": 1, "note": 2}
    findings.sort(key=lambda f: order[f.level])
    settings = {key: getattr(cfg, key) for key in SETTINGS if hasattr(cfg, key)}
    settings["packing"] = args.packing
    if not settings.get("replay_dataset"):
        settings.pop("replay_ratio", None)
    settings["global batch rows"] = batch_rows
    return Audit(settings, splits, fill, findings, samples, probe)
