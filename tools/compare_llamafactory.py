"""Side by side with LLaMA-Factory: the same model, data, template, cutoff, batch, LoRA and epochs.

    python tools/compare_llamafactory.py --build_model saves/compare/tiny-4l-256   # build it, then compare
    python tools/compare_llamafactory.py --model DIR [--dataset alpaca_en_demo] [--max_samples 400]
        [--template llama3] [--cutoff_len 1024] [--batch 4] [--epochs 1] [--finetuning_type lora]
        [--unpacked | --lf_packing]
        [--lf_cli /work/lfvenv/bin/llamafactory-cli | --lf_python VENV/bin/python] [--only lf|jaxsft]
        [--preprocess] [--out saves/compare] [--jaxsft key=value ...]

Writes `lf.yaml` and `jaxsft.yaml` under `--out`, runs LLaMA-Factory (from /tmp, so this repo is not on
its path) and `python -m jaxsft.main`, reads both `train_results.json` and prints train_runtime, tokens/s
and the ratios as one JSON line (plus a readable table on stderr). jaxsft packs (`packing: true`), or with
`--unpacked` does not (LF's default, both sides then pad each batch: LF to its longest example, jaxsft to
that example's length bucket). With `--lf_packing` LLaMA-Factory packs too, at its fastest setting
(`packing` + `neat_packing`: block-diagonal attention, as jaxsft's segment ids). LF's tokens/s is its `effective_tokens_per_sec`
(every input token of the dataset x epochs / runtime); jaxsft's is `train_tokens_per_second` (non-pad).
Neither side saves checkpoints during the run (`save_strategy: "no"`).

`--build_model DIR` first builds a model there (unless it exists): a 4096-token byte-level BPE tokenizer
trained on the demo data with the llama3 special tokens, and a Llama with random weights of `--shape`
(`tiny-4l-256`, or `smollm-135m`: SmolLM-135M's 30 layers, hidden 576, 9/3 heads, 49152-row tied
embedding). `--preprocess` also times preprocessing alone on both sides (jaxsft `build_datasets`
vs LF `get_dataset`, same rows, template and cutoff) and reports examples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "llamafactory"


# Model shapes --build_model can build (random weights, never downloaded).
SHAPES = {
    "tiny-4l-256": dict(layers=4, hidden=256, intermediate=1024, heads=4, kv_heads=2),
    # SmolLM-135M's shape: 134.5M params (tied embeddings, 49152 rows; the tokenizer uses the first 4096)
    "smollm-135m": dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab_size=49152,
                        tie_word_embeddings=True),
}


def build_tiny_model(out: Path, data_dir: Path, vocab_size: int = 4096, seed: int = 0,
                     shape: str = "tiny-4l-256") -> None:
    """A byte-level BPE tokenizer trained on the demo data (llama3 special tokens) and a random Llama
    (tools/make_tiny_model.py's builders) of one of SHAPES."""
    from make_tiny_model import save_random_llama, string_fields, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    texts = [t for name in ("alpaca_en_demo.json", "identity.json")
             for t in string_fields(json.loads((data_dir / name).read_text()))]
    fast = train_tokenizer(texts, vocab_size)
    fast.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"  # LF's transformers wants the generic class name
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    n = save_random_llama(out, fast, max_positions=8192, seed=seed, **SHAPES[shape])
    print(f"built {out}: vocab {len(fast)}, {n:,d} params", file=sys.stderr)


def common_keys(args) -> dict:
    keys = {
        "model_name_or_path": str(Path(args.model).absolute()),
        "stage": "sft", "do_train": True, "finetuning_type": args.finetuning_type,
        "dataset": args.dataset, "dataset_dir": str(Path(args.dataset_dir).absolute()), "template": args.template,
        "cutoff_len": args.cutoff_len, "max_samples": args.max_samples,
        "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
        "learning_rate": args.learning_rate, "num_train_epochs": float(args.epochs),
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "logging_steps": 10, "save_strategy": "no",
        "overwrite_output_dir": True, "report_to": "none", "seed": 42,
    }
    if args.finetuning_type == "lora":
        keys.update(lora_rank=args.lora_rank, lora_target="all")
    return keys


def lf_config(args, out: Path) -> dict:
    keys = {**common_keys(args), "output_dir": str((out / "lf").absolute()), "overwrite_cache": True,
            "include_effective_tokens_per_second": True, "bf16": False, "plot_loss": False}
    if args.lf_packing:  # LF at its fastest: packed rows with block-diagonal attention, as jaxsft packs
        keys.update(packing=True, neat_packing=True)
    return keys


def jaxsft_config(args, out: Path) -> dict:
    overrides = dict(kv.split("=", 1) for kv in args.jaxsft)
    overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
    return {**common_keys(args), "output_dir": str((out / "jaxsft").absolute()), "packing": not args.unpacked,
            **overrides}


def lf_command(args, config: Path) -> list[str]:
    if args.lf_python:
        return [args.lf_python, "-c", "import sys; from llamafactory.cli import main; main()", "train", str(config)]
    return [args.lf_cli, "train", str(config)]


def run_logged(cmd: list[str], log: Path, cwd: str, env: dict) -> float:
    print(f"$ (cd {cwd} && {' '.join(cmd)}) > {log}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return wall


_JAXSFT_PREPROCESS = """
import json, sys, time
from jaxsft.config_load import build_config
from jaxsft.data.args import DataArgs
from jaxsft.data.pipeline import build_datasets
from jaxsft.runtime import load_tokenizer
cfg = build_config({**json.loads(sys.argv[1]), "do_train": False, "data_cache_dir": None})  # time tokenizing
tokenizer = load_tokenizer(cfg)
t = time.perf_counter()
data = build_datasets(DataArgs.from_config(cfg), tokenizer)
seconds = time.perf_counter() - t
print("RESULT " + json.dumps({"examples": len(data.train), "tokens": data.stats["train_tokens"], "seconds": seconds}))
"""

_LF_PREPROCESS = """
import json, sys, time
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
model_args, data_args, training_args, finetuning_args, _ = get_train_args(json.loads(sys.argv[1]))
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
t = time.perf_counter()
module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
seconds = time.perf_counter() - t
train = module["train_dataset"]
print("RESULT " + json.dumps({"examples": len(train), "tokens": sum(len(x) for x in train["input_ids"]),
                              "seconds": seconds}))
"""


def time_preprocessing(python: list[str], code: str, config: dict, cwd: str, env: dict) -> dict:
    proc = subprocess.run(python + ["-c", code, json.dumps(config)], cwd=cwd, env=env, capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"preprocessing timing failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["examples_per_s"] = round(result["examples"] / result["seconds"], 1)
    result["seconds"] = round(result["seconds"], 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model directory (tokenizer included)")
    parser.add_argument("--build_model", metavar="DIR", help="build a random model of --shape in DIR and use it")
    parser.add_argument("--shape", default="tiny-4l-256", choices=tuple(SHAPES), help="of --build_model")
    parser.add_argument("--unpacked", action="store_true",
                        help="jaxsft without packing too (both sides at LLaMA-Factory's defaults)")
    parser.add_argument("--lf_packing", action="store_true",
                        help="LLaMA-Factory with packing + neat_packing (its fastest setting) instead of its default")
    parser.add_argument("--dataset", default="alpaca_en_demo")
    parser.add_argument("--dataset_dir", default=str(DATA))
    parser.add_argument("--template", default="llama3")
    parser.add_argument("--max_samples", type=int, default=400)
    parser.add_argument("--cutoff_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size on both sides")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--finetuning_type", default="lora", choices=("lora", "full"))
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lf_cli", default="/work/lfvenv/bin/llamafactory-cli")
    parser.add_argument("--lf_python", help="python of a LLaMA-Factory venv (instead of --lf_cli)")
    parser.add_argument("--only", choices=("lf", "jaxsft"), help="run one side only")
    parser.add_argument("--preprocess", action="store_true", help="also time preprocessing on both sides")
    parser.add_argument("--out", default=str(REPO / "saves" / "compare"))
    parser.add_argument("--jaxsft", nargs="*", default=[], metavar="KEY=VALUE", help="extra jaxsft keys")
    args = parser.parse_args(argv)
    if args.build_model:
        model_dir = Path(args.build_model)
        if not (model_dir / "model.safetensors").is_file():
            build_tiny_model(model_dir, Path(args.dataset_dir), shape=args.shape)
        args.model = str(model_dir)
    if not args.model:
        parser.error("give --model DIR or --build_model DIR")

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    lf_yaml, jx_yaml = out / "lf.yaml", out / "jaxsft.yaml"
    lf_cfg, jx_cfg = lf_config(args, out), jaxsft_config(args, out)
    lf_yaml.write_text(yaml.safe_dump(lf_cfg, sort_keys=False))
    jx_yaml.write_text(yaml.safe_dump(jx_cfg, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
    lf_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    lf_python = [args.lf_python] if args.lf_python else [str(Path(args.lf_cli).parent / "python")]
    report: dict = {"model": args.model, "dataset": args.dataset, "max_samples": args.max_samples,
                    "template": args.template, "cutoff_len": args.cutoff_len, "batch": args.batch,
                    "epochs": args.epochs, "finetuning_type": args.finetuning_type,
                    "jaxsft_packing": not args.unpacked, "lf_packing": args.lf_packing,
                    "lf_yaml": str(lf_yaml), "jaxsft_yaml": str(jx_yaml)}
    if args.only != "jaxsft":
        wall = run_logged(lf_command(args, lf_yaml), out / "lf.log", "/tmp", lf_env)
        r = json.loads((out / "lf" / "train_results.json").read_text())
        report["lf"] = {"train_runtime": r["train_runtime"], "tokens_per_s": r.get("effective_tokens_per_sec"),
                        "samples_per_s": r.get("train_samples_per_second"), "train_loss": r.get("train_loss"),
                        "wall_s": round(wall, 1)}
    if args.only != "lf":
        wall = run_logged([sys.executable, "-m", "jaxsft.main", "--config", str(jx_yaml)], out / "jaxsft.log",
                          str(REPO), env)
        r = json.loads((out / "jaxsft" / "train_results.json").read_text())
        report["jaxsft"] = {"train_runtime": r["train_runtime"], "tokens_per_s": r.get("train_tokens_per_second"),
                            "samples_per_s": r.get("train_samples_per_second"), "train_loss": r.get("train_loss"),
                            "wall_s": round(wall, 1)}
    if "lf" in report and "jaxsft" in report:
        report["runtime_ratio_jaxsft_over_lf"] = round(report["jaxsft"]["train_runtime"] / report["lf"]["train_runtime"], 3)
        if report["lf"]["tokens_per_s"]:
            report["tokens_per_s_ratio_jaxsft_over_lf"] = round(
                report["jaxsft"]["tokens_per_s"] / report["lf"]["tokens_per_s"], 3)
    if args.preprocess:
        pre_keys = {k: v for k, v in jx_cfg.items() if k != "do_train"}
        report["preprocess_jaxsft"] = time_preprocessing([sys.executable], _JAXSFT_PREPROCESS, pre_keys, str(REPO), env)
        report["preprocess_lf"] = time_preprocessing(lf_python, _LF_PREPROCESS, lf_cfg, "/tmp", lf_env)
    for side in ("lf", "jaxsft"):
        if side in report:
            s = report[side]
            print(f"{side:7s} train_runtime {s['train_runtime']:9.2f} s   tokens/s {s['tokens_per_s'] or 0:10.1f}"
                  f"   loss {s['train_loss']}", file=sys.stderr)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
