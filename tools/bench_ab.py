"""A/B the train step: several config variants compiled in ONE process, their steps interleaved.

    python tools/bench_ab.py --config cfg.yaml [--steps 6] [--rounds 3] VARIANT [VARIANT ...]

A VARIANT is a comma-separated list of key=value overrides ('' or 'base' = the config as is), e.g.
    python tools/bench_ab.py --config saves/compare/final3/jaxsft.yaml base remat_policy=full \\
        remat_policy=none,attention_impl=xla

On a shared machine, separate runs of tools/bench.py move by +-10% with the other users' load; here each
round runs `--steps` steps of every variant in turn, so load changes hit all variants alike. Prints one
JSON line per variant: median and min step time over all rounds, and the ratio to the first variant.
Same data as tools/bench.py (the config's dataset, or --synthetic rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: data and repo path)

from jaxsft.config_load import load_config  # noqa: E402
from jaxsft.model.hf import load_hf_config  # noqa: E402
from jaxsft.runtime import build_mesh, load_model, rows_per_process  # noqa: E402
from jaxsft.sharding import global_batch  # noqa: E402
from jaxsft.train import build_train_step  # noqa: E402


def compiled_variant(config: str, overrides: list[str], args) -> dict:
    cfg = load_config(config, ["do_train=false", "do_eval=false", "do_predict=false", "report_to=none"] + overrides)
    mesh = build_mesh(cfg)
    rows = rows_per_process(cfg, mesh, cfg.per_device_train_batch_size)
    batches = bench.make_batches(cfg, args, rows, args.steps, load_hf_config(cfg.model_name_or_path).vocab_size)
    model = load_model(cfg, mesh)
    state, train_step = build_train_step(cfg, model, mesh, total_steps=1000)
    device_batches = [global_batch(b, mesh, leading_dims=1) for b in batches]
    step = train_step.lower(state, model.frozen, device_batches[0]).compile()
    state, metrics = step(state, model.frozen, device_batches[0])  # warm-up
    jax.block_until_ready(metrics)
    return {"name": ",".join(overrides) or "base", "step": step, "state": state, "frozen": model.frozen,
            "batches": device_batches, "times": []}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=6, help="steps of each variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="random packed rows instead of the dataset")
    parser.add_argument("variants", nargs="+", help="comma-separated key=value overrides; 'base' for none")
    args = parser.parse_args(argv)
    variants = [compiled_variant(args.config, [] if v in ("", "base") else v.split(","), args)
                for v in args.variants]
    for _ in range(args.rounds):
        for v in variants:
            for batch in v["batches"]:
                t = time.perf_counter()
                v["state"], metrics = v["step"](v["state"], v["frozen"], batch)
                jax.block_until_ready(metrics)
                v["times"].append(time.perf_counter() - t)
    results = []
    first = statistics.median(variants[0]["times"])
    for v in variants:
        median = statistics.median(v["times"])
        results.append({"variant": v["name"], "step_time_median_s": round(median, 4),
                        "step_time_min_s": round(min(v["times"]), 4), "steps": len(v["times"]),
                        "vs_first": round(median / first, 3)})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
