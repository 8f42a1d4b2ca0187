"""Preprocessing throughput, where its time goes, and packing efficiency of the real data pipeline.

    python tools/bench_data.py --config cfg.yaml [--cutoffs 1024,2048,4096] [--repeat 3] [--workers 1,2]
        [--split] [--lf_python /work/lfvenv/bin/python] [--unique_copies K] [key=value ...]

For each cutoff_len and each `preprocessing_num_workers` in `--workers`: `build_datasets` (read, convert,
tokenize, plan packing; the tokenized-data cache off) timed `--repeat` times (the best is reported as
examples/s; `cpu_s_best` is the CPU time of the process, its threads and workers, with the load average),
and the packed rows and packing efficiency (non-pad tokens / row capacity) of the training split.
Packing is switched on whatever the config says. `--split` also times the stages one by one on one worker:
read (files -> rows), convert (rows -> conversations), tokenize (render and encode every text, in
batched tokenizer calls), mask (truncate, assemble ids and labels), pack (the epoch's knapsack plan) and
save (LLaMA-Factory's `tokenized_path` layout, and the tokenized-data cache entry). `--lf_python` also runs
LLaMA-Factory's `get_dataset` on the same rows in that venv's python (one timing per setting) and reports
its examples/s, CPU seconds, tokens and label tokens beside jaxsft's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jaxsft.config_load import load_config  # noqa: E402
from jaxsft.data.args import DataArgs  # noqa: E402
from jaxsft.data.pipeline import build_datasets  # noqa: E402
from jaxsft.runtime import load_tokenizer  # noqa: E402


def stage_split(cfg) -> dict[str, float]:
    """Seconds per stage of making the training examples, on one worker."""
    import numpy as np

    from jaxsft.data import cache, sources
    from jaxsft.data.batch_tokenize import prefetch
    from jaxsft.data.encode import CHUNK, learned, make_template, text_tokenizer
    from jaxsft.data.formats import to_conversation
    from jaxsft.data.packing import plan_epoch
    from jaxsft.data.pipeline import save_tokenized
    from jaxsft.data.supervised import encode_supervised

    args = DataArgs.from_config(cfg).replace(data_cache_dir=None)
    tokenizer = load_tokenizer(cfg)
    template = make_template(args, tokenizer)
    tokenizer = text_tokenizer(tokenizer, template)  # what encode_rows uses
    seconds: dict[str, float] = {}

    def encode(conversation, tok):
        return encode_supervised(conversation, tok, template, args.cutoff_len, args.train_on_prompt,
                                 args.mask_history, args.preserve_thinking)

    t = time.perf_counter()
    rows_of, attrs, refs = sources.load_mixed(args.dataset, args)
    seconds["read"] = time.perf_counter() - t
    t = time.perf_counter()
    conversations = []
    for ref in refs:
        attr, rows = attrs[ref.source], rows_of[ref.source]
        try:
            conversations.append(to_conversation(rows[ref.row], attr, attr.path, ref.row))
        except Exception:  # noqa: BLE001 - dropped rows cost nothing further
            pass
    seconds["convert"] = time.perf_counter() - t
    tokenize = mask = 0.0
    examples = []
    for start in range(0, len(conversations), CHUNK):
        block = conversations[start:start + CHUNK]
        t = time.perf_counter()
        fast = prefetch(tokenizer, block, encode)
        tokenize += time.perf_counter() - t
        t = time.perf_counter()
        for conversation in block:
            try:
                ids, labels = encode(conversation, fast)
            except ValueError:
                continue
            example = (np.asarray(ids, np.int32), np.asarray(labels, np.int32))
            if learned(example[1]):
                examples.append(example)
        mask += time.perf_counter() - t
    seconds["tokenize"], seconds["mask"] = tokenize, mask
    t = time.perf_counter()
    plan_epoch([len(ids) for ids, _ in examples], args.cutoff_len, args.seed, 0, True)
    seconds["pack"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_tokenized(str(Path(tmp) / "tokenized"), examples, None)
        seconds["save_tokenized_path"] = time.perf_counter() - t
        t = time.perf_counter()
        cache.save(str(Path(tmp) / "cache"), "bench", examples, None, {})
        seconds["save_cache"] = time.perf_counter() - t
    return {k: round(v, 3) for k, v in seconds.items()}


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its finished children (workers): the work done,
    which a shared machine's load changes far less than the wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# LLaMA-Factory's get_dataset on the same rows, in its own venv (`--lf_python`): wall and CPU seconds, tokens.
_LF = """
import json, resource, sys, time
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
model_args, data_args, training_args, _, _ = get_train_args(json.loads(sys.argv[1]))
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
t, c = time.perf_counter(), cpu()
train = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
seconds, cpu_s = time.perf_counter() - t, cpu() - c
labels = sum(sum(1 for x in row[1:] if x != -100) for row in train["labels"])
print("RESULT " + json.dumps({"examples": len(train), "tokens": sum(map(len, train["input_ids"])),
                              "label_tokens": labels, "seconds": seconds, "cpu_s": cpu_s}))
"""


def llamafactory(python: str, cfg, workers: int) -> dict:
    """LLaMA-Factory 0.9.5 preprocessing the config's rows (no packing: LF's SFT default; the same tokens)."""
    import subprocess

    lf_cfg = {"stage": "sft", "do_train": True, "finetuning_type": "lora", "model_name_or_path": cfg.model_name_or_path,
              "dataset": cfg.dataset, "dataset_dir": cfg.dataset_dir, "template": cfg.template,
              "cutoff_len": cfg.cutoff_len, "max_samples": cfg.max_samples, "overwrite_cache": True,
              "preprocessing_num_workers": workers if workers > 1 else None, "report_to": "none",
              "output_dir": tempfile.mkdtemp(prefix="bench_data_lf_")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
           "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="bench_data_hf_")}
    proc = subprocess.run([python, "-c", _LF, json.dumps(lf_cfg)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"LLaMA-Factory preprocessing failed:\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    return {"lf_examples_per_s": round(r["examples"] / r["seconds"], 1), "lf_s": round(r["seconds"], 3),
            "lf_cpu_s": round(r["cpu_s"], 3), "lf_tokens": r["tokens"], "lf_label_tokens": r["label_tokens"]}


def unique_copies(rows_file: Path, copies: int, out_dir: Path) -> list[str]:
    """`copies` copies of the rows of an alpaca-format file, copy c > 0 with "[c] " before each instruction
    and "(c) " before each output: no two rows alike (a row repeated verbatim would let a cache of repeated
    texts skip work real data has to do). Returns the config overrides that read it."""
    rows = json.loads(rows_file.read_text(encoding="utf-8"))
    out = [row if c == 0 else {**row, "instruction": f"[{c}] {row['instruction']}", "output": f"({c}) {row['output']}"}
           for c in range(copies) for row in rows]
    name = f"{rows_file.stem}_unique_x{copies}"
    (out_dir / f"{name}.json").write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    (out_dir / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}))
    return [f"dataset={name}", f"dataset_dir={out_dir}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cutoffs", default="1024,2048,4096")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="1", help="comma list of preprocessing_num_workers to time")
    parser.add_argument("--split", action="store_true", help="also time each stage on one worker")
    parser.add_argument("--lf_python", help="a LLaMA-Factory venv's python: time its get_dataset after each "
                        "jaxsft timing, same rows and workers (e.g. /work/lfvenv/bin/python)")
    parser.add_argument("--unique_copies", type=int, metavar="K",
                        help="read K copies of --rows_file, each row made unique (see unique_copies)")
    parser.add_argument("--rows_file", default=str(REPO.parent / "shared" / "data" / "llamafactory" /
                                                   "alpaca_en_demo.json"))
    args, overrides = parser.parse_known_args(argv)
    if args.unique_copies:
        overrides = [*unique_copies(Path(args.rows_file), args.unique_copies, Path(tempfile.mkdtemp())), *overrides]
    for cutoff in [int(c) for c in args.cutoffs.split(",")]:
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = load_config(args.config, ["do_train=false", "packing=true", f"cutoff_len={cutoff}",
                                            f"preprocessing_num_workers={workers}", "data_cache_dir=null",
                                            *overrides])
            times, cpu = [], []
            for _ in range(args.repeat):
                tokenizer = load_tokenizer(cfg)  # build_datasets fixes the tokenizer in place: start fresh
                start, start_cpu = time.perf_counter(), _cpu_seconds()
                data = build_datasets(DataArgs.from_config(cfg), tokenizer)
                times.append(time.perf_counter() - start)
                cpu.append(_cpu_seconds() - start_cpu)
            s = data.stats
            record = {
                "cutoff_len": cutoff, "workers": workers, "dataset": cfg.dataset, "max_samples": cfg.max_samples,
                "examples": s["train_examples"], "dropped": s["train_dropped"], "tokens": s["train_tokens"],
                "label_tokens": s["train_label_tokens"], "packed_rows": s["train_packed_rows"],
                "packing_efficiency": round(s["train_packing_efficiency"], 4),
                "unpacked_rows_efficiency": round(s["train_tokens"] / (s["train_examples"] * cutoff), 4),
                "build_s_best": round(min(times), 3),
                "examples_per_s": round(s["train_rows_read"] / min(times), 1),
                "cpu_s_best": round(min(cpu), 3), "load_average": round(os.getloadavg()[0], 2),
            }
            if args.lf_python:
                record.update(llamafactory(args.lf_python, cfg, workers))
                record["load_average_after_lf"] = round(os.getloadavg()[0], 2)
            if args.split and workers == 1:
                record["split_s"] = stage_split(cfg)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
