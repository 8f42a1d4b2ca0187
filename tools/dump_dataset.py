"""Print encoded training examples with their labels decoded, to check templates and masking.

    python tools/dump_dataset.py --config cfg.yaml [key=value ...] [-n 3]
    python tools/dump_dataset.py --config cfg.yaml --out out.jsonl [--packed] [--limit N]
    python tools/dump_dataset.py --model_name_or_path DIR --dataset identity --dataset_dir data --template qwen

Shows, per example: the full text, the learned text (labels that are not -100, decoded), and the ids with
the masked ones in brackets. Then the preprocessing counts (dropped rows with reasons, packing efficiency).
With --out, writes one JSON object per example in dataset order, unshuffled: {"input_ids", "labels"};
with --packed, one per packed row (in packing order): {"input_ids", "labels", "segment_ids", "positions"},
where labels are unshifted (-100 on padding and prompts), as LLaMA-Factory stores them. Data whose answers
carry loss weights (`weight: w`, docs/data.md) adds "weights": the weight of each label, aligned with labels.
"""

import argparse
import json
import sys
import dataclasses
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsft.data.packing import greedy_knapsack, is_weighted, make_row, weights_of  # noqa: E402
from jaxsft.data.args import DataArgs  # noqa: E402
from jaxsft.data.pipeline import build_datasets  # noqa: E402
from jaxsft.data.supervised import IGNORE_INDEX  # noqa: E402


def _args(argv: list[str]) -> tuple[object, str, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="jaxsft YAML config (uses jaxsft.config)")
    parser.add_argument("-n", "--num_examples", type=int, default=3)
    parser.add_argument("--out", help="write examples (or packed rows) as JSON lines to this file")
    parser.add_argument("--packed", action="store_true", help="with --out: write packed rows")
    parser.add_argument("--limit", type=int, help="with --out: at most this many lines")
    parser.add_argument("--model_name_or_path", help="tokenizer directory (flat-flag mode)")
    parser.add_argument("--tokenizer", help="tokenizer directory, if not the model's")
    defaults = {f.name: f.default for f in dataclasses.fields(DataArgs)}
    for key, default in defaults.items():
        parser.add_argument(f"--{key}", default=None, help=f"(default {default!r})")
    known, overrides = parser.parse_known_args(argv)
    if known.config:
        from jaxsft.config_load import load_config

        cfg = load_config(known.config, overrides)
        tok = known.tokenizer or getattr(cfg, "tokenizer_name_or_path", None) or cfg.model_name_or_path
        return DataArgs.from_config(cfg), tok, known
    values = {k: v for k, v in vars(known).items() if v is not None and k in defaults}
    for key, value in values.items():  # flat flags arrive as text
        default = defaults.get(key)
        if isinstance(default, bool):
            values[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or key in ("max_samples", "preprocessing_num_workers"):
            values[key] = int(value)
        elif key == "val_size":
            values[key] = float(value)
    return DataArgs(**values), known.tokenizer or known.model_name_or_path, known


def _masked(ids, labels) -> str:
    return " ".join(str(i) if lab != IGNORE_INDEX else f"[{i}]" for i, lab in zip(ids, labels))


def _row_labels(row: dict, key: str = "targets") -> list:
    """Packed row -> unshifted labels (the label of token i is the target at i - 1 in its segment); with
    key "weights", the labels' loss weights the same way (0 where nothing is learned)."""
    none = IGNORE_INDEX if key == "targets" else 0.0
    labels = [none] + row[key][:-1].tolist()
    return [lab if seg and i and row["segment_ids"][i - 1] == seg else none
            for i, (lab, seg) in enumerate(zip(labels, row["segment_ids"].tolist()))]


def write_jsonl(data, path: str, packed: bool, limit: int | None) -> int:
    """Examples (or packed rows) in dataset order, no shuffling; returns the number of lines."""
    weighted = is_weighted(data.train)
    if packed:
        bins, _ = greedy_knapsack([len(ids) for ids, _ in data.train], data.seq_len)
        records = ({"input_ids": row["input_ids"].tolist(), "labels": _row_labels(row),
                    "segment_ids": row["segment_ids"].tolist(), "positions": row["positions"].tolist(),
                    **({"weights": _row_labels(row, "weights")} if weighted else {})}
                   for row in (make_row(data.train, b, data.seq_len, data.pad_id, weighted) for b in bins))
    else:
        records = ({"input_ids": e[0].tolist(), "labels": e[1].tolist(),
                    **({"weights": weights_of(e).tolist()} if weighted else {})} for e in data.train)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            if limit is not None and n >= limit:
                break
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    args, tokenizer_path, known = _args(sys.argv[1:] if argv is None else argv)
    n = known.num_examples
    if not tokenizer_path:
        raise SystemExit("dump_dataset: give --model_name_or_path (or --tokenizer) or a --config naming one")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    data = build_datasets(args, tokenizer)
    if known.out:
        lines = write_jsonl(data, known.out, known.packed, known.limit)
        print(f"wrote {lines} {'packed rows' if known.packed else 'examples'} to {known.out}")
        return
    examples = data.train if data.train else []
    for k, (ids, labels) in enumerate(examples[:n]):
        learned = [int(t) for t in labels if t != IGNORE_INDEX]
        print(f"===== example {k}: {len(ids)} tokens, {len(learned)} labels")
        print("--- input:")
        print(tokenizer.decode(ids, skip_special_tokens=False))
        print("--- learned (labels decoded):")
        print(tokenizer.decode(learned, skip_special_tokens=False))
        print("--- ids ([masked]):")
        print(_masked(ids.tolist(), labels.tolist()))
    print("===== counts")
    for key, value in data.stats.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
