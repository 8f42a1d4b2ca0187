"""Causal, segment-aware attention behind one function, with a table of implementations.

A query token sees a key token when both belong to the same segment and the key's position is not
after the query's (and, with a sliding window, within the window). Segment 0 is padding: pads only
see pads, so no row is fully masked and nothing becomes NaN; their outputs are never used.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsft.model.blocksparse import blocksparse_attention
from jaxsft.sharding import BATCH_AXES, TENSOR_AXIS

# Finite, so a row that happens to be fully masked gives a finite average instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    seg_q_BT: jax.Array,
    seg_kv_BS: jax.Array,
    pos_q_BT: jax.Array,
    pos_kv_BS: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: True where query t may attend to key s."""
    mask_BTS = seg_q_BT[:, :, None] == seg_kv_BS[:, None, :]
    mask_BTS &= pos_kv_BS[:, None, :] <= pos_q_BT[:, :, None]
    if sliding_window is not None:
        mask_BTS &= pos_kv_BS[:, None, :] > pos_q_BT[:, :, None] - sliding_window
    return mask_BTS


def soft_cap(logits, softcap: float | None):
    """Gemma 2's attention-logit soft-capping: cap * tanh(logits / cap)."""
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def _xla_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, softcap=None):
    """Reference einsum attention. GQA by grouping query heads; K/V are never repeated."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    logits_BKGTS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    logits_BKGTS = soft_cap(logits_BKGTS, softcap)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKD.dtype)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD)
    return out_BTKGD.reshape(B, T, H, D)


def _xla_impl(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window, softcap=None):
    mask_BTS = attention_mask(seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window)
    return _xla_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, softcap)


def _chunked_impl(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window,
                  softcap=None, block: int = 512):
    """Memory-efficient XLA attention for long rows: query blocks, each streaming over key blocks with
    an online softmax (flash-attention style), rematerialized in the backward pass. Memory grows with
    T x block instead of T x S; the result equals the reference."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    bq, bk = min(block, T), min(block, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    # Pad with segment ids that match nothing (queries -1, keys -2).
    pad_t, pad_s = ((0, 0), (0, Tp - T)), ((0, 0), (0, Sp - S))
    q = jnp.pad(q_BTHD, pad_t + ((0, 0), (0, 0))).reshape(B, Tp // bq, bq, K, G, D)
    k = jnp.pad(k_BSKD, pad_s + ((0, 0), (0, 0))).reshape(B, Sp // bk, bk, K, D)
    v = jnp.pad(v_BSKD, pad_s + ((0, 0), (0, 0))).reshape(B, Sp // bk, bk, K, D)
    seg_q = jnp.pad(seg_q_BT, pad_t, constant_values=-1).reshape(B, Tp // bq, bq)
    seg_kv = jnp.pad(seg_kv_BS, pad_s, constant_values=-2).reshape(B, Sp // bk, bk)
    pos_q = jnp.pad(pos_q_BT, pad_t).reshape(B, Tp // bq, bq)
    pos_kv = jnp.pad(pos_kv_BS, pad_s).reshape(B, Sp // bk, bk)
    scale = D ** -0.5

    def query_block(args):
        q_BQKGD, seg_BQ, pos_BQ = args

        def key_block(carry, kv):
            m_BKGQ, l_BKGQ, acc_BQKGD = carry
            k_BCKD, v_BCKD, seg_BC, pos_BC = kv
            mask_BQC = attention_mask(seg_BQ, seg_BC, pos_BQ, pos_BC, sliding_window)

            def update(carry):
                m_BKGQ, l_BKGQ, acc_BQKGD = carry
                s_BKGQC = jnp.einsum("bqkgd,bckd->bkgqc", q_BQKGD, k_BCKD,
                                     preferred_element_type=jnp.float32) * scale
                s_BKGQC = soft_cap(s_BKGQC, softcap)
                s_BKGQC = jnp.where(mask_BQC[:, None, None], s_BKGQC, _MASKED)
                m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(-1))
                p_BKGQC = jnp.where(mask_BQC[:, None, None], jnp.exp(s_BKGQC - m_new[..., None]), 0.0)
                correction = jnp.exp(m_BKGQ - m_new)
                l_new = l_BKGQ * correction + p_BKGQC.sum(-1)
                pv_BQKGD = jnp.einsum("bkgqc,bckd->bqkgd", p_BKGQC.astype(v_BCKD.dtype), v_BCKD,
                                      preferred_element_type=jnp.float32)
                acc_new = acc_BQKGD * jnp.moveaxis(correction, 3, 1)[..., None] + pv_BQKGD
                return m_new, l_new, acc_new

            # Packed rows are block-diagonal and causal (and windowed): most key blocks hold nothing a
            # query block may see. Skip those (a real branch: rows run one at a time, see below).
            return jax.lax.cond(mask_BQC.any(), update, lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), _MASKED, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, bq, K, G, D), jnp.float32))
        kv_blocks = (jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(seg_kv, 1, 0),
                     jnp.moveaxis(pos_kv, 1, 0))
        (_, l_BKGQ, acc_BQKGD), _ = jax.lax.scan(jax.checkpoint(key_block), init, kv_blocks)
        l_BQKG = jnp.moveaxis(l_BKGQ, 3, 1)
        # Queries that see no key (padding) get 0, not 0/0.
        return jnp.where(l_BQKG[..., None] > 0, acc_BQKGD / jnp.maximum(l_BQKG, 1e-30)[..., None], 0.0)

    q_blocks = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(seg_q, 1, 0), jnp.moveaxis(pos_q, 1, 0))
    out = jax.lax.map(jax.checkpoint(query_block), q_blocks)  # [Tp/bq, B, bq, K, G, D]
    out = jnp.moveaxis(out, 0, 1).reshape(B, Tp, H, D)[:, :T]
    return out.astype(q_BTHD.dtype)


def packed_lengths_offsets(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout from segment ids (1, 2, ... contiguous, 0 = trailing padding):
    per-segment lengths [B, M] and start offsets [B, M + 1], unused entries -1."""
    B, T = segment_ids_BT.shape
    ids_M = jnp.arange(1, max_segments + 1, dtype=segment_ids_BT.dtype)
    lengths_BM = (segment_ids_BT[:, None, :] == ids_M[None, :, None]).sum(-1).astype(jnp.int32)
    starts_BM = jnp.cumsum(lengths_BM, axis=1) - lengths_BM
    present_BM = lengths_BM > 0
    lengths_BM = jnp.where(present_BM, lengths_BM, -1)
    offsets_BM = jnp.where(present_BM, starts_BM, -1)
    offsets_BM1 = jnp.concatenate([offsets_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return lengths_BM, offsets_BM1


def _cudnn_impl(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window):
    """cuDNN flash attention with the packed (THD) layout: segments as lengths and offsets, causal
    within each. Training-shaped only (queries are the keys); decoding uses the xla path."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    if q_BTHD.shape[1] != k_BSKD.shape[1]:
        raise ValueError("attention impl 'cudnn' runs training-shaped attention (T == S); decode with 'xla'")
    # A row of T tokens holds at most T // 2 examples of >= 2 tokens (shorter ones have no target).
    max_segments = max(1, q_BTHD.shape[1] // 2)
    lengths_BM, offsets_BM1 = packed_lengths_offsets(seg_q_BT, max_segments)
    return dot_product_attention(
        q_BTHD, k_BSKD, v_BSKD, q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1, scale=q_BTHD.shape[-1] ** -0.5, mask_type=MaskType.CAUSAL,
        sliding_window_length=sliding_window)


def _kernel_inputs(impl: str, q_BTHD, k_BSKD, v_BSKD, seg_BT, sliding_window, block: int = 128):
    """What the Pallas kernels (GPU flash, TPU splash) take: training-shaped attention, as many KV heads
    as query heads, lengths padded to their blocks with a segment id no real token has."""
    T = q_BTHD.shape[1]
    if k_BSKD.shape[1] != T:
        raise ValueError(f"attention impl '{impl}' runs training-shaped attention (T == S); decode with 'xla'")
    if sliding_window is not None and impl != "splash":
        raise ValueError(f"attention impl '{impl}' has no sliding window; use 'cudnn' or 'xla_blocksparse' for "
                         "models with sliding-window layers")
    groups = q_BTHD.shape[2] // k_BSKD.shape[2]
    pad = -T % block

    def padded(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))

    return (padded(q_BTHD), padded(jnp.repeat(k_BSKD, groups, axis=2)), padded(jnp.repeat(v_BSKD, groups, axis=2)),
            jnp.pad(seg_BT, ((0, 0), (0, pad)), constant_values=-1))


def _pallas_impl(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window,
                 interpret: bool = False):
    """Pallas (Triton) flash attention on GPU, which takes segment ids directly; causal by index, which
    equals causal by position inside packed segments. Training-shaped only; `interpret` runs it on CPU."""
    from jax.experimental.pallas.ops.gpu.attention import mha

    T, D = q_BTHD.shape[1], q_BTHD.shape[3]
    q, k, v, seg = _kernel_inputs("pallas", q_BTHD, k_BSKD, v_BSKD, seg_q_BT, sliding_window)
    return mha(q, k, v, seg, sm_scale=D ** -0.5, causal=True, interpret=interpret)[:, :T]


def _splash_impl(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window,
                 softcap=None, interpret: bool = False):
    """TPU splash attention: a causal (or causal sliding-window) mask plus `SegmentIds`, per example
    (vmapped over the batch), soft-capped logits when asked. Within a packed segment, index distance is
    position distance, so the index-based window is the position-based one. Training-shaped only;
    `interpret` runs it on CPU."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    T, H, D = q_BTHD.shape[1:]
    q, k, v, seg = _kernel_inputs("splash", q_BTHD * D ** -0.5,  # splash does not scale the logits
                                  k_BSKD, v_BSKD, seg_q_BT, sliding_window)
    q, k, v = (jnp.moveaxis(x, 2, 1) for x in (q, k, v))  # splash wants [heads, length, head_dim] per row
    Tp = q.shape[2]
    mask = (masks.CausalMask((Tp, Tp)) if sliding_window is None
            else masks.LocalMask((Tp, Tp), window_size=(sliding_window - 1, 0), offset=0))
    kernel = splash.make_splash_mha(masks.MultiHeadMask([mask] * H), head_shards=1, q_seq_shards=1,
                                    attn_logits_soft_cap=softcap, interpret=interpret)
    out_BHTD = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
        q, k, v, seg)
    return jnp.moveaxis(out_BHTD, 1, 2)[:, :T]


# name -> (platforms it runs on or None for any, fn(q, k, v, seg_q, seg_kv, pos_q, pos_kv, window)).
# Those in SOFTCAP_IMPLS also take `softcap=` (Gemma 2's attention-logit soft-capping).
# Each implementation builds what it needs: a mask (xla), lengths/offsets (cudnn), segment ids
# (pallas, splash).
ATTENTION_IMPLS: dict[str, tuple[tuple[str, ...] | None, Callable]] = {
    "xla": (None, _xla_impl),
    "xla_chunked": (None, _chunked_impl),
    "xla_blocksparse": (None, blocksparse_attention),
    "cudnn": (("gpu", "cuda"), _cudnn_impl),
    "pallas": (("gpu", "cuda"), _pallas_impl),
    "splash": (("tpu",), _splash_impl),
}
SOFTCAP_IMPLS = ("xla", "xla_chunked", "xla_blocksparse", "splash")
WINDOW_IMPLS = ("xla", "xla_chunked", "xla_blocksparse", "cudnn", "splash")


def model_rules_out(impl: str, sliding_window: bool, softcap: bool) -> str | None:
    """Why `impl` cannot run a model with sliding-window layers / attention soft-capping, or None."""
    if sliding_window and impl not in WINDOW_IMPLS:
        return f"it has no sliding window (this model has sliding-window layers; use one of {', '.join(WINDOW_IMPLS)})"
    if softcap and impl not in SOFTCAP_IMPLS:
        return (f"it has no logit soft-capping (this model sets attn_logit_softcapping; use one of "
                f"{', '.join(SOFTCAP_IMPLS)})")
    return None


# Custom calls XLA cannot partition ("Mosaic kernels cannot be automatically partitioned"): they run
# per shard under shard_map. The XLA paths are plain ops that the partitioner handles.
FUSED_KERNELS = ("cudnn", "pallas", "splash")
INTERPRETABLE = ("pallas", "splash")  # Pallas kernels that also run on CPU through Pallas' interpreter


def target_platform(mesh: Mesh | None) -> str:
    """The platform the computation is compiled for: the mesh's devices (which may be a TPU topology
    described on a CPU host), else JAX's default backend."""
    if mesh is None:
        return jax.default_backend()
    return mesh.devices.flat[0].platform


def _per_shard(fn: Callable, mesh: Mesh, q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS,
               sliding_window, **extra):
    """Run `fn` on each device's rows and heads: rows over the batch axes (data, fsdp), heads over
    `tensor` when both query and KV heads divide. An axis that does not divide is replicated
    (redundant work, same result)."""
    batch_axes = [a for a in BATCH_AXES if mesh.shape[a] > 1]
    while batch_axes and q_BTHD.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes.pop()
    rows = tuple(batch_axes) or None
    tensor = mesh.shape[TENSOR_AXIS]
    heads = TENSOR_AXIS if tensor > 1 and not (q_BTHD.shape[2] % tensor or k_BSKD.shape[2] % tensor) else None
    spec_x, spec_t = P(rows, None, heads, None), P(rows, None)
    run = jax.shard_map(lambda *a: fn(*a, sliding_window, **extra), mesh=mesh,
                        in_specs=(spec_x, spec_x, spec_x, spec_t, spec_t, spec_t, spec_t), out_specs=spec_x,
                        check_vma=False)
    return run(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS)


def attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    segment_ids_q_BT: jax.Array,
    segment_ids_kv_BS: jax.Array,
    *,
    impl: str = "xla",
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    mesh: Mesh | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention output [B, T, H, D]. H must be a multiple of K (GQA). Logits are scaled by `scale`
    (default D ** -0.5), then soft-capped to (-softcap, softcap) when given.

    Positions order tokens for the causal mask; they default to indices, with the T queries being
    the last T of the S keys. Decoding passes the cache's positions, so empty cache slots (segment
    0) are masked whatever their index.

    `mesh`: the mesh the arrays live on; fused kernels then run per shard under `shard_map`, and
    their platform check looks at its devices. `interpret` runs the Pallas kernels (pallas, splash)
    through Pallas' interpreter, on any platform (tests on CPU).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {', '.join(ATTENTION_IMPLS)}")
    platforms, fn = ATTENTION_IMPLS[impl]
    platform = target_platform(mesh)
    if interpret and impl in INTERPRETABLE:
        fn = functools.partial(fn, interpret=True)
    elif platforms is not None and platform not in platforms:
        raise ValueError(
            f"attention impl {impl!r} needs a {'/'.join(platforms)} backend, but the target devices are "
            f"{platform!r}; use impl='xla'"
        )
    H, K = q_BTHD.shape[2], k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({K})")
    B, T = segment_ids_q_BT.shape
    S = segment_ids_kv_BS.shape[1]
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))
    if kv_positions_BS is None:
        kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    D = q_BTHD.shape[-1]
    if scale is not None and scale != D ** -0.5:  # the kernels scale by D ** -0.5; fold the difference into q
        q_BTHD = (q_BTHD * (scale * D ** 0.5)).astype(q_BTHD.dtype)
    extra = {}
    if softcap is not None:
        if impl not in SOFTCAP_IMPLS:
            raise ValueError(f"attention impl {impl!r} has no logit soft-capping (this model's "
                             f"attn_logit_softcapping); use one of {', '.join(SOFTCAP_IMPLS)}")
        extra["softcap"] = softcap
    args = (q_BTHD, k_BSKD, v_BSKD, segment_ids_q_BT, segment_ids_kv_BS, q_positions_BT, kv_positions_BS)
    if impl in FUSED_KERNELS and mesh is not None and mesh.size > 1:
        return _per_shard(fn, mesh, *args, sliding_window, **extra)
    return fn(*args, sliding_window, **extra)
