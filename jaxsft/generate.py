"""KV-cache decoding over the model's param tree (greedy, or sampling with temperature/top-k/top-p).

The prompt batch is padded to a power-of-two length and the cache to prompt bucket + a power-of-two
number of new tokens, so prompts of new lengths reuse a compiled program. The cache keeps each
slot's segment id and position: padding and not-yet-written slots are segment 0 and masked, which
is why left- and right-padded prompts both work.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.model.config import ModelConfig
from jaxsft.model.transformer import embed, final_norm, lm_logits, run_layers


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample_tokens(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token per row [B] from fp32 logits."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < sampling.top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


# The streaming `generate` call in flight. Host callbacks run on runtime threads, so this is a module
# global (not thread-local): streaming calls must not run concurrently.
_stream_callbacks: list[Callable[[int, np.ndarray, np.ndarray], None]] = []


def _emit(step: np.ndarray, token_B: np.ndarray, done_B: np.ndarray) -> None:
    """Host side of `on_token`: forward one step's tokens to the running call's callback."""
    if _stream_callbacks:
        _stream_callbacks[-1](int(step), np.asarray(token_B), np.asarray(done_B))


class _InOrder:
    """Calls `on_token(row, token)` step by step, whatever order the (unordered) host callbacks arrive in.

    Ordered effects would keep the order but XLA refuses them on more than one device."""

    def __init__(self, on_token: Callable[[int, int], None]):
        self.on_token, self.next_step, self.pending = on_token, 0, {}
        self.lock = threading.Lock()

    def __call__(self, step: int, token_B: np.ndarray, done_B: np.ndarray) -> None:
        with self.lock:
            self.pending[step] = (token_B, done_B)
            while self.next_step in self.pending:
                token_B, done_B = self.pending.pop(self.next_step)
                for row in np.flatnonzero(~done_B):
                    self.on_token(int(row), int(token_B[row]))
                self.next_step += 1


def _run_layers(params, cfg, cache, ids_BT, seg_BT, pos_BT, index, compute_dtype, attention_impl):
    """Write tokens at cache slot `index` onward and return (final-normed h_BTD, new cache)."""
    seg_BS = jax.lax.dynamic_update_slice(cache["seg"], seg_BT, (0, index))
    pos_BS = jax.lax.dynamic_update_slice(cache["pos"], pos_BT, (0, index))
    x_BTD = embed(params, ids_BT, compute_dtype, cfg)
    x_BTD, (k_LBSKD, v_LBSKD) = run_layers(
        params, cfg, x_BTD, seg_BT, pos_BT, attention_impl=attention_impl,
        cache={"k": cache["k"], "v": cache["v"], "seg": seg_BS, "pos": pos_BS, "index": index})
    h_BTD = final_norm(params, cfg, x_BTD)
    return h_BTD, {"k": k_LBSKD, "v": v_LBSKD, "seg": seg_BS, "pos": pos_BS}


def _generate(params, ids_BP, seg_BP, pos_BP, last_B, max_new_tokens, stop_ids, rng, *, cfg, sampling,
              num_new, pad_id, compute_dtype, attention_impl, stream=False):
    B, P = ids_BP.shape
    S = P + num_new
    kv_shape = (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
    cache = {
        "k": jnp.zeros(kv_shape, compute_dtype),
        "v": jnp.zeros(kv_shape, compute_dtype),
        "seg": jnp.zeros((B, S), jnp.int32),
        "pos": jnp.zeros((B, S), jnp.int32),
    }
    h_BPD, cache = _run_layers(params, cfg, cache, ids_BP, seg_BP, pos_BP, 0, compute_dtype, attention_impl)
    h_B1D = jnp.take_along_axis(h_BPD, last_B[:, None, None], axis=1)
    next_pos_B = jnp.take_along_axis(pos_BP, last_B[:, None], axis=1)[:, 0] + 1

    def choose(h_B1D, rng, done_B, step):
        token_B = sample_tokens(lm_logits(params, cfg, h_B1D)[:, 0], rng, sampling)
        token_B = jnp.where(done_B, pad_id, token_B)
        if stream:  # rows already done before this step are skipped on the host
            jax.debug.callback(_emit, step, token_B, done_B)
        return token_B, done_B | jnp.isin(token_B, stop_ids)

    rng, step_rng = jax.random.split(rng)
    done_B = jnp.zeros((B,), bool)
    out_BN = jnp.full((B, num_new), pad_id, jnp.int32)
    token_B, done_B = choose(h_B1D, step_rng, done_B, jnp.int32(0))
    out_BN = out_BN.at[:, 0].set(token_B)

    def cond(state):
        step, _, _, done_B, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        step, cache, token_B, done_B, out_BN, rng = state
        seg_B1 = jnp.ones((B, 1), jnp.int32)
        pos_B1 = (next_pos_B + step - 1)[:, None]
        h_B1D, cache = _run_layers(
            params, cfg, cache, token_B[:, None], seg_B1, pos_B1, P + step - 1, compute_dtype, attention_impl
        )
        rng, step_rng = jax.random.split(rng)
        token_B, done_B = choose(h_B1D, step_rng, done_B, step)
        out_BN = jax.lax.dynamic_update_slice(out_BN, token_B[:, None], (0, step))
        return step + 1, cache, token_B, done_B, out_BN, rng

    state = (jnp.int32(1), cache, token_B, done_B, out_BN, rng)
    return jax.lax.while_loop(cond, body, state)[4]


_generate_jit = jax.jit(
    _generate,
    static_argnames=("cfg", "sampling", "num_new", "pad_id", "compute_dtype", "attention_impl", "stream"),
)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int, padding_side: str):
    """ids, segment ids, positions [B, length] and the index of each row's last prompt token."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B = len(prompts)
    ids_BP = np.full((B, length), pad_id, np.int32)
    seg_BP = np.zeros((B, length), np.int32)
    pos_BP = np.zeros((B, length), np.int32)
    last_B = np.zeros((B,), np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        start = length - n if padding_side == "left" else 0
        ids_BP[row, start : start + n] = prompt
        seg_BP[row, start : start + n] = 1
        pos_BP[row, start : start + n] = np.arange(n)
        last_B[row] = start + n - 1
    return ids_BP, seg_BP, pos_BP, last_B


def generate(
    params: dict,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_token_ids: Sequence[int] | None = None,
    rng: jax.Array | None = None,
    pad_id: int = 0,
    padding_side: str = "left",
    compute_dtype=jnp.float32,
    attention_impl: str = "xla",
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, ending with the stop token when one was produced.

    stop_token_ids defaults to the config's eos ids; pass () to always run max_new_tokens.
    `on_token(row, token)` is called on the host for every new token as it is produced (for
    streaming), in order; the compiled program is the same for every callback.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = tuple(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    prompt_len = bucket(max(len(p) for p in prompts))
    num_new = bucket(max_new_tokens)
    if cfg.max_position_embeddings and max(len(p) for p in prompts) + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length + max_new_tokens exceeds max_position_embeddings ({cfg.max_position_embeddings})"
        )
    ids_BP, seg_BP, pos_BP, last_B = pad_prompts(prompts, prompt_len, pad_id, padding_side)
    if on_token is not None:
        _stream_callbacks.append(_InOrder(on_token))
    try:
        out_BN = _run(ids_BP, seg_BP, pos_BP, last_B, params, cfg, max_new_tokens, stop, rng, sampling, num_new,
                      pad_id, compute_dtype, attention_impl, on_token is not None)
    finally:
        if on_token is not None:
            _stream_callbacks.pop()
    results = []
    for row in np.asarray(out_BN)[:, :max_new_tokens].tolist():
        hits = [i for i, t in enumerate(row) if t in stop]
        results.append(row[: hits[0] + 1] if hits else row)
    return results


def _run(ids_BP, seg_BP, pos_BP, last_B, params, cfg, max_new_tokens, stop, rng, sampling, num_new, pad_id,
         compute_dtype, attention_impl, stream):
    out_BN = _generate_jit(
        params,
        ids_BP,
        seg_BP,
        pos_BP,
        last_B,
        jnp.int32(max_new_tokens),
        jnp.asarray(stop if stop else (-1,), jnp.int32),  # -1 never matches a token
        jax.random.key(0) if rng is None else rng,
        cfg=cfg,
        sampling=sampling,
        num_new=num_new,
        pad_id=pad_id,
        compute_dtype=compute_dtype,
        attention_impl=attention_impl,
        stream=stream,
    )
    out_BN = np.asarray(out_BN)
    if stream:
        jax.effects_barrier()  # every callback has run before the caller sees the result
    return out_BN
