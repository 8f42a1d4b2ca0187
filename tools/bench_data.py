"""Preprocessing throughput and packing efficiency of the real data pipeline, one JSON line per cutoff.

    python tools/bench_data.py --config cfg.yaml [--cutoffs 1024,2048,4096] [--repeat 3] [key=value ...]

For each cutoff_len: `build_datasets` (read, convert, tokenize, plan packing) timed `--repeat` times (the
best is reported as examples/s), and the packed rows and packing efficiency (non-pad tokens / row
capacity) of the training split. Packing is switched on whatever the config says.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jaxsft.config import load_config  # noqa: E402
from jaxsft.data.args import DataArgs  # noqa: E402
from jaxsft.data.pipeline import build_datasets  # noqa: E402
from jaxsft.runtime import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cutoffs", default="1024,2048,4096")
    parser.add_argument("--repeat", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    for cutoff in [int(c) for c in args.cutoffs.split(",")]:
        cfg = load_config(args.config, ["do_train=false", "packing=true", f"cutoff_len={cutoff}", *overrides])
        times = []
        for _ in range(args.repeat):
            tokenizer = load_tokenizer(cfg)  # build_datasets fixes the tokenizer in place: start fresh
            start = time.perf_counter()
            data = build_datasets(DataArgs.from_config(cfg), tokenizer)
            times.append(time.perf_counter() - start)
        s = data.stats
        print(json.dumps({
            "cutoff_len": cutoff, "dataset": cfg.dataset, "max_samples": cfg.max_samples,
            "examples": s["train_examples"], "dropped": s["train_dropped"], "tokens": s["train_tokens"],
            "label_tokens": s["train_label_tokens"], "packed_rows": s["train_packed_rows"],
            "packing_efficiency": round(s["train_packing_efficiency"], 4),
            "unpacked_rows_efficiency": round(s["train_tokens"] / (s["train_examples"] * cutoff), 4),
            "build_s_best": round(min(times), 3), "examples_per_s": round(s["train_rows_read"] / min(times), 1),
        }), flush=True)


if __name__ == "__main__":
    main()
