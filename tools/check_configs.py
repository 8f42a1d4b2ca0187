"""Compile every shipped config for the TPU slice it names (its `compile_for` key), without a TPU.

    python tools/check_configs.py                      # configs/ and examples/configs/
    python tools/check_configs.py cfg.yaml loss_chunk_size=0 --json plans.jsonl

A config that names no slice (the CPU quickstarts) is compiled for DEFAULT_TARGET and says so. Prints
each plan (tools-free: the same report as `--compile_for`) and a summary line per config; exits 1 if
any config fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = "v5e-4"


def shipped_configs() -> list[Path]:
    return sorted(p for d in ("configs", "examples/configs") for p in (ROOT / d).rglob("*.yaml"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help="YAML files (default: every shipped config), and key=value "
                                                "overrides applied to each")
    parser.add_argument("--json", type=Path, help="append one JSON line per plan here")
    args = parser.parse_args(argv)
    args.overrides = [a for a in args.args if "=" in a]
    args.configs = [Path(a).resolve() for a in args.args if "=" not in a]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.chdir(ROOT)  # shipped configs name paths relative to the checkout
    from jaxsft.aot import GIB, compile_plan, format_plan
    from jaxsft.config_load import load_config
    from jaxsft.errors import UserError

    failed = 0
    summary = []
    for path in args.configs or shipped_configs():
        try:
            cfg = load_config(str(path), list(args.overrides or []))
        except UserError as e:  # e.g. tools/bench.py's configs, which leave keys to the bench
            summary.append(f"skip {path}: not a run config: {e}")
            continue
        target = cfg.compile_for or DEFAULT_TARGET
        named = "" if cfg.compile_for else f" (names no TPU slice: a CPU/GPU config; checked on {DEFAULT_TARGET})"
        start = time.perf_counter()
        try:
            plan = compile_plan(cfg, target)
        except UserError as e:
            failed += 1
            summary.append(f"FAIL {path}: {target}: {e}")
            continue
        seconds = time.perf_counter() - start
        print(f"== {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}{named}\n{format_plan(plan)}", flush=True)
        worst = max(s["total"] for s in plan["steps"])
        fits = worst <= plan["hbm_bytes"]
        failed += not fits
        summary.append(f"{'ok  ' if fits else 'FAIL'} {path}: {target}, {worst / GIB:.2f} GiB per chip of "
                       f"{plan['hbm_bytes'] / GIB:.0f}, {seconds:.0f} s{named}")
        if args.json:
            record = {"config": str(path), "overrides": args.overrides, "wall_seconds": round(seconds, 1),
                      **{k: v for k, v in plan.items() if k != "steps"},
                      "steps": [{k: v for k, v in s.items() if k != "hlo"} for s in plan["steps"]]}
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
