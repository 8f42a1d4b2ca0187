"""LoRA variants as param-tree transforms: DoRA's magnitudes, PiSSA's initialisation and its conversion
to plain LoRA.

DoRA (PEFT's `use_dora`): each adapted module also learns a magnitude per output column,
`lora_magnitude [L, out]`, initialised to the column norms of W + s A B (of W, as B starts at 0); the
forward is `jaxsft.model.layers.dora_dense`.

PiSSA (PEFT's `init_lora_weights="pissa"` / `"pissa_niter_N"`): the adapters start as the top-r
singular triplets of each adapted kernel and the kernel keeps the residual, so the model is unchanged
at the start but training moves the principal directions. Converting (PEFT's
`path_initial_model_for_weight_conversion`) turns the trained pair (A, B) and the initial pair
(A0, B0) into a plain rank-2r LoRA adapter of the *original* weights: `[A | A0] @ [B ; -B0]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsft.model.layers import dora_column_norm
from jaxsft.params import LAYERS


def _adapted(params: dict) -> list[dict]:
    """Every per-layer module dict that holds adapters, in a fixed order."""
    found = []

    def walk(node: dict):
        for key in sorted(node):
            value = node[key]
            if isinstance(value, dict):
                if "lora_a" in value:
                    found.append(value)
                else:
                    walk(value)

    walk(params[LAYERS])
    return found


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _qr(x):
    return jnp.linalg.qr(x)[0]


def top_singular(w_LIO: jax.Array, rank: int, iters: int, rng: jax.Array):
    """(U [L, I, r], S [L, r], Vh [L, r, O]) of each layer's matrix: the exact SVD when `iters` is -1, else
    torch.svd_lowrank's randomized subspace iteration with `iters` power steps (what PEFT's
    `pissa_niter_N` calls), which is close to the exact triplets at a fraction of the cost."""
    w = w_LIO.astype(jnp.float32)
    if iters < 0:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    hi = jax.lax.Precision.HIGHEST
    wt = jnp.swapaxes(w, -1, -2)
    q = _qr(jnp.matmul(w, jax.random.normal(rng, (w.shape[0], w.shape[2], rank), jnp.float32), precision=hi))
    for _ in range(iters):
        q = _qr(jnp.matmul(w, _qr(jnp.matmul(wt, q, precision=hi)), precision=hi))
    u_small, s, vh = jnp.linalg.svd(jnp.matmul(jnp.swapaxes(q, -1, -2), w, precision=hi), full_matrices=False)
    return jnp.matmul(q, u_small, precision=hi), s, vh


def pissa_init(params: dict, scale: float, iters: int, rng: jax.Array) -> dict:
    """PEFT's PiSSA start for every adapted kernel W [L, in, out] (x @ W): with W ~ U S Vh over the top r
    triplets, A = U sqrt(S / scale), B = sqrt(S / scale) Vh, and the kernel becomes W - scale * A @ B
    (computed in fp32, stored in the kernel's dtype)."""
    out = _copy(params)
    for i, module in enumerate(_adapted(out)):
        kernel, rank = module["kernel"], module["lora_a"].shape[-1]
        w_LIO = jnp.asarray(kernel, jnp.float32)
        u_LIR, s_LR, vh_LRO = top_singular(w_LIO, rank, iters, jax.random.fold_in(rng, i))
        root_LR = jnp.sqrt(s_LR / scale)
        a_LIR = u_LIR * root_LR[:, None, :]
        b_LRO = root_LR[:, :, None] * vh_LRO
        module["lora_a"] = a_LIR.astype(module["lora_a"].dtype)
        module["lora_b"] = b_LRO.astype(module["lora_b"].dtype)
        delta_LIO = jnp.einsum("lir,lro->lio", jnp.asarray(module["lora_a"], jnp.float32),
                               jnp.asarray(module["lora_b"], jnp.float32), precision=jax.lax.Precision.HIGHEST)
        module["kernel"] = (w_LIO - scale * delta_LIO).astype(kernel.dtype)
    return out


def pissa_to_lora(trained: dict, initial: dict) -> dict:
    """The trained PiSSA adapters as a plain LoRA of the original weights, rank 2r at the same scale:
    A' = [A | A0], B' = [B ; -B0], since W_res + s A B = (W_res + s A0 B0) + s (A B - A0 B0). Only the
    adapters change; `initial` holds the adapters PiSSA started from (its other leaves are not read)."""
    out = _copy(trained)
    for module, start in zip(_adapted(out), _adapted(initial), strict=True):
        module["lora_a"] = jnp.concatenate([module["lora_a"], jnp.asarray(start["lora_a"], module["lora_a"].dtype)],
                                           axis=-1)
        module["lora_b"] = jnp.concatenate([module["lora_b"], -jnp.asarray(start["lora_b"], module["lora_b"].dtype)],
                                           axis=-2)
    return out


def add_dora_magnitudes(params: dict, scale: float) -> dict:
    """DoRA's start: every adapted module gets `lora_magnitude` = ||W + s A B|| per output column (fp32 math,
    stored in the adapters' dtype), so the model is unchanged."""
    out = _copy(params)
    for module in _adapted(out):
        norm_LO = jax.vmap(lambda w, a, b: dora_column_norm(w, a, b, scale))(
            module["kernel"], module["lora_a"], module["lora_b"])
        module["lora_magnitude"] = norm_LO.astype(module["lora_a"].dtype)
    return out


def pissa_init_weights(iters: int) -> str:
    """PEFT's `init_lora_weights` name of a PiSSA start with `iters` power steps."""
    return "pissa" if iters < 0 else f"pissa_niter_{iters}"
