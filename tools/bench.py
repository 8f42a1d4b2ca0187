"""Benchmark the real train step: compile once, run warm-up and timed steps, print ONE JSON line.

    python tools/bench.py --config cfg.yaml [--steps 10] [--warmup 2] [--peak_flops F] [--synthetic]
                          [--random_init [--layers N]] [--compile_only] [--profile DIR] [key=value ...]

The model comes from `model_name_or_path` (weights read from safetensors), or with `--random_init` from
its config.json alone (`init_params`, no weights needed: e.g. examples/configs/llama-3.2-1b; `--layers N`
changes its depth, e.g. to compare compile times). Batches
come from the real data pipeline (`build_datasets`, the configured dataset, packing as configured), or
with `--synthetic` from random fully packed rows of `cutoff_len` (needs no tokenizer). The step is the
loop's own (`jaxsft.train.build_train_step`: same shardings, donation, accumulation).

Reported: median step time over the timed steps (each step waited on), tokens/s over non-pad tokens
and over label tokens, MFU (train_flops_per_token x tokens / step time / (peak x devices); null when
the device's peak is unknown, e.g. CPU, unless --peak_flops), compile time, device memory peak
(`memory_stats()`, null where the backend has none), host peak RSS, and the config essentials.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jaxsft.config_load import load_config  # noqa: E402
from jaxsft.data.supervised import IGNORE_INDEX  # noqa: E402
from jaxsft.flops import peak_flops_per_device, train_flops_per_token  # noqa: E402
from jaxsft.model.hf import load_hf_config  # noqa: E402
from jaxsft.model.transformer import init_params  # noqa: E402
from jaxsft.runtime import DTYPES, build_mesh, load_model, load_tokenizer, rows_per_process  # noqa: E402
from jaxsft.sharding import global_batch  # noqa: E402
from jaxsft.train import build_train_step  # noqa: E402


def synthetic_rows(rows: int, seq_len: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows filled end to end with examples of random length (32 .. seq_len/2, the last one cut to fit);
    the first third of each example is prompt (no labels), as in SFT."""
    out = {k: np.zeros((rows, seq_len), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    out["targets"] = np.full((rows, seq_len), IGNORE_INDEX, np.int32)
    for r in range(rows):
        start, seg = 0, 1
        while start < seq_len:
            n = min(int(rng.integers(32, max(seq_len // 2, 33))), seq_len - start)
            ids = rng.integers(0, vocab, n, dtype=np.int32)
            sl = slice(start, start + n)
            out["input_ids"][r, sl] = ids
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            targets = np.full(n, IGNORE_INDEX, np.int32)
            targets[:-1] = ids[1:]
            targets[:n // 3] = IGNORE_INDEX
            out["targets"][r, sl] = targets
            start, seg = start + n, seg + 1
    return out


def make_batches(cfg, args, rows: int, count: int, vocab: int) -> list[dict[str, np.ndarray]]:
    """`count` host batches of [accumulation, rows, seq_len], made before timing starts."""
    accumulation = cfg.gradient_accumulation_steps
    if args.synthetic:
        rng = np.random.default_rng(cfg.seed)
        micro = [synthetic_rows(rows, cfg.cutoff_len, vocab, rng) for _ in range(count * accumulation)]
    else:
        from jaxsft.data.args import DataArgs
        from jaxsft.data.pipeline import build_datasets

        data = build_datasets(DataArgs.from_config(cfg), load_tokenizer(cfg), process_index=jax.process_index(),
                              process_count=jax.process_count())
        per_epoch = data.batches_per_epoch(rows)
        if per_epoch == 0:
            raise SystemExit(f"{len(data.train)} examples make no full batch of {rows} rows; lower the batch size")
        iterator = data.train_iterator(rows, seed=cfg.seed, num_epochs=-(-count * accumulation // per_epoch))
        micro = [next(iterator) for _ in range(count * accumulation)]
    return [{k: np.stack([m[k] for m in micro[i:i + accumulation]]) for k in micro[0]}
            for i in range(0, len(micro), accumulation)]


def with_layers(cfg, layers: int) -> str:
    """A temporary model dir: the config.json with `num_hidden_layers` replaced, tokenizer files linked."""
    import tempfile

    from jaxsft.model.hf import resolve_model_path

    source = resolve_model_path(cfg.model_name_or_path)
    target = Path(tempfile.mkdtemp(prefix="jaxsft-bench-"))
    hf = json.loads((source / "config.json").read_text())
    hf["num_hidden_layers"] = layers
    (target / "config.json").write_text(json.dumps(hf))
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            (target / f.name).symlink_to(f.absolute())
    return str(target)


def device_memory_peak() -> int | None:
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def host_rss_peak() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a jaxsft / LLaMA-Factory SFT YAML")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s per device, for MFU")
    parser.add_argument("--synthetic", action="store_true", help="random packed rows instead of the dataset")
    parser.add_argument("--random_init", action="store_true", help="random weights from config.json (init_params)")
    parser.add_argument("--profile", default=None, help="write a jax.profiler trace of the timed steps here")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --random_init: override num_hidden_layers of the model's config.json")
    parser.add_argument("--compile_only", action="store_true", help="stop after compiling (step fields null)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    defaults = ["do_train=false", "do_eval=false", "do_predict=false", "report_to=none"]
    cfg = load_config(args.config, defaults + overrides)
    if args.layers is not None:
        if not args.random_init:
            parser.error("--layers changes the model's shape, so it needs --random_init")
        cfg = load_config(args.config, defaults + overrides + [f"model_name_or_path={with_layers(cfg, args.layers)}"])

    mesh = build_mesh(cfg)
    model_cfg = load_hf_config(cfg.model_name_or_path)
    rows = rows_per_process(cfg, mesh, cfg.per_device_train_batch_size)
    batches = make_batches(cfg, args, rows, args.warmup + args.steps + 1, model_cfg.vocab_size)

    t0 = time.perf_counter()
    params = init_params(model_cfg, jax.random.key(cfg.seed), DTYPES[cfg.param_dtype]) if args.random_init else None
    model = load_model(cfg, mesh, params=params)
    total_steps = args.warmup + args.steps + 1
    state, train_step = build_train_step(cfg, model, mesh, total_steps)
    jax.block_until_ready(state)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    compiled = train_step.lower(state, model.frozen, global_batch(batches[0], mesh, leading_dims=1)).compile()
    compile_s = time.perf_counter() - t0

    def run(batch):
        nonlocal state
        t = time.perf_counter()
        state, metrics = compiled(state, model.frozen, global_batch(batch, mesh, leading_dims=1))
        jax.block_until_ready(metrics)
        return time.perf_counter() - t, metrics

    times, finite, first_step_s, timed = [], None, None, (batches[1 + args.warmup:] or batches[:1])
    if not args.compile_only:
        first_step_s, _ = run(batches[0])
        for batch in batches[1:1 + args.warmup]:
            run(batch)
        finite = True
        if args.profile:
            jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
        for batch in timed:
            seconds, metrics = run(batch)
            times.append(seconds)
            finite &= bool(metrics["finite"])
        if args.profile:
            jax.profiler.stop_trace()

    n_proc = jax.process_count()
    tokens = statistics.mean(float((b["segment_ids"] > 0).sum()) for b in timed) * n_proc
    label_tokens = statistics.mean(float((b["targets"] != IGNORE_INDEX).sum()) for b in timed) * n_proc
    capacity = float(np.prod(timed[0]["input_ids"].shape)) * n_proc
    step_time = statistics.median(times) if times else None
    flops_per_token = train_flops_per_token(model_cfg, timed[0]["input_ids"].shape[-1])  # the rows' real width
    peak = peak_flops_per_device(override=args.peak_flops)
    devices = jax.devices()
    mfu = tokens * flops_per_token / step_time / (peak * len(devices)) if peak and step_time else None

    def per_s(x: float, digits: int = 1) -> float | None:
        return round(x / step_time, digits) if step_time else None

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves((model.trainable, model.frozen)))
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model.trainable))
    result = {
        "step_time_s": round(step_time, 5) if step_time else None,
        "step_time_min_s": round(min(times), 5) if times else None,
        "step_time_max_s": round(max(times), 5) if times else None,
        "tokens_per_s": per_s(tokens),
        "label_tokens_per_s": per_s(label_tokens),
        "mfu": round(mfu, 5) if mfu is not None else None,
        "model_tflops_per_s_per_device": per_s(tokens * flops_per_token / len(devices) / 1e12, 6),
        "compile_s": round(compile_s, 3),
        "first_step_s": round(first_step_s, 4) if first_step_s is not None else None,
        "load_s": round(load_s, 3),
        "peak_device_memory_bytes": device_memory_peak(),
        "host_rss_bytes": host_rss_peak(),
        "tokens_per_step": tokens,
        "label_tokens_per_step": label_tokens,
        "fill": round(tokens / capacity, 4),
        "finite": finite,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": "synthetic" if args.synthetic else f"{cfg.dataset} (packing: {cfg.packing})",
        "weights": "random_init" if args.random_init else "checkpoint",
        "model": {"family": model_cfg.family,
                  "layers": model_cfg.num_layers, "hidden": model_cfg.hidden_size,
                  "intermediate": model_cfg.intermediate_size, "heads": model_cfg.num_heads,
                  "kv_heads": model_cfg.num_kv_heads, "head_dim": model_cfg.head_dim,
                  "vocab": model_cfg.vocab_size, "params": n_params, "trainable_params": n_trainable},
        "finetuning_type": cfg.finetuning_type,
        "lora_rank": cfg.lora_rank if cfg.finetuning_type == "lora" else None,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "global_batch_rows": rows * n_proc * cfg.gradient_accumulation_steps,
        "cutoff_len": cfg.cutoff_len,
        "compute_dtype": cfg.compute_dtype,
        "param_dtype": cfg.param_dtype,
        "remat_policy": cfg.remat_policy,
        "attention_impl": model.runner.attention_impl,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "backend": jax.default_backend(),
        "processes": n_proc,
        "jax_version": jax.__version__,
        "train_flops_per_token": flops_per_token,
        "peak_flops_per_device": peak,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
