"""Export a jaxsft orbax checkpoint as a Hugging Face model (LoRA merged) or as a PEFT adapter.

    python tools/convert_checkpoint.py --checkpoint saves/run/checkpoint_100 --export_dir out
    python tools/convert_checkpoint.py --checkpoint saves/run --export_dir out_adapter --adapter

`--checkpoint` is a `checkpoint_<step>` directory or an `output_dir` (its latest checkpoint). The
checkpoint's resolved config gives the base model (its config.json, tokenizer) and LoRA settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxsft.checkpoint import Checkpoints, find_checkpoint
from jaxsft.config import FIELDS, Config, ConfigError
from jaxsft.export import export_from_config
from jaxsft.lora import adapter_scale, lora_scale, read_adapter_config
from jaxsft.model.hf import load_hf_config
from jaxsft.params import Partition, freeze_partition, merge


def _abstract(item_dir: Path):
    """Restore target from the saved metadata, on the host CPU (orbax restores flat dicts whose keys
    hold '/' wrongly without a target)."""
    tree = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)


def read_checkpoint(path: str | Path) -> tuple[dict, Config]:
    """(param tree with trainable and frozen parts merged back, the run's config)."""
    directory, step = find_checkpoint(path)
    checkpoints = Checkpoints(directory, async_save=False)
    step_dir = directory / f"checkpoint_{step}"
    try:
        restored = checkpoints.restore(step, _abstract(step_dir / "state"), _abstract(step_dir / "frozen"))
    finally:
        checkpoints.close()
    values = {k: v for k, v in restored["config"].items() if k in FIELDS}
    cfg = Config(**values)
    trainable, frozen = restored["state"]["trainable"], restored["frozen"]
    if cfg.finetuning_type == "freeze":
        num_layers = load_hf_config(cfg.model_name_or_path).num_layers
        partition = freeze_partition({**frozen, **trainable}, cfg, num_layers)
    else:  # full and LoRA: trainable and frozen hold whole leaves
        partition = Partition(trainable=frozenset(trainable))
    return merge(trainable, frozen, partition), cfg


def trained_lora_scale(cfg: Config) -> float:
    """The scale the run trained with: a resumed PEFT adapter keeps its own r/alpha, else the config's."""
    if cfg.adapter_name_or_path and not cfg.create_new_adapter:
        return adapter_scale(read_adapter_config(Path(cfg.adapter_name_or_path)))
    return lora_scale(cfg.lora_alpha, cfg.lora_rank, cfg.use_rslora)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint_<step> directory or output_dir")
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--adapter", action="store_true", help="write a PEFT adapter instead of merged weights")
    parser.add_argument("--export_dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: the checkpoint config's export_dtype")
    parser.add_argument("--export_size", type=float, default=None, help="shard size in GB (default: config's)")
    args = parser.parse_args(argv)
    try:
        params, cfg = read_checkpoint(args.checkpoint)
        if args.adapter and cfg.finetuning_type != "lora":
            raise ConfigError(f"--adapter needs a LoRA run; this checkpoint is finetuning_type: {cfg.finetuning_type}")
        cfg = dataclasses.replace(
            cfg, export_dir=args.export_dir, export_adapter=args.adapter,
            export_dtype=args.export_dtype or cfg.export_dtype or "float32",
            export_size=args.export_size if args.export_size is not None else cfg.export_size)
        scale = trained_lora_scale(cfg) if cfg.finetuning_type == "lora" else None
        out = export_from_config(params, cfg, load_hf_config(cfg.model_name_or_path), scale)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"exported {'adapter' if args.adapter else 'model'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
