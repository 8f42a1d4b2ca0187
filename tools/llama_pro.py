"""LLaMA Pro block expansion, as LLaMA-Factory's scripts/llama_pro.py does it: after every
num_layers / num_expand layers, insert a copy of the layer before with its output projections
(o_proj, down_proj) zeroed, so the expanded model computes exactly what the original computes. Train
it with `finetuning_type: freeze`, `use_llama_pro: true`, `freeze_trainable_layers: <num_expand>`:
only the inserted blocks learn.

    python tools/llama_pro.py --model_name_or_path models/llama3-8b --output_dir models/llama3-8b-pro --num_expand 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsft.errors import ConfigError, UserError, report  # noqa: E402
from jaxsft.export import export_hf  # noqa: E402
from jaxsft.model.config import ModelConfig  # noqa: E402
from jaxsft.model.hf import load_hf_config, load_hf_params, resolve_model_path  # noqa: E402

ZEROED = ("o_proj", "down_proj")  # the projections back into the residual stream


def expand_layers(params: dict, num_layers: int, num_expand: int) -> tuple[dict, list[int]]:
    """(params with num_layers + num_expand stacked layers, indices of the inserted ones)."""
    if num_expand <= 0 or num_layers % num_expand:
        raise ConfigError(f"num_expand must divide the model's {num_layers} layers, got {num_expand}")
    split = num_layers // num_expand
    source, inserted = [], []
    for i in range(num_layers):
        source.append(i)
        if (i + 1) % split == 0:
            inserted.append(len(source))
            source.append(i)
    order = np.asarray(source)

    def expand(path, leaf):
        names = [k.key for k in path]
        if names[0] != "layers":
            return leaf
        value = np.asarray(leaf)[order]
        if any(n in ZEROED for n in names):
            value[inserted] = 0
        return value

    return jax.tree_util.tree_map_with_path(expand, params), inserted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_expand", type=int, default=8)
    parser.add_argument("--export_dtype", default=None, help="float32 or bfloat16 (default: the model's)")
    args = parser.parse_args(argv)
    try:
        source = resolve_model_path(args.model_name_or_path)
        hf_config = json.loads((source / "config.json").read_text())
        if "layer_types" in hf_config or "sliding_window_pattern" in hf_config:
            raise ConfigError("llama_pro: models with per-layer patterns (layer_types) are not supported")
        model_cfg = load_hf_config(source)
        params = load_hf_params(source, model_cfg)
        expanded, inserted = expand_layers(params, model_cfg.num_layers, args.num_expand)
        total = model_cfg.num_layers + args.num_expand
        hf_config["num_hidden_layers"] = total
        new_cfg = ModelConfig.from_hf(hf_config)
        dtype = args.export_dtype or str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
        out = export_hf(expanded, new_cfg, source, args.output_dir, dtype=dtype)
        written = json.loads((out / "config.json").read_text())
        written["num_hidden_layers"] = total
        (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    except UserError as e:  # anything else is a bug and keeps its traceback
        return report(e)
    print(f"expanded {model_cfg.num_layers} -> {total} layers (inserted: {inserted}) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
