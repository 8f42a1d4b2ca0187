"""Block-sparse flash attention in plain XLA, for packed rows on backends without a fused kernel (CPU).

A packed row holds several examples; its mask is block-diagonal and causal, so most (query block,
key block) pairs of a long row hold nothing a query may see. This implementation lists the pairs
that may (from each block's segment and position range), and walks that list once: slot s of the
loop handles the s-th live pair of every row at once, so each slot is a handful of batched ops on
[B, block, ...] tiles that stay in cache. The backward pass is the flash-attention one (recompute the
probabilities from the saved log-sum-exp), written as the same walk, so nothing of size T x S is
ever built. Memory is linear in the row; compute follows the examples' own lengths.

Unlike the reference, padding (segment 0) attends to nothing here: its outputs are zeros (they are
never used, and the loss gives them no gradient), so a mostly-empty row costs almost nothing.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_NONE = jnp.iinfo(jnp.int32).max


def _blocks(x, block: int):
    """[B, T, ...] -> [B, T/block + 1, block, ...]: padded to whole blocks, plus one spare block that
    the loop's idle slots read from and write to. Padding is 0 (segment 0: padding)."""
    B, T = x.shape[:2]
    n = -(-T // block) + 1
    pad = [(0, 0), (0, n * block - T)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=0).reshape(B, n, block, *x.shape[2:])


def _lex_range(seg_BNC, pos_BNC):
    """Per block, the smallest and largest (segment, position) of its tokens in lexicographic order,
    padding (segment 0) left out; a block of padding only gets an empty range (lo > hi)."""
    real_BNC = seg_BNC != 0
    lo_seg = jnp.where(real_BNC, seg_BNC, _NONE).min(-1)
    hi_seg = jnp.where(real_BNC, seg_BNC, -1).max(-1)
    lo_pos = jnp.where(real_BNC & (seg_BNC == lo_seg[..., None]), pos_BNC, _NONE).min(-1)
    hi_pos = jnp.where(real_BNC & (seg_BNC == hi_seg[..., None]), pos_BNC, -_NONE).max(-1)
    return (lo_seg, lo_pos), (hi_seg, hi_pos)


def _lex_le(a, b):
    return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] <= b[1]))


def live_pairs(seg_q_BNC, pos_q_BNC, seg_kv_BMC, pos_kv_BMC, sliding_window: int | None):
    """Which (query block i, key block j) pairs may hold a visible key, listed per row in (i, j) order.

    A key is visible when its segment is the query's and its position is not after the query's, so
    (segment, position) of the key <= that of the query, lexicographically. A pair is live when the
    blocks' segment ranges overlap and the key block's smallest (segment, position) is <= the query
    block's largest: conservative (a live pair may still be fully masked), never missing a visible key.
    Returns (pair index i * M + j [B, P], live pairs per row [B]); a row's idle tail points at the
    spare blocks (N-1, M-1).
    """
    B, N, _ = seg_q_BNC.shape
    M = seg_kv_BMC.shape[1]
    (q_lo, q_hi), (kv_lo, kv_hi) = (_lex_range(seg_q_BNC, pos_q_BNC), _lex_range(seg_kv_BMC, pos_kv_BMC))
    live_BNM = (q_lo[0][:, :, None] <= kv_hi[0][:, None, :]) & (kv_lo[0][:, None, :] <= q_hi[0][:, :, None])
    live_BNM &= _lex_le((kv_lo[0][:, None, :], kv_lo[1][:, None, :]), (q_hi[0][:, :, None], q_hi[1][:, :, None]))
    if sliding_window is not None:
        # A visible key is within the window of its query: the key block's largest position must
        # exceed the query block's smallest position minus the window.
        live_BNM &= pos_kv_BMC.max(-1)[:, None, :] > pos_q_BNC.min(-1)[:, :, None] - sliding_window
    live_BNM = live_BNM.at[:, -1, :].set(False).at[:, :, -1].set(False)  # the spare blocks
    live_BP = live_BNM.reshape(B, N * M)
    # Live pairs first, each group in (i, j) order (a stable sort on "not live").
    order_BP = jnp.argsort(~live_BP, axis=1, stable=True).astype(jnp.int32)
    count_B = live_BP.sum(1, dtype=jnp.int32)
    spare = (N - 1) * M + (M - 1)
    pairs_BP = jnp.where(jnp.arange(N * M)[None, :] < count_B[:, None], order_BP, spare)
    return pairs_BP, count_B


def _take(x_BN, index_B):
    """Row b's block index_B[b]: [B, N, ...] -> [B, ...]."""
    return jax.vmap(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False))(x_BN, index_B)


def _put(x_BN, index_B, value_B):
    return jax.vmap(lambda x, i, v: jax.lax.dynamic_update_index_in_dim(x, v, i, 0))(x_BN, index_B, value_B)


def _add(x_BN, index_B, value_B):
    return _put(x_BN, index_B, _take(x_BN, index_B) + value_B)


def _mask(seg_q_BQ, pos_q_BQ, seg_kv_BC, pos_kv_BC, sliding_window):
    mask_BQC = (seg_q_BQ[:, :, None] == seg_kv_BC[:, None, :]) & (seg_q_BQ[:, :, None] != 0)
    mask_BQC &= pos_kv_BC[:, None, :] <= pos_q_BQ[:, :, None]
    if sliding_window is not None:
        mask_BQC &= pos_kv_BC[:, None, :] > pos_q_BQ[:, :, None] - sliding_window
    return mask_BQC


def _prepare(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window, block_q, block_kv):
    """Blocks in head-major layout, so every product of the loop is a plain batched matmul over
    (row, kv head): queries [B, N, K, G*Q, D] (the G query heads of a kv head stacked along the
    block's rows), keys and values [B, M, K, C, D]."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    bq, bk = min(block_q, T), min(block_kv, k_BSKD.shape[1])
    q_b = _query_layout(q_BTHD.reshape(B, T, K, H // K, D), bq)
    k_b, v_b = (jnp.swapaxes(_blocks(x, bk), 2, 3) for x in (k_BSKD, v_BSKD))
    seg_q, pos_q = _blocks(seg_q_BT, bq), _blocks(pos_q_BT, bq)
    seg_kv, pos_kv = _blocks(seg_kv_BS, bk), _blocks(pos_kv_BS, bk)
    pairs_BP, count_B = live_pairs(seg_q, pos_q, seg_kv, pos_kv, sliding_window)
    return q_b, k_b, v_b, (seg_q, pos_q, seg_kv, pos_kv), pairs_BP, count_B.max()


def _query_layout(x_BTKGD, block):
    """[B, T, K, G, D] -> [B, N, K, G*Q, D]."""
    x_BNQKGD = _blocks(x_BTKGD, block)
    B, N, Q, K, G, D = x_BNQKGD.shape
    return jnp.transpose(x_BNQKGD, (0, 1, 3, 4, 2, 5)).reshape(B, N, K, G * Q, D)


def _token_layout(x_BNKRD, T, G):
    """Inverse of `_query_layout`: [B, N, K, G*Q, D] -> [B, T, K*G, D]."""
    B, N, K, R, D = x_BNKRD.shape
    x_BNQKGD = jnp.transpose(x_BNKRD.reshape(B, N, K, G, R // G, D), (0, 1, 4, 2, 3, 5))
    return x_BNQKGD.reshape(B, N * (R // G), K * G, D)[:, :T]


def _slot_inputs(s, pairs_BP, M, G, q_b, k_b, v_b, ids, sliding_window):
    """Row b's s-th live pair: block indices, query/key/value tiles and the [B, 1, G*Q, C] mask."""
    pair_B = pairs_BP[:, s]
    i_B, j_B = pair_B // M, pair_B % M
    seg_q, pos_q, seg_kv, pos_kv = ids
    mask_BQC = _mask(_take(seg_q, i_B), _take(pos_q, i_B), _take(seg_kv, j_B), _take(pos_kv, j_B), sliding_window)
    mask = jnp.tile(mask_BQC, (1, G, 1))[:, None]
    return i_B, j_B, _take(q_b, i_B), _take(k_b, j_B), _take(v_b, j_B), mask


def _forward(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window, block_q, block_kv,
             softcap=None):
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    q_b, k_b, v_b, ids, pairs_BP, slots = _prepare(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT,
                                                   pos_kv_BS, sliding_window, block_q, block_kv)
    _, N, _, R, _ = q_b.shape
    M = k_b.shape[1]
    scale = D ** -0.5

    def slot(s, carry):
        m_BNKR, l_BNKR, acc_BNKRD = carry
        i_B, _, q_BKRD, k_BKCD, v_BKCD, mask = _slot_inputs(s, pairs_BP, M, G, q_b, k_b, v_b, ids, sliding_window)
        s_BKRC = jnp.einsum("bkrd,bkcd->bkrc", q_BKRD, k_BKCD, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s_BKRC = jnp.tanh(s_BKRC / softcap) * softcap
        s_BKRC = jnp.where(mask, s_BKRC, _MASKED)
        m_old = _take(m_BNKR, i_B)
        m_new = jnp.maximum(m_old, s_BKRC.max(-1))
        p_BKRC = jnp.where(mask, jnp.exp(s_BKRC - m_new[..., None]), 0.0)
        correction_BKR = jnp.exp(m_old - m_new)
        l_new = _take(l_BNKR, i_B) * correction_BKR + p_BKRC.sum(-1)
        pv_BKRD = jnp.einsum("bkrc,bkcd->bkrd", p_BKRC.astype(v_BKCD.dtype), v_BKCD,
                             preferred_element_type=jnp.float32)
        acc_new = _take(acc_BNKRD, i_B) * correction_BKR[..., None] + pv_BKRD
        return _put(m_BNKR, i_B, m_new), _put(l_BNKR, i_B, l_new), _put(acc_BNKRD, i_B, acc_new)

    init = (jnp.full((B, N, K, R), _MASKED, jnp.float32), jnp.zeros((B, N, K, R), jnp.float32),
            jnp.zeros((B, N, K, R, D), jnp.float32))
    m_BNKR, l_BNKR, acc_BNKRD = jax.lax.fori_loop(0, slots, slot, init)
    seen = l_BNKR > 0  # queries that see no key at all (block padding) give 0, not 0/0
    out_BNKRD = jnp.where(seen[..., None], acc_BNKRD / jnp.maximum(l_BNKR, 1e-30)[..., None], 0.0)
    lse_BNKR = jnp.where(seen, m_BNKR + jnp.log(jnp.maximum(l_BNKR, 1e-30)), 0.0)
    return _token_layout(out_BNKRD, T, G).astype(q_BTHD.dtype), lse_BNKR


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def blocksparse_attention(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS,
                          sliding_window: int | None = None, block_q: int = 128, block_kv: int = 128,
                          softcap: float | None = None):
    """Causal, segment-aware attention [B, T, H, D] (same contract as the reference `xla` impl); logits
    soft-capped to (-softcap, softcap) when given (Gemma 2)."""
    return _forward(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window,
                    block_q, block_kv, softcap)[0]


def _fwd(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, sliding_window, block_q, block_kv,
         softcap):
    out_BTHD, lse = _forward(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS,
                             sliding_window, block_q, block_kv, softcap)
    out_BTHD = checkpoint_name(out_BTHD, "attention_out")
    lse = checkpoint_name(lse, "attention_lse")
    return out_BTHD, (q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, out_BTHD, lse)


def _bwd(sliding_window, block_q, block_kv, softcap, residuals, dout_BTHD):
    q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT, pos_kv_BS, out_BTHD, lse_BNKR = residuals
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    q_b, k_b, v_b, ids, pairs_BP, slots = _prepare(q_BTHD, k_BSKD, v_BSKD, seg_q_BT, seg_kv_BS, pos_q_BT,
                                                   pos_kv_BS, sliding_window, block_q, block_kv)
    M, C = k_b.shape[1], k_b.shape[3]
    Q = q_b.shape[3] // G
    scale = D ** -0.5
    dout_BNKRD = _query_layout(dout_BTHD.reshape(B, T, K, G, D), Q)
    # delta = rowsum(dout * out), the softmax backward's correction term, per query.
    delta_BTKG = (dout_BTHD.astype(jnp.float32) * out_BTHD.astype(jnp.float32)).sum(-1).reshape(B, T, K, G, 1)
    delta_BNKR = _query_layout(delta_BTKG, Q)[..., 0]

    def slot(s, carry):
        dq_BNKRD, dk_BMKCD, dv_BMKCD = carry
        i_B, j_B, q_BKRD, k_BKCD, v_BKCD, mask = _slot_inputs(s, pairs_BP, M, G, q_b, k_b, v_b, ids,
                                                              sliding_window)
        do_BKRD = _take(dout_BNKRD, i_B)
        s_BKRC = jnp.einsum("bkrd,bkcd->bkrc", q_BKRD, k_BKCD, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            t_BKRC = jnp.tanh(s_BKRC / softcap)
            s_BKRC = t_BKRC * softcap
        p_BKRC = jnp.where(mask, jnp.exp(s_BKRC - _take(lse_BNKR, i_B)[..., None]), 0.0)
        dv_BKCD = jnp.einsum("bkrc,bkrd->bkcd", p_BKRC, do_BKRD, preferred_element_type=jnp.float32)
        dp_BKRC = jnp.einsum("bkrd,bkcd->bkrc", do_BKRD, v_BKCD, preferred_element_type=jnp.float32)
        ds_BKRC = p_BKRC * (dp_BKRC - _take(delta_BNKR, i_B)[..., None]) * scale
        if softcap is not None:  # d(cap * tanh(s / cap)) / ds = 1 - tanh^2
            ds_BKRC = ds_BKRC * (1 - t_BKRC * t_BKRC)
        dq_BKRD = jnp.einsum("bkrc,bkcd->bkrd", ds_BKRC, k_BKCD, preferred_element_type=jnp.float32)
        dk_BKCD = jnp.einsum("bkrc,bkrd->bkcd", ds_BKRC, q_BKRD, preferred_element_type=jnp.float32)
        return _add(dq_BNKRD, i_B, dq_BKRD), _add(dk_BMKCD, j_B, dk_BKCD), _add(dv_BMKCD, j_B, dv_BKCD)

    init = (jnp.zeros(q_b.shape, jnp.float32), jnp.zeros(k_b.shape, jnp.float32), jnp.zeros(v_b.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, slots, slot, init)
    dq_BTHD = _token_layout(dq, T, G).astype(q_BTHD.dtype)
    dk_BSKD, dv_BSKD = (jnp.swapaxes(x, 2, 3).reshape(B, M * C, K, D)[:, :S].astype(k_BSKD.dtype)
                        for x in (dk, dv))
    return dq_BTHD, dk_BSKD, dv_BSKD, None, None, None, None


blocksparse_attention.defvjp(_fwd, _bwd)
