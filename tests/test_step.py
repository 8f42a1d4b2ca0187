"""The pure train step: mesh-invariance, packing and accumulation leave the objective unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.config_load import build_config
from jaxsft.model.config import ModelConfig
from jaxsft.model.transformer import init_params, param_logical_axes
from jaxsft.optim import build_optimizer
from jaxsft.params import flatten, full_partition, split, unflatten
from jaxsft.sharding import batch_sharding, make_mesh, tree_shardings
from jaxsft.step import ModelRunner, init_state, make_train_step
from jaxsft.train import state_shardings as train_state_shardings

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
T = 32


def example(rng, length):
    ids = rng.integers(1, TINY.vocab_size, size=length)
    labels = ids.copy()
    labels[: length // 3] = -100  # a prompt that is not learned
    return ids, labels


def pack(examples, seq_len=T):
    """Rows per docs/internals.md from lists of (ids, labels) per row."""
    out = {k: np.zeros((len(examples), seq_len), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    out["targets"] = np.full((len(examples), seq_len), -100, np.int32)
    for r, row in enumerate(examples):
        at = 0
        for seg, (ids, labels) in enumerate(row, start=1):
            n = len(ids)
            out["input_ids"][r, at:at + n] = ids
            out["segment_ids"][r, at:at + n] = seg
            out["positions"][r, at:at + n] = np.arange(n)
            out["targets"][r, at:at + n - 1] = labels[1:]
            at += n
    return out


def setup(cfg_overrides=(), seed=0):
    cfg = build_config({"learning_rate": 1e-2, "max_grad_norm": 1.0, "weight_decay": 0.01,
                        **dict(cfg_overrides)})
    flat = flatten(init_params(TINY, jax.random.key(seed), std=0.2))
    part = full_partition(flat)
    trainable, frozen = split(flat, part)
    optimizer, schedule = build_optimizer(cfg, total_steps=10)
    runner = ModelRunner(TINY, part)
    return runner, optimizer, schedule, trainable, frozen


def run_step(runner, optimizer, schedule, trainable, frozen, batch, mesh=None):
    step = make_train_step(runner, optimizer, schedule)
    state = init_state(trainable, optimizer, seed=0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    if mesh is None:
        return jax.jit(step)(state, frozen, batch)
    axes = flatten(param_logical_axes(unflatten(trainable)))
    shardings = tree_shardings(trainable, axes, mesh)
    state_shardings = train_state_shardings(state, optimizer, shardings, mesh)  # the loop's own
    state = jax.device_put(state, state_shardings)
    frozen = jax.device_put(frozen, tree_shardings(frozen, {k: axes[k] for k in frozen}, mesh) if frozen else {})
    batch = jax.device_put(batch, batch_sharding(mesh, leading_dims=1))
    jitted = jax.jit(step, out_shardings=(state_shardings, None))
    new_state, metrics = jitted(state, frozen, batch)
    # the params really are split over the mesh
    q = new_state["trainable"]["layers/self_attn/q_proj/kernel"]
    assert len(q.sharding.device_set) == 8
    return new_state, metrics


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    return [[example(rng, n) for n in lens] for lens in ([10, 12, 9], [20, 11], [31], [5, 6, 7, 8],
                                                        [16, 16], [30], [3, 25], [14, 14])]


@pytest.mark.parametrize("mesh_cfg", [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2},
                                      {"data": 2, "fsdp": 2, "tensor": 2},
                                      {"fsdp": 2, "expert": 4}])  # dense: expert only shares the batch
def test_mesh_gives_same_step(rows, mesh_cfg):
    # SGD, because Adam's first update is ~lr * sign(g): it turns reduction-order noise in near-zero
    # gradient entries into lr-sized differences, which says nothing about the mesh.
    runner, optimizer, schedule, trainable, frozen = setup({"optim": "sgd", "learning_rate": 0.1})
    batch = {k: v[None] for k, v in pack(rows).items()}
    ref_state, ref_metrics = run_step(runner, optimizer, schedule, trainable, frozen, batch)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_cfg})
    state, metrics = run_step(runner, optimizer, schedule, trainable, frozen, batch, mesh)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    for key in ref_state["trainable"]:
        np.testing.assert_allclose(np.asarray(state["trainable"][key]), np.asarray(ref_state["trainable"][key]),
                                   atol=1e-5, err_msg=key)


def loss_and_grads(runner, trainable, frozen, batch):
    from jaxsft.loss import loss_sums

    def fn(t):
        sums = loss_sums(runner.logits(t, frozen, {k: jnp.asarray(v) for k, v in batch.items()}), batch["targets"])
        return sums["loss_sum"], sums["label_tokens"]
    (loss_sum, n), grads = jax.value_and_grad(fn, has_aux=True)(trainable)
    return loss_sum, n, grads


def test_packed_gradients_equal_unpacked(rows):
    runner, _, _, trainable, frozen = setup()
    packed = pack(rows)
    unpacked = pack([[ex] for row in rows for ex in row])
    ls_p, n_p, g_p = loss_and_grads(runner, trainable, frozen, packed)
    ls_u, n_u, g_u = loss_and_grads(runner, trainable, frozen, unpacked)
    assert float(n_p) == float(n_u) > 0
    np.testing.assert_allclose(ls_p / n_p, ls_u / n_u, rtol=1e-5)
    for key in g_p:
        np.testing.assert_allclose(g_p[key] / n_p, g_u[key] / n_u, atol=2e-6, err_msg=key)


def test_accumulation_equals_big_batch(rows):
    runner, optimizer, schedule, trainable, frozen = setup({"optim": "sgd", "learning_rate": 0.1})
    big = pack(rows)
    one = {k: v[None] for k, v in big.items()}                 # [1, 8, T]
    four = {k: v.reshape(4, 2, T) for k, v in big.items()}      # [4, 2, T]
    s1, m1 = run_step(runner, optimizer, schedule, trainable, frozen, one)
    s4, m4 = run_step(runner, optimizer, schedule, trainable, frozen, four)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for key in s1["trainable"]:
        np.testing.assert_allclose(s4["trainable"][key], s1["trainable"][key], atol=1e-6, err_msg=key)
        assert not np.allclose(s1["trainable"][key], trainable[key], atol=1e-6), key  # the step moved it


def test_step_lowers_loss_and_skips_nonfinite(rows):
    runner, optimizer, schedule, trainable, frozen = setup({"learning_rate": 3e-3, "lr_scheduler_type": "constant"})
    batch = {k: jnp.asarray(v[None]) for k, v in pack(rows).items()}
    step = jax.jit(make_train_step(runner, optimizer, schedule))
    state = init_state(trainable, optimizer, seed=0)
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    # a NaN in the params makes the loss non-finite: with skip_nonfinite the update is dropped
    bad = dict(state["trainable"])
    bad["norm/scale"] = bad["norm/scale"].at[0].set(jnp.nan)
    skip = jax.jit(make_train_step(runner, optimizer, schedule, skip_nonfinite=True))
    bad_state = {**state, "trainable": bad}
    new_state, metrics = skip(bad_state, frozen, batch)
    assert not bool(metrics["finite"])
    assert int(new_state["step"]) == int(state["step"]) + 1
    np.testing.assert_array_equal(new_state["trainable"]["layers/mlp/up_proj/kernel"],
                                  bad["layers/mlp/up_proj/kernel"])


def test_weighted_loss_is_the_same_packed_unpacked_and_accumulated(rows):
    """Per-token loss weights: loss = sum(w * ce) / sum(w) over the global batch, whatever the packing and
    the accumulation, and equal to that sum over each example run alone."""
    from jaxsft.data.packing import WeightedExample, make_row, stack_rows, weights_of
    from jaxsft.loss import token_losses

    rng = np.random.default_rng(1)
    examples, members = [], []
    for row in rows:
        members.append(list(range(len(examples), len(examples) + len(row))))
        for ids, labels in row:
            w = np.where(labels != -100, rng.choice([0.25, 1.0, 2.0, 3.5], size=len(labels)), 0.0)
            examples.append(WeightedExample(ids.astype(np.int32), labels.astype(np.int32), w.astype(np.float32)))
    packed = stack_rows([make_row(examples, m, T, 0, weighted=True) for m in members])          # 8 rows
    unpacked = stack_rows([make_row(examples, [i], T, 0, weighted=True) for i in range(len(examples))])
    unpacked = {k: v[:16] for k, v in unpacked.items()}  # whole micro-batches of 4 (the 18 examples' first 16)
    keep = [i for m in members for i in m][:16]
    packed_16 = stack_rows([make_row(examples, [i for i in m if i in keep], T, 0, weighted=True) for m in members])
    runner, optimizer, schedule, trainable, frozen = setup({"optim": "sgd", "learning_rate": 0.1})
    _, m_packed = run_step(runner, optimizer, schedule, trainable, frozen, {k: v[None] for k, v in packed_16.items()})
    _, m_acc = run_step(runner, optimizer, schedule, trainable, frozen,
                        {k: v.reshape(4, 4, T) for k, v in unpacked.items()})
    # the reference: each example alone, its own forward, sum(w * ce) / sum(w) in float64
    num = den = 0.0
    ce_of = jax.jit(lambda row: token_losses(runner.logits(trainable, frozen, row), row["targets"])[0])
    for i in keep:
        ce = np.asarray(ce_of({k: jnp.asarray(v[None]) for k, v in make_row(examples, [i], T, 0).items()}),
                        np.float64)[0]
        w = np.zeros(T)
        w[:len(examples[i][0]) - 1] = weights_of(examples[i])[1:]
        num, den = num + float((w * ce).sum()), den + float(w.sum())
    assert float(m_packed["weight_sum"]) == pytest.approx(den, rel=1e-6)
    np.testing.assert_allclose(float(m_packed["loss"]), num / den, rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["loss"]), num / den, rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_packed["grad_norm"]), rtol=1e-5)
