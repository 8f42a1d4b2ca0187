"""Entry point: `jaxsft train cfg.yaml [key=value ...]` (as `llamafactory-cli` reads it), or
`python -m jaxsft.main --config cfg.yaml [key=value ...]`.

Subcommands: `train` runs the stages the config asks for (do_train, do_eval, do_predict, export_dir), as
`llamafactory-cli train` does; `eval`, `predict` and `export` run only that stage; `chat` talks to the
model; `inspect` writes the data report (`data_report.html`: counts, dropped rows, learned share, template
flags) and prints its summary; `version` and `env` print versions for bug reports. Without a subcommand the
configured stages run, as with `train`.

Reads and validates the config, says what it will run, checks the paths, template, data and devices
(`jaxsft.preflight.validate_run`, before anything compiles or loads weights), then runs the configured
stages in order: train, eval, predict, export. Errors a person must fix (`jaxsft.errors.UserError`) print
one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from jaxsft.config import Config, ignored_settings, met_settings
from jaxsft.config_load import load_config
from jaxsft.errors import UserError, report


def _stages() -> dict[str, Callable]:
    """Stage name -> runner `(cfg, trained) -> result`. Imported lazily so `--dry_run` never pays for JAX
    start-up. `trained` is what the train stage of this run handed on (the model on its mesh), or None."""
    from jaxsft.evaluate import run_evaluation
    from jaxsft.export import run_export_stage
    from jaxsft.predict import run_prediction
    from jaxsft.train import train

    return {
        "tokenize": tokenize_only,
        "train": lambda cfg, _trained: _trained_or_stop(*train(cfg)),
        "eval": run_evaluation,
        "predict": run_prediction,
        "export": run_export_stage,
    }


class StoppedBySignal(Exception):
    """Training stopped by SIGTERM/SIGINT after saving what it had: the process exits 128 + the signal, as a
    process killed by it does, so a scheduler sees a run that did not finish (and requeues it) while nothing is
    lost. (It exited 0: a preempted Kubernetes job counted as completed.)"""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _trained_or_stop(results: dict, trained):
    if trained is None:  # stopped by a signal: its checkpoint or model is saved, the later stages wait for a rerun
        raise StoppedBySignal(results["stopped_by_signal"])
    return trained


def tokenize_only(cfg: Config, _trained=None) -> None:
    """LLaMA-Factory's preprocessing run (its examples' `*_preprocess.yaml`): tokenize the data, save it at
    `tokenized_path` and stop; a later run with the same `tokenized_path` trains from it."""
    import jax

    from jaxsft.data.args import DataArgs
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.runtime import init_distributed, load_tokenizer

    init_distributed(cfg)
    build_datasets(DataArgs.from_config(cfg), load_tokenizer(cfg), process_index=jax.process_index(),
                   process_count=jax.process_count())
    print(f"Tokenized dataset is saved at {cfg.tokenized_path}; nothing was trained (as in LLaMA-Factory). "
          f"Run the config again to train from it.", flush=True)


def _tokenizes_first(cfg: Config) -> bool:
    """do_train with a tokenized_path that holds no dataset yet: LLaMA-Factory tokenizes, saves and exits."""
    folder = Path(cfg.tokenized_path) if cfg.tokenized_path else None
    return bool(cfg.do_train and folder is not None and not (folder.is_dir() and any(folder.iterdir())))


def planned_stages(cfg: Config) -> list[str]:
    if _tokenizes_first(cfg):
        return ["tokenize"]
    stages = []
    if cfg.do_train:
        stages.append("train")
    if cfg.do_eval and not cfg.do_train:  # training evaluates at its end
        stages.append("eval")
    if cfg.do_predict:
        stages.append("predict")
    if cfg.export_dir:
        stages.append("export")
    return stages


def _variants(cfg: Config) -> str:
    """LoRA+ / DoRA / PiSSA / LLaMA Pro, when on."""
    parts = [f"LoRA+ ratio {cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio is not None else "",
             "DoRA" if cfg.use_dora else "",
             f"PiSSA ({'exact SVD' if cfg.pissa_iter < 0 else f'{cfg.pissa_iter} power steps'}"
             f"{', converted on export' if cfg.pissa_convert else ''})" if cfg.pissa_init else "",
             "LLaMA Pro blocks" if cfg.use_llama_pro else ""]
    parts = [p for p in parts if p]
    return f" [{', '.join(parts)}]" if parts else ""


def describe(cfg: Config, stages: list[str] | None = None) -> str:
    """A short human summary of what the run will do."""
    stages = planned_stages(cfg) if stages is None else stages
    planned = ", ".join(stages) if stages else "none (set do_train, do_eval, do_predict or export_dir)"
    lines = [f"jaxsft: stages: {planned}"]
    training = "train" in stages
    if cfg.finetuning_type == "lora" and training and (cfg.create_new_adapter or not cfg.adapter_name_or_path):
        # (an adapter trained on, or one that eval/predict/export load, brings its own rank)
        method = f" (rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, target {cfg.lora_target})"
    else:
        method = ""
    lines.append(f"  model: {cfg.model_name_or_path}  template: {cfg.template}  finetuning: {cfg.finetuning_type}"
                 + method + _variants(cfg))
    if cfg.adapter_name_or_path:
        lines.append(f"  adapter: {cfg.adapter_name_or_path}"
                     + ("  (a new adapter is trained on top)" if training and cfg.create_new_adapter else ""))
    resume = cfg.resume_from_checkpoint
    if resume not in (None, False) and str(resume).lower() != "false" and set(stages) & {"train", "eval", "predict"}:
        lines.append(f"  checkpoint: {cfg.output_dir + ' (latest)' if str(resume).lower() == 'true' else resume}")
    if set(stages) & {"train", "eval", "predict", "tokenize"}:  # an export alone reads no data
        data = (f"{cfg.dataset}" if training or cfg.val_size > 1e-6 else "") \
            + (f"  eval: {cfg.eval_dataset}" if cfg.eval_dataset else "")
        lines.append(f"  data: {data.strip() or 'none'} (dir {cfg.dataset_dir})  cutoff_len: {cfg.cutoff_len}  "
                     f"packing: {cfg.packing}  val_size: {cfg.val_size}")
    if training:
        steps = f"max_steps {cfg.max_steps}" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epochs"
        lines.append(f"  optim: {cfg.optim} lr {cfg.learning_rate:g} ({cfg.lr_scheduler_type}), {steps}, "
                     f"batch {cfg.per_device_train_batch_size}/device x {cfg.gradient_accumulation_steps} "
                     f"accumulation")
    if set(stages) & {"train", "eval", "predict"}:
        lines.append(f"  mesh: {cfg.mesh}  attention: {cfg.attention_impl}  remat: {cfg.remat_policy}  "
                     f"params {cfg.param_dtype} / compute {cfg.compute_dtype}")
        lines.append(f"  output_dir: {cfg.output_dir}")
    if "export" in stages:
        lines.append(f"  export_dir: {cfg.export_dir} ({'PEFT adapter' if cfg.export_adapter else 'merged model'}, "
                     f"{cfg.export_dtype})")
    for key, how in met_settings(cfg).items():
        lines.append(f"  note: '{key}': {how}")
    for key, why in ignored_settings(cfg).items():
        lines.append(f"  note: '{key}' has no effect in jaxsft: {why}")
    return "\n".join(lines)


def _split_flag_overrides(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Separate `--key value` / `--key=value` / `--flag` overrides (as LLaMA-Factory's CLI takes them) from
    the parser's own options, before argparse sees them: left to argparse, the value of an unknown flag
    would be taken for the config file."""
    takes_value = {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}
    own, extra, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in takes_value or not token.startswith("--"):
            own.append(token)
            if takes_value.get(name) and "=" not in token and i + 1 < len(argv):
                own.append(argv[i + 1])
                i += 1
        elif "=" in token:
            extra.append(token[2:])
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            extra.append(f"{token[2:]}={argv[i + 1]}")
            i += 1
        else:
            extra.append(f"{token[2:]}=true")
        i += 1
    return own, extra


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxsft.main",
        description="Supervised fine-tuning in JAX. Keys follow LLaMA-Factory's SFT YAML.")
    parser.add_argument("config_file", nargs="?", help="YAML config (same as --config)")
    parser.add_argument("--config", dest="config", help="YAML config file")
    parser.add_argument("--dry_run", action="store_true", help="validate and describe the run, then stop")
    parser.add_argument("--compile_for", metavar="TARGET",
                        help="compile the run's steps for a TPU slice (e.g. v5p-8, v5e:2x2) or GPU host (h100-8) on "
                             "this host, print per-chip memory and FLOPs, then stop (same as compile_for=TARGET)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied after the YAML")
    own, extra = _split_flag_overrides(argv, parser)
    args = parser.parse_intermixed_args(own)
    if args.config_file and "=" in args.config_file:  # first positional was an override, not a file
        args.overrides.insert(0, args.config_file)
        args.config_file = None
    if args.config and args.config_file:
        parser.error("give the config once: either --config FILE or FILE")
    args.config = args.config or args.config_file
    args.overrides = list(args.overrides) + extra
    if args.compile_for:
        args.overrides.append(f"compile_for={args.compile_for}")
    return args


def run(cfg: Config, stages: dict[str, Callable] | None = None) -> None:
    """The planned stages in order; the trained model goes from train to the stages after it in memory."""
    stages = stages or _stages()
    trained = None
    for name in planned_stages(cfg):
        result = stages[name](cfg, trained)  # a signal during training raises StoppedBySignal: no later stage
        if name == "train":
            trained = result


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging() -> None:
    """jaxsft's own messages (trainable params, dropped rows, fallbacks) on stderr, one line each."""
    logger = logging.getLogger("jaxsft")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[jaxsft] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # libraries (orbax/absl) put a handler on the root logger: print once


# Subcommand -> (flags it sets, the one stage it runs); `train` runs whatever the config asks for.
SUBCOMMANDS = {
    "train": ((), None),
    "eval": (("do_train=false", "do_predict=false", "do_eval=true"), "eval"),
    "predict": (("do_train=false", "do_eval=false", "do_predict=true"), "predict"),
    "export": (("do_train=false", "do_eval=false", "do_predict=false"), "export"),
}
USAGE = """usage: jaxsft {train,eval,predict,export,chat,inspect} cfg.yaml [key=value ...]
       jaxsft {version,env}
       python -m jaxsft.main --config cfg.yaml [key=value ...] [--dry_run]

  train    run the stages the config asks for (do_train, do_eval, do_predict, export_dir)
  eval     evaluate only (do_eval)          predict  generate and score only (do_predict)
  export   merge adapter_name_or_path into model_name_or_path and write export_dir
  chat     chat with the model in the terminal
  inspect  data report: counts, dropped rows, learned tokens, template flags (data_report.html)
  version  jaxsft's version                 env      versions and devices, for bug reports"""


def cli(argv: Sequence[str] | None = None) -> int:
    """`jaxsft ...`: the exit status. A signal that lands in a garbage-collector callback or a `__del__` (JAX
    runs one at every collection) is sent again, so the stop it asks for is not dropped with the exception."""
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _resend_swallowed_interrupt(unraisable, previous_hook)
    try:
        return _cli(argv)
    finally:
        sys.unraisablehook = previous_hook


def _resend_swallowed_interrupt(unraisable, previous_hook) -> None:
    """Python drops an exception raised where it cannot propagate (it prints 'Exception ignored in ...'), and the
    run went on to the end with status 0 after a SIGTERM/SIGINT landed in JAX's gc callback. The signal is sent
    again from a thread, so its handler runs once the interpreter is back in ordinary code."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        previous_hook(unraisable)
        return
    signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
    threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()


def _cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command in ("-h", "--help", "help") or not argv:
        print(USAGE)
        return 0
    if command in ("version", "env", "chat", "inspect"):
        from jaxsft import cli_tools

        _setup_logging()
        try:
            return getattr(cli_tools, command)(argv[1:])
        except UserError as e:
            return report(e)
        except KeyboardInterrupt:  # Ctrl-C while the model or the data loads
            print("\nerror: interrupted (SIGINT)", file=sys.stderr, flush=True)
            return 130
    only = None
    if command in SUBCOMMANDS:
        flags, only = SUBCOMMANDS[command]
        argv = argv[1:] + list(flags)
    args = parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        return report(e)
    print(describe(cfg, None if only is None else [only]), flush=True)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    try:
        if cfg.compile_for:  # a plan for a TPU slice: shapes only, no data or weights read
            os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only compiles; never claim local chips
            from jaxsft.aot import run_compile_for

            run_compile_for(cfg)
            return 0
        from jaxsft.preflight import validate_run

        validate_run(cfg, read_rows=args.dry_run)  # --dry_run too: every check that needs no weights
        if args.dry_run:
            print("dry run: config, paths, template, data and devices check out; nothing was run", flush=True)
            return 0
        if only is None:
            run(cfg)
        else:
            _stages()[only](cfg)
    except UserError as e:
        return report(e)
    except StoppedBySignal as e:  # the training loop saved and said so
        return 128 + e.signum
    except KeyboardInterrupt as e:  # outside the training loop (which turns SIGINT/SIGTERM into save-and-stop)
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        stages = [only] if only else planned_stages(cfg)
        # eval, predict and export write their files whole or not at all (an export cut short is replaced)
        kept = "checkpoints already written are intact" if "train" in stages else \
            f"no {'/'.join(stages)} output is half-written; run the same command again"
        print(f"error: interrupted ({name}); stopped ({kept})", file=sys.stderr, flush=True)
        os._exit(143 if name == "SIGTERM" else 130)  # skip teardown: XLA's threads may still be starting
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM while no training loop runs (loading, preprocessing, eval, predict, export): stop as on SIGINT,
    with one line, instead of dying without a word."""


def _terminated(_signum, _frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(cli())
