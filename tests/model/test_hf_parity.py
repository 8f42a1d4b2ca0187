"""jaxsft logits equal PyTorch transformers logits for tiny random models of every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import LENGTH_DEPENDENT_ROPE, MOE_MODELS, TINY_MODELS, reset_rope, save_tiny_model

from jaxsft.model import hf, transformer

B, T = 4, 16


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def tiny(request, tmp_path_factory):
    name = request.param
    model, path = save_tiny_model(name, tmp_path_factory.mktemp(name))
    cfg = hf.load_hf_config(path)
    params = hf.load_hf_params(path, cfg)
    fwd = jax.jit(lambda p, ids, pos, seg: transformer.forward(p, cfg, ids, pos, seg))
    return name, model, cfg, params, fwd


def _torch_logits(model, ids_BT, mask_BT=None, pos_BT=None):
    reset_rope(model)
    kwargs = {}
    if mask_BT is not None:
        kwargs["attention_mask"] = torch.tensor(mask_BT)
    if pos_BT is not None:
        kwargs["position_ids"] = torch.tensor(pos_BT)
    with torch.no_grad():
        return model(torch.tensor(ids_BT), **kwargs).logits.numpy()


def _padded_batch(rng, lengths, left: bool):
    """ids, HF attention mask, jaxsft segment ids and positions for rows of the given lengths."""
    ids_BT = rng.integers(3, 256, (len(lengths), T))
    mask_BT = np.zeros((len(lengths), T), np.int64)
    for row, n in enumerate(lengths):
        if left:
            mask_BT[row, T - n :] = 1
        else:
            mask_BT[row, :n] = 1
    ids_BT = np.where(mask_BT == 1, ids_BT, 0)
    pos_BT = np.maximum(np.cumsum(mask_BT, axis=1) - 1, 0) * mask_BT
    return ids_BT, mask_BT, mask_BT.astype(np.int32), pos_BT.astype(np.int32)


def test_config_family(tiny):
    name, model, cfg, _, _ = tiny
    assert cfg.family == model.config.model_type
    assert cfg.tie_word_embeddings == bool(model.config.tie_word_embeddings)
    text = model.config.get_text_config()
    assert cfg.num_kv_heads == text.num_key_value_heads
    assert cfg.layer_types in (None, tuple(getattr(text, "layer_types", None) or ()))


def test_logits_match_unpadded(tiny):
    _, model, _, params, fwd = tiny
    ids_BT = np.random.default_rng(0).integers(0, 256, (B, T))
    pos_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    seg_BT = np.ones((B, T), np.int32)
    ours_BTV = np.asarray(fwd(params, ids_BT, pos_BT, seg_BT))
    ref_BTV = _torch_logits(model, ids_BT)
    assert np.abs(ref_BTV).max() > 1.0  # the logits are not degenerate
    np.testing.assert_array_less(np.abs(ours_BTV - ref_BTV).max(), 1e-4)


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_logits_match_padded(tiny, left):
    name, model, _, params, fwd = tiny
    lengths = [16, 11, 7, 3]
    ids_BT, mask_BT, seg_BT, pos_BT = _padded_batch(np.random.default_rng(1), lengths, left)
    ours_BTV = np.asarray(fwd(params, ids_BT, pos_BT, seg_BT))
    real = mask_BT == 1
    if name in LENGTH_DEPENDENT_ROPE:  # transformers' rope follows the batch's longest row: compare rows alone
        ref_BTV = np.zeros_like(ours_BTV)
        for row in range(len(lengths)):
            ref_BTV[row][real[row]] = _torch_logits(model, ids_BT[row][real[row]][None])[0]
    else:
        # HF builds arange positions; left padding needs them passed, as generate() does.
        ref_BTV = _torch_logits(model, ids_BT, mask_BT, pos_BT if left else None)
    assert np.isfinite(ours_BTV).all()  # pads included
    np.testing.assert_array_less(np.abs(ours_BTV[real] - ref_BTV[real]).max(), 1e-4)


def test_packed_row_equals_examples_alone(tiny):
    _, _, _, params, fwd = tiny
    rng = np.random.default_rng(2)
    # plus one pad at the end; 9 tokens pass the windows (6) and longrope/dynamic thresholds (8), 4 and 2 do not
    lengths = [9, 4, 2]
    examples = [rng.integers(3, 256, n) for n in lengths]
    ids_T = np.concatenate(examples + [np.zeros(1, np.int64)])
    seg_T = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(1)]).astype(np.int32)
    pos_T = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(1)]).astype(np.int32)
    packed_TV = np.asarray(fwd(params, ids_T[None], pos_T[None], seg_T[None]))[0]
    start = 0
    for ids in examples:
        n = len(ids)
        alone_TV = np.asarray(fwd(params, ids[None], np.arange(n, dtype=np.int32)[None], np.ones((1, n), np.int32)))[0]
        np.testing.assert_array_less(np.abs(packed_TV[start : start + n] - alone_TV).max(), 1e-5)
        start += n
    assert np.isfinite(packed_TV).all()


def test_bf16_compute_close_to_fp32(tiny):
    name, _, cfg, params, fwd = tiny
    ids_BT = np.random.default_rng(3).integers(0, 256, (2, T))
    pos_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    seg_BT = np.ones((2, T), np.int32)
    fp32_BTV = np.asarray(fwd(params, ids_BT, pos_BT, seg_BT))
    h_BTD = jax.jit(
        lambda p: transformer.hidden_states(p, cfg, ids_BT, pos_BT, seg_BT, compute_dtype=jnp.bfloat16)
    )(params)
    assert h_BTD.dtype == jnp.bfloat16
    bf16_BTV = np.asarray(transformer.lm_logits(params, cfg, h_BTD))
    assert np.isfinite(bf16_BTV).all()
    err = np.abs(bf16_BTV - fp32_BTV)
    scale = np.abs(fp32_BTV).max()
    if name not in MOE_MODELS:  # bf16 router logits may pick another expert for a near-tie: a jump, not noise
        assert err.max() < 0.1 * scale, (err.max(), scale)
    assert err.mean() < 0.02 * scale, (err.mean(), scale)
    # and the top-1 token mostly agrees
    assert (bf16_BTV.argmax(-1) == fp32_BTV.argmax(-1)).mean() > 0.8
