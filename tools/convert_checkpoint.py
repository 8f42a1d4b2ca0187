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

from jaxsft.checkpoint import read_trained_params, trained_lora_scale
from jaxsft.config import ConfigError
from jaxsft.errors import UserError, report
from jaxsft.export import export_from_config
from jaxsft.model.hf import load_hf_config


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
        params, cfg = read_trained_params(args.checkpoint)
        if args.adapter and cfg.finetuning_type != "lora":
            raise ConfigError(f"--adapter needs a LoRA run; this checkpoint is finetuning_type: {cfg.finetuning_type}")
        cfg = dataclasses.replace(
            cfg, export_dir=args.export_dir, export_adapter=args.adapter,
            export_dtype=args.export_dtype or cfg.export_dtype or "float32",
            export_size=args.export_size if args.export_size is not None else cfg.export_size)
        scale = trained_lora_scale(cfg) if cfg.finetuning_type == "lora" else None
        out = export_from_config(params, cfg, load_hf_config(cfg.model_name_or_path), scale)
    except UserError as e:  # anything else is a bug and keeps its traceback
        return report(e)
    print(f"exported {'adapter' if args.adapter else 'model'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
