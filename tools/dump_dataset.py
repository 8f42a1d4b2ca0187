"""Print encoded training examples with their labels decoded, to check templates and masking.

    python tools/dump_dataset.py --config cfg.yaml [key=value ...] [-n 3]
    python tools/dump_dataset.py --model_name_or_path DIR --dataset identity --dataset_dir data --template qwen

Shows, per example: the full text, the learned text (labels that are not -100, decoded), and the ids with
the masked ones in brackets. Then the preprocessing counts (dropped rows with reasons, packing efficiency).
"""

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsft.data.pipeline import DEFAULTS, build_datasets  # noqa: E402
from jaxsft.data.supervised import IGNORE_INDEX  # noqa: E402


def _args(argv: list[str]) -> tuple[object, str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="jaxsft YAML config (uses jaxsft.config)")
    parser.add_argument("-n", "--num_examples", type=int, default=3)
    parser.add_argument("--model_name_or_path", help="tokenizer directory (flat-flag mode)")
    parser.add_argument("--tokenizer", help="tokenizer directory, if not the model's")
    for key, default in DEFAULTS.items():
        parser.add_argument(f"--{key}", default=None, help=f"(default {default!r})")
    parser.add_argument("--dataset")
    known, overrides = parser.parse_known_args(argv)
    if known.config:
        from jaxsft.config import load_config

        cfg = load_config(known.config, overrides)
        tok = known.tokenizer or getattr(cfg, "tokenizer_name_or_path", None) or cfg.model_name_or_path
        return cfg, tok, known.num_examples
    values = {k: v for k, v in vars(known).items() if v is not None and k in {*DEFAULTS, "dataset"}}
    for key, value in values.items():  # flat flags arrive as text
        default = DEFAULTS.get(key)
        if isinstance(default, bool):
            values[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or key in ("max_samples", "preprocessing_num_workers"):
            values[key] = int(value)
        elif key == "val_size":
            values[key] = float(value)
    return types.SimpleNamespace(**values), known.tokenizer or known.model_name_or_path, known.num_examples


def _masked(ids, labels) -> str:
    return " ".join(str(i) if lab != IGNORE_INDEX else f"[{i}]" for i, lab in zip(ids, labels))


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    args, tokenizer_path, n = _args(sys.argv[1:] if argv is None else argv)
    if not tokenizer_path:
        raise SystemExit("dump_dataset: give --model_name_or_path (or --tokenizer) or a --config naming one")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    data = build_datasets(args, tokenizer)
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
