"""LoRA variants LLaMA-Factory users train with: LoRA+ (per-group learning rates), PiSSA, DoRA."""

from pathlib import Path

import jax
import numpy as np

from jaxsft.config import build_config
from jaxsft.runtime import build_mesh, load_model
from jaxsft.sharding import global_batch
from jaxsft.train import build_train_step

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny-llama")
LORA = {"model_name_or_path": TINY, "finetuning_type": "lora", "lora_rank": 4, "lora_target": "all",
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "weight_decay": 0.01,
        "per_device_train_batch_size": 1, "seed": 3, "cutoff_len": 32}


def _batch(rows: int, length: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 1000, (1, rows, length)).astype(np.int32)
    targets = np.concatenate([ids[..., 1:], np.full((1, rows, 1), -100, np.int32)], axis=-1)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "targets": targets, "positions": positions, "segment_ids": np.ones_like(ids)}


def train(overrides: dict, steps: int) -> tuple[dict, list[dict]]:
    """(initial trainable params, trainable params after each step) on the same batches."""
    cfg = build_config({**LORA, **overrides})
    mesh = build_mesh(cfg)
    model = load_model(cfg, mesh)
    initial = jax.device_get(model.trainable)
    state, step = build_train_step(cfg, model, mesh, total_steps=steps)
    after = []
    for i in range(steps):
        batch = _batch(8 * cfg.per_device_train_batch_size, seed=i)
        state, _ = step(state, model.frozen, global_batch(batch, mesh, leading_dims=1))
        after.append(jax.device_get(state["trainable"]))
    return initial, after


def test_loraplus_moves_b_faster_than_lora_by_the_ratio():
    ratio = 16.0
    init, plain = train({}, steps=3)
    init_plus, plus = train({"loraplus_lr_ratio": ratio}, steps=3)
    b_keys = [k for k in init if k.endswith("lora_b")]
    a_keys = [k for k in init if k.endswith("lora_a")]
    assert len(b_keys) == 7 and len(a_keys) == 7
    for k in init:
        np.testing.assert_array_equal(init[k], init_plus[k])  # same start
    # Step 1: same gradients, so Adam's update of B is exactly `ratio` times larger, A's is unchanged.
    for k in b_keys:
        np.testing.assert_allclose(plus[0][k] - init[k], ratio * (plain[0][k] - init[k]), rtol=1e-5, atol=1e-9)
        assert np.abs(plain[0][k]).max() > 0
    for k in a_keys:
        np.testing.assert_allclose(plus[0][k] - init[k], plain[0][k] - init[k], rtol=1e-5, atol=1e-9)
    # Later steps: B keeps moving much faster (not exactly `ratio`: the gradients now differ).
    moved = {k: np.linalg.norm(plus[-1][k] - init[k]) / np.linalg.norm(plain[-1][k] - init[k]) for k in b_keys}
    assert all(4 < m < 2 * ratio for m in moved.values()), moved
