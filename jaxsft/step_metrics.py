"""The training log's figures: the steps fetched since the last log line, checked and summarized.

A window is the list of per-step metric dicts (`step.make_train_step`'s outputs, on the host) since the
last log line; every figure averages the window's steps by each step's own loss denominator.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from jaxsft.errors import UserError

logger = logging.getLogger("jaxsft")


class NonFiniteLoss(UserError, RuntimeError):
    """Training diverged: the message names the step; the last checkpoint before it is intact."""


def check_finite(fetched: list[dict], first_step: int, skip: bool) -> None:
    """Raise NonFiniteLoss at the window's first non-finite step (or, with `skip`, warn: its update was
    not applied)."""
    for i, m in enumerate(fetched):
        if not bool(m["finite"]):
            if skip:
                logger.warning("step %d: non-finite loss or gradient, update skipped", first_step + i)
                continue
            raise NonFiniteLoss(f"step {first_step + i}: loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])} "
                                f"is not finite; stopped without saving it (the last checkpoint is intact). "
                                f"Lower learning_rate, or set skip_nonfinite_steps: true")


def summarize(fetched: list[dict], tokens: int, elapsed: float, flops: float,
               peak: float | None) -> dict[str, Any]:
    # each step's loss is weighted by its denominator: label tokens, or their loss weights' sum
    denominators = [float(m.get("weight_sum", m["label_tokens"])) for m in fetched]
    total = sum(denominators)
    loss = sum(float(m["loss"]) * d for m, d in zip(fetched, denominators)) / (total if total > 0 else 1)
    accuracy = sum(float(m["accuracy"]) * d for m, d in zip(fetched, denominators)) / (total if total > 0 else 1)
    tokens_per_sec = tokens / max(elapsed, 1e-9)
    mfu = flops / max(elapsed, 1e-9) / (peak * jax.device_count()) if peak else None
    return {"loss": round(loss, 4), "accuracy": round(accuracy, 4), "lr": float(fetched[-1]["lr"]),
            "grad_norm": round(float(np.mean([float(m["grad_norm"]) for m in fetched])), 4),
            "tokens_per_sec": round(tokens_per_sec, 1), "mfu": round(mfu, 4) if mfu is not None else None,
            **moe_summary(fetched), **replay_summary(fetched)}


def replay_summary(fetched: list[dict]) -> dict[str, Any]:
    """Replay runs: the SFT and replay tokens' losses apart, each averaged over the window by its own
    denominator in the steps (label tokens, or loss weights in a weighted run), and the replay share of the
    label tokens."""
    if "replay_loss" not in fetched[0]:
        return {}
    replay_tokens = [float(m["replay_tokens"]) for m in fetched]
    sft_tokens = [float(m["label_tokens"]) - r for m, r in zip(fetched, replay_tokens)]
    if "replay_weight_sum" in fetched[0]:
        replay = [float(m["replay_weight_sum"]) for m in fetched]
        sft = [float(m["weight_sum"]) - r for m, r in zip(fetched, replay)]
    else:
        replay, sft = replay_tokens, sft_tokens

    def mean(key, den):
        return round(sum(float(m[key]) * n for m, n in zip(fetched, den)) / max(sum(den), 1e-6), 4)

    return {"sft_loss": mean("sft_loss", sft), "replay_loss": mean("replay_loss", replay),
            "replay_label_share": round(sum(replay_tokens) / max(sum(replay_tokens) + sum(sft_tokens), 1), 4)}


def moe_summary(fetched: list[dict]) -> dict[str, Any]:
    """MoE runs: the router's load-balancing loss and each expert's share of the top-k assignments,
    averaged over the logged steps."""
    if "aux_loss" not in fetched[0]:
        return {}
    load_E = np.mean([np.asarray(m["expert_load"], np.float64) for m in fetched], axis=0)
    return {"aux_loss": round(float(np.mean([float(m["aux_loss"]) for m in fetched])), 6),
            "expert_load": [round(float(x), 4) for x in load_E]}


