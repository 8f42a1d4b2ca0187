"""Resuming a run: which checkpoint, what becomes of what came after it, and whether the new config fits it.

Resuming from step S (the newest checkpoint, or an older one to branch a run or undo a divergence):
- the output_dir's checkpoints after S are moved, with the trainer_log.jsonl lines of those steps, into
  `output_dir/set_aside/after_step_<S>_<time>/` (said in one warning; nothing is deleted);
- trainer_log.jsonl keeps the lines of steps <= S (read from the resumed checkpoint's own run, so a branch
  into a new output_dir starts with its history); the lines of steps redone after a crash are replaced,
  and a line torn by a crash mid-write is dropped;
- the saved config is compared with the new one: what cannot work is refused, the rest is named.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from jaxsft.config import FIELDS, Config
from jaxsft.errors import ConfigError, MissingPath
from jaxsft.run_logging import TRAINER_LOG

logger = logging.getLogger("jaxsft")
STEP_DIR = re.compile(r"checkpoint_(\d+)$")  # committed steps (an interrupted save has a suffix)


def committed_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))


def is_auto(cfg: Config) -> bool:
    """`resume_from_checkpoint: true`: the newest checkpoint that can be read (a damaged one is set aside)."""
    return cfg.resume_from_checkpoint is True or str(cfg.resume_from_checkpoint).lower() == "true"


def set_aside_damaged(directory: Path, step: int) -> Path:
    """Moves a checkpoint that cannot be read out of the way (nothing is deleted); main process only."""
    aside = directory / "set_aside" / f"damaged_checkpoint_{step}_{time.strftime('%Y%m%d-%H%M%S')}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(directory / f"checkpoint_{step}"), str(aside))
    return aside


def resume_target(cfg: Config) -> tuple[Path, int] | None:
    """(checkpoint manager dir, step) the config resumes from, or None for a fresh start."""
    from jaxsft.checkpoint import Checkpoints, find_checkpoint

    value = cfg.resume_from_checkpoint
    if value in (None, False) or str(value).lower() == "false":
        return None
    if is_auto(cfg):
        found = Checkpoints(cfg.output_dir, async_save=False).latest_step()
        if found is None:
            raise MissingPath(f"resume_from_checkpoint: true but no complete checkpoint in {cfg.output_dir}")
        return Path(cfg.output_dir).absolute(), found
    return find_checkpoint(value)


# ------------------------------------------------------------------------------------------------------------
# What came after the resumed step.

def read_log(path: Path) -> tuple[list[dict], list[str], int]:
    """(records, their raw lines, lines that do not parse) of a trainer_log.jsonl; empty when absent."""
    if not path.is_file():
        return [], [], 0
    records, raw, bad = [], [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
            raw.append(line)
        else:
            bad += 1
    return records, raw, bad


def _write_lines(path: Path, lines: list[str]) -> None:
    """Replace `path` at once (a crash leaves the old file or the new, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def prepare_output_dir(out: Path, source: Path, step: int) -> list[dict]:
    """Set aside the output_dir's checkpoints after `step` and the log lines of the steps to be redone; returns
    the log history (records of steps <= step) the resumed run continues. Main process only."""
    out, source = out.absolute(), source.absolute()
    later = [s for s in committed_steps(out) if s > step]
    own_records, own_raw, torn = read_log(out / TRAINER_LOG)
    if source == out:
        kept = [(r, line) for r, line in zip(own_records, own_raw) if r.get("current_steps", 0) <= step]
    else:  # a branch: the history up to `step` is the source run's
        src_records, src_raw, _ = read_log(source / TRAINER_LOG)
        kept = [(r, line) for r, line in zip(src_records, src_raw) if r.get("current_steps", 0) <= step]
    kept_ids = {id(r) for r, _ in kept}
    dropped = [line for r, line in zip(own_records, own_raw) if id(r) not in kept_ids]
    if later:
        aside = out / "set_aside" / f"after_step_{step}_{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for s in later:
            shutil.move(str(out / f"checkpoint_{s}"), str(aside / f"checkpoint_{s}"))
        if dropped:
            _write_lines(aside / TRAINER_LOG, dropped)
        names = ", ".join(f"checkpoint_{s}" for s in later)
        logger.warning("resuming from checkpoint_%d: the later checkpoints (%s)%s were moved to %s; delete that "
                       "folder if you do not need them", step, names,
                       f" and {len(dropped)} trainer_log.jsonl lines of their steps" if dropped else "", aside)
    elif dropped:
        logger.info("trainer_log.jsonl: %d lines of steps after %d are replaced by the resumed run's", len(dropped),
                    step)
    if torn:
        logger.warning("trainer_log.jsonl: dropped %d unreadable line%s (cut short when a run was killed while "
                       "writing it)", torn, "s" if torn > 1 else "")
    if out.is_dir() or kept:
        out.mkdir(parents=True, exist_ok=True)
        _write_lines(out / TRAINER_LOG, [line for _, line in kept])
    return [r for r, _ in kept]


# ------------------------------------------------------------------------------------------------------------
# The saved config against the new one.

# Keys whose change makes the checkpoint's trees not fit the run (other params, other optimizer state).
MUST_MATCH = ("model_name_or_path", "finetuning_type", "lora_rank", "lora_target", "additional_target",
              "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "adapter_name_or_path",
              "create_new_adapter", "optim", "param_dtype", "pure_bf16")
# Keys that say how a run is managed or reported, not what it learns: changing them is the point of a resume.
RUN_MANAGEMENT = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "do_train", "do_eval", "do_predict",
                  "predict_with_generate", "logging_steps", "save_steps", "save_strategy", "save_total_limit",
                  "eval_strategy", "eval_steps", "per_device_eval_batch_size", "plot_loss", "report_to", "run_name",
                  "disable_tqdm", "export_dir", "export_size", "export_dtype", "export_adapter", "export_device",
                  "do_sample", "temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "repetition_penalty",
                  "skip_special_tokens", "coordinator_address", "num_processes", "process_id", "mesh",
                  "attention_impl", "remat_policy", "gradient_checkpointing", "preprocessing_num_workers",
                  "dataloader_num_workers", "ddp_timeout", "overwrite_cache", "tokenized_path", "cache_dir",
                  "compute_accuracy", "compilation_cache_dir", "save_only_model")


def _same(key: str, saved: Any, new: Any) -> bool:
    if key in ("model_name_or_path", "adapter_name_or_path") and saved and new:
        return saved == new or Path(saved).resolve() == Path(new).resolve()
    return saved == new


def check_config_change(saved: dict, cfg: Config, checkpoint: str) -> None:
    """Refuse a resume whose config cannot fit the checkpoint; warn, by name, about every other change."""
    new = cfg.to_dict()
    changed = {k: (saved[k], new[k]) for k in new if k in saved and k in FIELDS and not _same(k, saved[k], new[k])}
    fatal = [k for k in MUST_MATCH if k in changed]
    if fatal:
        what = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in fatal)
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was trained with other settings that its saved "
                          f"params or optimizer state cannot follow: {what}. Resume with the checkpoint's values, "
                          f"or start a new run (another output_dir, or overwrite_output_dir: true)")
    noted = [k for k in changed if k not in RUN_MANAGEMENT]
    if noted:
        what = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in noted)
        logger.warning("resuming %s with changed settings: %s; the run continues with the new values, so it will "
                       "not match an uninterrupted run", checkpoint, what)
