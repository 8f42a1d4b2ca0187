"""Fused attention kernels against the XLA reference (forward and gradients), where they can run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import packed_rows, qkv

from jaxsft.model.attention import attention, packed_lengths_offsets
from jaxsft.model.config import ModelConfig
from jaxsft.model.transformer import forward, init_params
from jaxsft.runtime import resolve_attention_impl
from jaxsft.sharding import batch_sharding, make_mesh


def test_packed_lengths_offsets_from_segment_ids():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    lengths, offsets = packed_lengths_offsets(seg, max_segments=4)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])


def test_auto_is_xla_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    assert resolve_attention_impl("auto", mesh=make_mesh({"fsdp": -1})) == "xla"
    assert resolve_attention_impl("auto") == "xla"
    assert resolve_attention_impl("auto", seq_len=64) == "xla"
    assert resolve_attention_impl("auto", seq_len=128) == "xla_blocksparse"
    assert resolve_attention_impl("auto", seq_len=1024) == "xla_blocksparse"
    assert resolve_attention_impl("cudnn", decode=True) == "xla"


def test_impls_that_cannot_run_the_model_are_refused_by_name():
    """A model's sliding windows and soft-caps rule kernels out: named at load time, not a trace error."""
    import transformers

    from jaxsft.config import ConfigError
    from jaxsft.model.config import ModelConfig

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, sliding_window=8)
    gemma2 = ModelConfig.from_hf(transformers.Gemma2Config(**small).to_dict())
    with pytest.raises(ConfigError, match="pallas cannot run this gemma2 model: it has no sliding window"):
        resolve_attention_impl("pallas", model=gemma2)
    with pytest.raises(ConfigError, match="cudnn cannot run this gemma2 model: it has no logit soft-capping"):
        resolve_attention_impl("cudnn", model=gemma2)
    gemma3 = ModelConfig.from_hf(transformers.Gemma3TextConfig(**small).to_dict())
    assert resolve_attention_impl("cudnn", model=gemma3) == "cudnn"  # windows only: cuDNN takes them
    assert resolve_attention_impl("splash", model=gemma2) == "splash"


def test_cudnn_refused_off_gpu():
    if jax.default_backend() in ("gpu", "cuda"):
        pytest.skip("runs where there is no GPU")
    q = jnp.ones((1, 8, 2, 16))
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="attention impl 'cudnn' needs a gpu/cuda backend, but the target "
                                         "devices are 'cpu'"):
        attention(q, q, q, seg, seg, impl="cudnn", mesh=make_mesh({"fsdp": -1}))


def _packed_case(dtype):
    """Two rows of 256 tokens: three examples then padding, and two examples; 8 query / 2 KV heads."""
    seg, pos = packed_rows([(100, 60, 80), (200, 40)], 256)
    q, k, v = qkv(2, 256, 8, 2, 64, dtype, np.random.default_rng(0))
    return q, k, v, seg, pos


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"),
                    reason="cuDNN and Pallas GPU attention need an NVIDIA GPU backend (run when a GPU is lent)")
@pytest.mark.parametrize("impl, window", [("cudnn", None), ("pallas", None), ("cudnn", 50)])
def test_gpu_kernel_matches_xla_forward_and_grad(impl, window):
    q, k, v, seg, pos = _packed_case(jnp.bfloat16)
    valid = (seg > 0)[..., None, None]

    def loss(impl):
        def fn(q, k, v):
            out = attention(q, k, v, seg, seg, impl=impl, q_positions_BT=pos, kv_positions_BS=pos,
                            sliding_window=window)
            return jnp.where(valid, out, 0).astype(jnp.float32).sum(), out
        return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out_ref), grads_ref = loss("xla")
    (_, out), grads = loss(impl)
    mask = np.asarray(valid[..., 0, 0])
    np.testing.assert_allclose(np.asarray(out, np.float32)[mask], np.asarray(out_ref, np.float32)[mask],
                               atol=2e-2, rtol=2e-2)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g, np.float32)[mask], np.asarray(g_ref, np.float32)[mask],
                                   atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("impl, window, block, softcap", [("_chunked_impl", None, 64, None),
                                                         ("_chunked_impl", 50, 100, 2.0)])
def test_chunked_xla_matches_reference_forward_and_grad(impl, window, block, softcap):
    """The memory-efficient path equals the reference, with packing, padding rows and blocks that do not
    divide the length, a sliding window and Gemma 2's logit soft-capping."""
    import jaxsft.model.attention as attn

    q, k, v, seg, pos = _packed_case(jnp.float32)
    valid = (seg > 0)[..., None, None]

    def run(fn):
        def loss(q, k, v):
            out = fn(q, k, v, seg, seg, pos, pos, window, softcap=softcap)
            return jnp.where(valid, out, 0).sum() + 0.5 * jnp.where(valid, out, 0).max(), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = run(attn._xla_impl)
    (_, out), grads = run(lambda *a, **kw: getattr(attn, impl)(*a, **kw, block=block))
    mask = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(ref)[mask], atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)
        assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("impl, window, softcap", [("_pallas_impl", None, None), ("_splash_impl", None, None),
                                                   ("_splash_impl", 30, 2.0)])
def test_pallas_kernels_match_reference_in_interpret_mode(impl, window, softcap):
    """The Pallas GPU and TPU splash kernels' wiring (segment ids, GQA, padding to their blocks, scale; for
    splash a sliding window and soft-capping) checked on CPU through Pallas' interpreter; on a GPU,
    tools/gpu_checks.sh runs Pallas compiled."""
    import jaxsft.model.attention as attn

    q, k, v, seg, pos = _packed_case(jnp.float32)
    q, k, v, seg, pos = (x[:, :200] for x in (q, k, v, seg, pos))  # not a multiple of the 128 block
    valid = np.asarray(seg > 0)

    def run(fn):
        def loss(q, k, v):
            out = fn(q, k, v, seg, seg, pos, pos, window, **({"softcap": softcap} if softcap else {}))
            return jnp.where(jnp.asarray(valid)[..., None, None], out, 0).sum(), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = run(attn._xla_impl)
    (_, out), grads = run(lambda *a, **kw: getattr(attn, impl)(*a, **kw, interpret=True))
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g)[valid], np.asarray(g_ref)[valid], atol=1e-4)


TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("impl", ["splash", "pallas"])
@pytest.mark.parametrize("devices, mesh_cfg", [(1, {}), (4, {"fsdp": 4}), (8, {"data": 2, "fsdp": 2, "tensor": 2})])
def test_kernels_under_a_mesh_give_xla_logits(impl, devices, mesh_cfg):
    """The fused kernels run per shard (rows over data x fsdp, heads over tensor) inside shard_map: the
    model's logits on 1, 4 and 8 devices equal the XLA reference's (Pallas interpreter on CPU)."""
    if jax.device_count() < devices:  # tools/gpu_checks.sh runs this file on one GPU
        pytest.skip(f"needs {devices} devices (the CPU suite simulates 8)")
    params = init_params(TINY, jax.random.key(0), std=0.2)
    seg, pos = packed_rows([(60, 40), (128,), (30, 30, 30), (100,), (10, 20), (64, 64), (5,), (90, 20)], 128)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, TINY.vocab_size, size=seg.shape), jnp.int32)
    reference = jax.jit(lambda p: forward(p, TINY, ids, pos, seg, attention_impl="xla"))(params)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_cfg}, jax.devices()[:devices])
    rows = batch_sharding(mesh)
    ids_s, pos_s, seg_s = (jax.device_put(x, rows) for x in (ids, pos, seg))
    logits = jax.jit(lambda p, i, po, s: forward(p, TINY, i, po, s, attention_impl=impl, mesh=mesh,
                                                 interpret_kernels=True))(params, ids_s, pos_s, seg_s)
    assert len(logits.sharding.device_set) == devices
    valid = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(reference)[valid], atol=2e-4)
