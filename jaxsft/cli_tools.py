"""The `jaxsft` subcommands that run no stage: `version`, `env`, `chat` and `inspect`.

Each takes the arguments after its name and returns the exit status; a `UserError` becomes the one-line
`error:` in `jaxsft.main`.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Sequence

ENV_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tokenizers",
                "safetensors", "datasets", "numpy", "peft", "torch", "wandb", "mlflow-skinny", "mlflow",
                "tensorboardX")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version(argv: Sequence[str] = ()) -> int:
    print(f"jaxsft {_version('jaxsft') or 'unknown (not installed; running from source)'}")
    return 0


def env(argv: Sequence[str] = ()) -> int:
    """What a bug report needs: versions of jaxsft and its libraries, Python, the platform, JAX's backend
    and devices (as `llamafactory-cli env` prints them)."""
    lines = [f"- jaxsft: {_version('jaxsft') or 'not installed (source tree)'}",
             f"- Python: {platform.python_version()}", f"- Platform: {platform.platform()}"]
    for package in ENV_PACKAGES:
        found = _version(package)
        if found is not None or package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                                            "transformers"):
            lines.append(f"- {package}: {found or 'not installed'}")
    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        lines.append(f"- JAX backend: {jax.default_backend()}")
        lines.append(f"- Devices: {len(devices)} x {', '.join(kinds)} ({jax.process_count()} process(es), "
                     f"{jax.local_device_count()} local)")
    except Exception as e:  # a broken accelerator runtime is exactly what a bug report must show
        lines.append(f"- JAX backend: unavailable ({type(e).__name__}: {e})")
    print("\n".join(lines))
    return 0


def chat(argv: Sequence[str]) -> int:
    """`jaxsft chat cfg.yaml [key=value ...]`: the terminal chat of `jaxsft.chat`."""
    from jaxsft.chat import main

    args = list(argv)
    if args and not args[0].startswith("-") and "=" not in args[0]:
        args = ["--config", *args]
    return main(args)


def inspect(argv: Sequence[str]) -> int:
    """`jaxsft inspect cfg.yaml [--out DIR] [--examples N] [--screenshot PNG] [key=value ...]`: the data report
    (`jaxsft.data.audit`, `jaxsft.data.report`). Reads the data as training would, prints the summary (problems
    first) and writes `data_report.html` into `--out` (default: the config's output_dir, else the current
    directory); `--screenshot` renders it with headless Chromium and fails if the page logs to its console."""
    import argparse

    from jaxsft.config_load import load_config
    from jaxsft.errors import ConfigError, UserError
    from jaxsft.main import parse_args

    pre = argparse.ArgumentParser(prog="jaxsft inspect", add_help=False)
    pre.add_argument("--out", help="folder for data_report.html (default: output_dir)")
    pre.add_argument("--examples", type=int, default=10, help="examples rendered in the report (default 10)")
    pre.add_argument("--screenshot", help="also render the page to this PNG with headless Chromium")
    pre.add_argument("--size", default="1100x1500", help="screenshot width x height in pixels")
    own, rest = pre.parse_known_args(list(argv))
    args = parse_args(rest)
    cfg = load_config(args.config, args.overrides)
    if cfg.model_name_or_path is None or cfg.template is None:
        raise ConfigError("inspect needs model_name_or_path (for the tokenizer) and template")
    if not (cfg.dataset or cfg.eval_dataset or cfg.tokenized_path):
        raise ConfigError(f"inspect: {args.config or 'the config'} names no data to inspect; set dataset and/or "
                          f"eval_dataset (or tokenized_path)")
    from jaxsft.data.audit import audit_data, learned_mask
    from jaxsft.data.report import render_text, write_report
    from jaxsft.runtime import build_mesh, load_tokenizer, rows_per_process

    tokenizer = load_tokenizer(cfg)
    batch_rows = rows_per_process(cfg, build_mesh(cfg), cfg.per_device_train_batch_size)
    audit = audit_data(cfg, tokenizer, batch_rows, max(own.examples, 0))
    if audit.samples:  # the first example, learned runs in [[ ]]
        sample = audit.samples[0]
        mask, text, inside = learned_mask(sample.labels), [], False
        for start, end, piece in sample.pieces:
            if bool(mask[start:end].any()) != inside:
                inside = not inside
                text.append("[[" if inside else "]]")
            text.append(piece)
        print(f"== first example ({len(sample.ids)} tokens; learned text in [[ ]])")
        print("".join(text) + ("]]" if inside else ""))
    path = write_report(audit, own.out or cfg.output_dir or ".")
    print(render_text(audit, str(path)), flush=True)
    if own.screenshot:
        from jaxsft.browser import screenshot

        width, height = (int(x) for x in own.size.lower().split("x"))
        console = screenshot(path, own.screenshot, width, height)
        if console:
            raise UserError(f"{path} logged to the browser console: " + " | ".join(console))
        print(f"screenshot: {own.screenshot}", flush=True)
    return 0
