"""The `jaxsft` subcommands that run no stage: `version`, `env`, `chat` and `inspect`.

Each takes the arguments after its name and returns the exit status; a `UserError` becomes the one-line
`error:` in `jaxsft.main`.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
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
    """`jaxsft inspect cfg.yaml [key=value ...]`: the first training (else evaluation) examples as the model
    will see them, the learned part decoded, then the preprocessing counts."""
    from jaxsft.config import load_config
    from jaxsft.main import parse_args

    args = parse_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    if cfg.model_name_or_path is None or cfg.template is None:
        from jaxsft.errors import ConfigError
        raise ConfigError("inspect needs model_name_or_path (for the tokenizer) and template")
    from jaxsft.data.args import DataArgs
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.runtime import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    data = build_datasets(DataArgs.from_config(cfg), tokenizer, train=bool(cfg.dataset))
    for split, examples in (("train", data.train), ("eval", data.eval)):
        for k, (ids, labels) in enumerate((examples or [])[:2]):
            learned = [int(t) for t in labels if t != -100]
            print(f"===== {split} example {k}: {len(ids)} tokens, {len(learned)} learned")
            print(tokenizer.decode(ids, skip_special_tokens=False))
            print("--- learned:")
            print(tokenizer.decode(learned, skip_special_tokens=False))
    print("===== counts")
    for key, value in data.stats.items():
        print(f"{key}: {value}")
    sys.stdout.flush()
    return 0
