"""Compile a run's steps for a TPU slice from any host, without the TPU (`--compile_for v5p-8`).

With the TPU runtime wheel installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies`
describes the devices of a slice, and XLA compiles for them ahead of time (as MaxText's
train_compile.py does). The train state is built with `jax.eval_shape` from config.json alone (no
weights read), the batch is only shapes (rows x cutoff_len), and the run's own jitted train step,
eval step and generation (prefill + decode) are lowered and compiled for the slice on the config's
mesh. The report gives per-chip memory from the compiled programs, the chip's HBM, whether it fits,
and the model FLOPs per chip and step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxsft.config import Config
from jaxsft.errors import ConfigError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    topology_prefix: str  # what jax.experimental.topologies calls it
    cores_in_name: int  # Cloud TPU names count TensorCores for v4/v5p (2 per chip), chips for v5e/v6e
    chip_config: str  # megacore: one device per chip with both TensorCores
    hbm_gib: float  # per chip (Cloud TPU system architecture pages)
    dims: int  # torus dimensions


GENERATIONS = {
    "v4": Generation("v4", 2, "megacore", 32, 3),
    "v5p": Generation("v5p", 2, "megacore", 95, 3),
    "v5e": Generation("v5e", 1, "default", 16, 2),
    "v5litepod": Generation("v5e", 1, "default", 16, 2),
    "v6e": Generation("v6e", 1, "default", 32, 2),
}


# GPU hosts compiled deviceless through the jax-cuda12 plugin and an XLA target description
# (jaxsft/targets/<name>.txtpb): name -> HBM GiB per GPU.
GPUS = {"h100": 80}
MAX_GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    topology: str  # e.g. v5p:2x2x1; for GPUs 1x1xN (one host of N GPUs)
    chips: int
    generation: Generation | None  # None: a GPU host
    gpu: str | None = None

    @property
    def hbm_bytes(self) -> int:
        return int((GPUS[self.gpu] if self.gpu else self.generation.hbm_gib) * GIB)


def _grid(chips: int, dims: int) -> str:
    """Cloud TPU's slice shape for a power-of-two chip count: double the smallest side, sides sorted,
    a side of 1 last (v5e-8 -> 2x4, v5p-8 (4 chips) -> 2x2x1, v5p-64 (32 chips) -> 2x4x4)."""
    sides = [1] * dims
    while sides[0] * sides[1] * (sides[2] if dims == 3 else 1) < chips:
        i = min(range(dims), key=lambda d: (sides[d], d))
        sides[i] *= 2
    return "x".join(str(s) for s in sorted(sides, key=lambda s: (s == 1, s)))


def parse_target(name: str) -> Target:
    """`v5p-8`, `v4-16`, `v5e-16`, `v5litepod-4`, `v6e-8` (Cloud TPU names), or a topology such as
    `v5e:2x2` / `v5p:2x2x1`."""
    known = ", ".join(GENERATIONS)
    gpu = re.fullmatch(r"([a-z]\d+)-(\d+)", name.strip())
    if gpu and gpu.group(1) in GPUS:
        count = int(gpu.group(2))
        if not 1 <= count <= MAX_GPUS_PER_HOST:
            raise ConfigError(f"compile_for: {name!r}: one host of 1 to {MAX_GPUS_PER_HOST} GPUs, e.g. "
                              f"{gpu.group(1)}-8")
        return Target(name, f"1x1x{count}", count, None, gpu.group(1))
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](.+)", name.strip())
    if not m or m.group(1) not in GENERATIONS:
        raise ConfigError(f"compile_for: unknown TPU {name!r}; use a Cloud TPU name such as v5p-8, v5e-16, v6e-8, "
                          f"v4-8 or a topology such as v5e:2x2 (generations: {known}), or a GPU host such as "
                          f"h100-8")
    generation = GENERATIONS[m.group(1)]
    if ":" in name:
        sides = [int(s) for s in m.group(2).split("x") if s.isdigit()]
        if len(sides) != generation.dims or "x".join(map(str, sides)) != m.group(2):
            raise ConfigError(f"compile_for: topology {name!r} needs {generation.dims} sides, e.g. "
                              f"{generation.topology_prefix}:{_grid(4, generation.dims)}")
        chips = 1
        for s in sides:
            chips *= s
        return Target(name, f"{generation.topology_prefix}:{m.group(2)}", chips, generation)
    count = int(m.group(2)) if m.group(2).isdigit() else 0
    chips = count // generation.cores_in_name
    if chips < 1 or count % generation.cores_in_name or chips & (chips - 1):
        raise ConfigError(f"compile_for: {name!r} is not a slice size jaxsft can lay out (a power of two of "
                          f"chips); give the topology instead, e.g. {generation.topology_prefix}:"
                          f"{_grid(4, generation.dims)}")
    return Target(name, f"{generation.topology_prefix}:{_grid(chips, generation.dims)}", chips, generation)


def _gpu_devices(target: Target) -> list:
    """One host of GPUs, described from jaxsft/targets/<gpu>.txtpb (needs the jax-cuda12 plugin)."""
    from pathlib import Path

    config = (Path(__file__).parent / "targets" / f"{target.gpu}.txtpb").read_text()
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(platform="cuda", topology_name=target.topology,
                                                topology=target.topology, target_config=config)
    except Exception as e:  # no CUDA plugin
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"compile_for {target.name}: cannot describe {target.gpu.upper()} GPUs ({first}); install "
                          f"the CUDA plugin with: pip install -e \".[cuda-aot]\"") from None
    return list(topology.devices)


def target_devices(target: Target) -> list:
    """The slice's devices, described without the hardware (needs libtpu: the `tpu` extra)."""
    if target.gpu:
        return _gpu_devices(target)
    # Another process on the host (any JAX run without JAX_PLATFORMS=cpu) may hold libtpu's lock; a
    # topology description claims no chip, so share it. Keep libtpu's start-up warnings off stderr.
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(key, value)
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                chip_config_name=target.generation.chip_config)
    except Exception as e:  # no libtpu, or a topology it does not know
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"compile_for {target.name}: cannot describe TPU topology {target.topology} ({first}); "
                          f"install the TPU runtime with: pip install -e \".[tpu]\"") from None
    return list(topology.devices)


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    out = {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
    }
    # Donated state: outputs that reuse argument buffers are counted once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def _compile(name: str, jitted, *args, model_flops: float | None = None, **kwargs) -> dict[str, Any]:
    """Lower and compile; memory per chip, model FLOPs per chip (`model_flops`: 6N + attention per token,
    as the training log's MFU counts them) and XLA's own count (which counts a loop body once: with
    layers under scan it is far below the real work)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - start
    return {"step": name, "compile_seconds": round(seconds, 2), **_memory(compiled), "flops": model_flops,
            "xla_flops": _flops(compiled), "hlo": compiled.as_text()}


def _batch(mesh, shape: tuple[int, ...], leading_dims: int) -> dict[str, jax.ShapeDtypeStruct]:
    from jaxsft.sharding import batch_sharding

    sharding = batch_sharding(mesh, leading_dims)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
            for k in ("input_ids", "segment_ids", "positions", "targets")}


def compile_plan(cfg: Config, target: Target | str, devices: list | None = None) -> dict[str, Any]:
    """Compile the configured stages' steps for `target`; per-chip memory and FLOPs of each.
    `devices` overrides the slice's devices (tests pass CPU devices to compare)."""
    from jaxsft.evaluate import jit_eval_step
    from jaxsft.flops import train_flops_per_token
    from jaxsft.runtime import load_model
    from jaxsft.sharding import data_parallel_size, make_mesh
    from jaxsft.step import make_eval_step
    from jaxsft.train import build_train_step

    target = parse_target(target) if isinstance(target, str) else target
    devices = target_devices(target) if devices is None else devices
    mesh = make_mesh(cfg.mesh, devices)
    model = load_model(cfg, mesh, abstract=True)
    rows = cfg.per_device_train_batch_size * data_parallel_size(mesh)
    steps = []
    if cfg.do_train or not (cfg.do_eval or cfg.do_predict):
        total_steps = cfg.max_steps if cfg.max_steps > 0 else 1000  # only the schedule's values depend on it
        state, train_step = build_train_step(cfg, model, mesh, total_steps, abstract=True)
        batch = _batch(mesh, (cfg.gradient_accumulation_steps, rows, cfg.cutoff_len), 1)
        tokens_per_chip = cfg.gradient_accumulation_steps * rows * cfg.cutoff_len / len(devices)
        steps.append(_compile("train", train_step, state, model.frozen, batch,
                              model_flops=train_flops_per_token(model.config, cfg.cutoff_len) * tokens_per_chip))
    eval_rows = cfg.per_device_eval_batch_size * data_parallel_size(mesh)
    if cfg.do_eval:
        eval_step = jit_eval_step(make_eval_step(model.runner), model, mesh)
        forward_flops = train_flops_per_token(model.config, cfg.cutoff_len) / 3  # forward only
        steps.append(_compile("eval", eval_step, model.trainable, model.frozen,
                              _batch(mesh, (eval_rows, cfg.cutoff_len), 0),
                              model_flops=forward_flops * eval_rows * cfg.cutoff_len / len(devices)))
    if cfg.do_predict:
        steps.append(_compile_generation(cfg, model, mesh, eval_rows))
    return {"target": target.name, "topology": target.topology, "chips": len(devices),
            "device_kind": devices[0].device_kind, "hbm_bytes": target.hbm_bytes,
            "mesh": dict(mesh.shape), "attention_impl": model.runner.attention_impl,
            "loss_chunk_size": cfg.loss_chunk_size, "steps": steps}


def _compile_generation(cfg: Config, model, mesh, rows: int) -> dict[str, Any]:
    """`do_predict`'s program: prefill of a batch of prompts padded to bucket(cutoff_len), then the
    decode loop for bucket(max_new_tokens) tokens, on the merged params."""
    from jaxsft.generate import Sampling, _generate_jit, bucket
    from jaxsft.model.transformer import param_logical_axes
    from jaxsft.predict import generation_params
    from jaxsft.runtime import DTYPES, resolve_attention_impl
    from jaxsft.sharding import tree_shardings

    params = jax.eval_shape(lambda t, f: generation_params(dataclasses.replace(model, trainable=t, frozen=f)),
                            model.trainable, model.frozen)
    shardings = tree_shardings(params, param_logical_axes(params), mesh)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                                    shardings)
    prompt_len = bucket(cfg.cutoff_len)
    ints = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
    return _compile("predict", _generate_jit, params, ints, ints, ints, jax.ShapeDtypeStruct((rows,), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
                    jax.eval_shape(lambda: jax.random.key(0)), cfg=model.config,
                    sampling=Sampling(temperature=0.0), num_new=bucket(cfg.max_new_tokens), pad_id=0,
                    compute_dtype=DTYPES[cfg.compute_dtype],
                    attention_impl=resolve_attention_impl(cfg.attention_impl, decode=True, mesh=mesh),
                    stream=False)


def format_plan(plan: dict[str, Any]) -> str:
    """The report `--compile_for` prints: one line per compiled step, memory per chip."""
    hbm = plan["hbm_bytes"]
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [f"compile_for {plan['target']}: {plan['chips']} x {plan['device_kind']} (topology {plan['topology']}, "
             f"{hbm / GIB:.0f} GiB HBM per chip), mesh {mesh}, attention {plan['attention_impl']}, "
             f"loss_chunk_size {plan['loss_chunk_size']}",
             f"  {'step':<8}{'compile s':>10}{'argument':>10}{'output':>10}{'alias':>10}{'temp':>10}"
             f"{'total':>10}  {'fits':<5}{'TFLOP/chip':>11}  (GiB per chip)"]
    for s in plan["steps"]:
        fits = "yes" if s["total"] <= hbm else "NO"
        flops = f"{s['flops'] / 1e12:11.3f}" if s["flops"] is not None else f"{'n/a':>11}"
        lines.append(f"  {s['step']:<8}{s['compile_seconds']:>10.1f}"
                     + "".join(f"{s[k] / GIB:>10.3f}" for k in ("argument", "output", "alias", "temp", "total"))
                     + f"  {fits:<5}{flops}")
    worst = max((s["total"] for s in plan["steps"]), default=0)
    verdict = "fits" if worst <= hbm else f"does NOT fit: needs {worst / GIB:.2f} GiB of {hbm / GIB:.0f} GiB"
    lines.append(f"  per chip: {worst / GIB:.2f} GiB at most -> {verdict}")
    return "\n".join(lines)


def run_compile_for(cfg: Config) -> dict[str, Any]:
    """The `--compile_for` action: compile, print the report, return the plan."""
    plan = compile_plan(cfg, cfg.compile_for)
    print(format_plan(plan), flush=True)
    return plan
