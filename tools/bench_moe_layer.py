"""One MoE layer's forward + backward on a simulated CPU mesh: GSPMD over the global batch (moe_mlp
without a mesh, as before the `expert` axis) against the per-shard path (moe_mlp with the mesh). Prints
the collectives in the compiled program and the step time; both must give the same value and gradient.

    python tools/bench_moe_layer.py '{"fsdp": 2, "expert": 4}'
"""

import json
import os
import re
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxsft.model import moe  # noqa: E402
from jaxsft.model.config import ModelConfig  # noqa: E402
from jaxsft.sharding import BATCH_AXES, logical_spec, make_mesh  # noqa: E402

E, K, D, F, B, T = 16, 2, 256, 512, 16, 128
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def main(mesh_cfg: dict) -> None:
    cfg = ModelConfig.from_hf(dict(
        model_type="qwen3_moe", vocab_size=256, hidden_size=D, intermediate_size=F, moe_intermediate_size=F,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=E,
        num_experts_per_tok=K, norm_topk_prob=True, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=512))
    mesh = make_mesh(mesh_cfg)
    r = np.random.default_rng(0)
    mlp = {"gate": {"kernel": r.normal(size=(D, E)).astype(np.float32)},
           "experts": {n: {"kernel": (0.05 * r.normal(size=(E, F, D) if n == "down_proj" else (E, D, F)))
                           .astype(np.float32)} for n in ("gate_proj", "up_proj", "down_proj")}}
    axes = {"gate": {"kernel": ("embed", None)},
            "experts": {"gate_proj": {"kernel": ("expert", "embed", "mlp")},
                        "up_proj": {"kernel": ("expert", "embed", "mlp")},
                        "down_proj": {"kernel": ("expert", "mlp", "embed")}}}
    shard = jax.tree.map(lambda x, a: NamedSharding(mesh, logical_spec(a, x.shape, mesh)), mlp, axes,
                         is_leaf=lambda x: isinstance(x, tuple))
    rows = NamedSharding(mesh, P(BATCH_AXES))
    args = (jax.device_put(mlp, shard), jax.device_put(r.normal(size=(B, T, D)).astype(np.float32), rows),
            jax.device_put(np.ones((B, T), bool), rows))
    results = {}
    for name, layer_mesh in (("gspmd", None), ("per_shard", mesh)):
        def loss(p, h, valid, layer_mesh=layer_mesh):
            out, stats = moe.moe_mlp(h, p, cfg, valid, jax.nn.silu, None, mesh=layer_mesh)
            return (out ** 2).sum() + stats["expert_prob"].sum()

        step = jax.jit(jax.value_and_grad(loss), in_shardings=(shard, rows, rows), out_shardings=(None, shard))
        hlo = step.lower(*args).compile().as_text()
        counts = {op: sum(bool(re.search(rf"= \S+ {op}(-start)?\(", line)) for line in hlo.splitlines())
                  for op in COLLECTIVES}
        jax.block_until_ready(step(*args))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            value, grads = jax.block_until_ready(step(*args))
            times.append(time.perf_counter() - t)
        results[name] = (value, grads)
        print(json.dumps({"mesh": mesh_cfg, "impl": name, "step_s_min": round(min(times), 3), **counts}))
    (v0, g0), (v1, g1) = results.values()
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
               zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    print(json.dumps({"value_rel_diff": float(abs(v0 - v1) / abs(v0)), "grad_max_abs_diff": diff}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
