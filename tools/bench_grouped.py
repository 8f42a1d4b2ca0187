"""Grouped matmul of the MoE experts on this backend: XLA's `ragged_dot` against jaxsft's blocked one.

    python tools/bench_grouped.py [--rows 32768 --groups 128 --k 2048 --n 768 --dtype bfloat16 --steps 5]

Forward + backward (gradients of x and w) of rows sorted into uneven groups, best of `--steps`; one JSON line
with both times and the ratio. The defaults are one Qwen3-30B-A3B projection (8 of 128 experts for 4096
tokens). `jaxsft.model.moe.grouped_matmul_for` picks ragged_dot on TPU only; a GPU run of this tool says
whether XLA's ragged_dot (cuDNN's grouped kernel, or its dense expansion) should be used there too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxsft.model.grouped import grouped_matmul  # noqa: E402


def best_time(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    sizes = rng.multinomial(a.rows, rng.dirichlet(np.ones(a.groups))).astype(np.int32)  # uneven, as routing is
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (a.rows, a.k), a.dtype)
    w = (jax.random.normal(kw, (a.groups, a.k, a.n)) * 0.02).astype(a.dtype)
    gs = jnp.asarray(sizes)

    def fwd_bwd(matmul):
        return jax.jit(jax.grad(lambda x, w: matmul(x, w, gs).astype(jnp.float32).sum(), argnums=(0, 1)))

    ragged = best_time(fwd_bwd(jax.lax.ragged_dot), x, w, steps=a.steps)
    blocked = best_time(fwd_bwd(grouped_matmul), x, w, steps=a.steps)
    print(json.dumps({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "rows": a.rows,
                      "groups": a.groups, "k": a.k, "n": a.n, "dtype": a.dtype, "ragged_dot_s": round(ragged, 5),
                      "grouped_matmul_s": round(blocked, 5), "ragged_over_grouped": round(ragged / blocked, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
