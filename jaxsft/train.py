"""The training stage: load, build, loop, save.

The loop feeds global batches to the jitted pure step, logs every `logging_steps` (metrics stay on
device in between, so dispatch never waits), evaluates every `eval_steps`, and saves orbax
checkpoints that resume exactly (params, optimizer, step, RNG, data iterator position, config).
SIGTERM/SIGINT finish the current step, save a checkpoint (whatever `save_strategy` says) and exit
128 + signal with a resume hint; after the last step they wait until the trained model is in `output_dir`,
then skip eval/export.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxsft.checkpoint import Checkpoints, CorruptCheckpoint, abstract_like, holds_optimizer_state, model_only
from jaxsft.config import Config, ConfigError, every_n_steps, report_targets
from jaxsft.data.packing import fit_width, length_buckets
from jaxsft.evaluate import evaluate, jit_eval_step
from jaxsft.export import save_pissa_start, save_trained_model
from jaxsft.flops import peak_flops_per_device, train_flops_per_token
from jaxsft.optim import build_optimizer
from jaxsft.resume import (check_config_change, committed_steps, is_auto, prepare_output_dir, resume_target,
                           set_aside_damaged)
from jaxsft.retention import base_figures
from jaxsft.retention import figures as retention_figures
from jaxsft.run_logging import RunLogger, clear_results
from jaxsft.runtime import (Trained, build_mesh, check_token_ids, compilation_cache_summary, init_distributed,
                            is_main_process, load_model, load_tokenizer, process_age, rows_per_process)
from jaxsft.params import merge
from jaxsft.sharding import global_batch, replicated
from jaxsft.stopping import StopRequest
from jaxsft.trackers import Trackers
from jaxsft.step import init_state, make_eval_step, make_train_step
from jaxsft.step_metrics import NonFiniteLoss, check_finite, summarize

logger = logging.getLogger("jaxsft")


def plan_steps(cfg: Config, batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, epochs of data to iterate), with Hugging Face's arithmetic (in memory the
    epoch's batches are a multiple of the accumulation steps: its steps are HF's ceil(batches / accumulation))."""
    accumulation = cfg.gradient_accumulation_steps
    steps_per_epoch = max(batches_per_epoch // accumulation, 1)
    if batches_per_epoch < accumulation:
        raise ConfigError(f"an epoch has {batches_per_epoch} batches, fewer than gradient_accumulation_steps "
                          f"({accumulation}); lower the batch size or the accumulation")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    epochs = math.ceil(total * accumulation / batches_per_epoch)
    return total, epochs


def state_shardings(state: dict, optimizer, trainable_shardings, mesh) -> dict:
    """Shardings of the train state: optimizer moments like their params, scalars replicated."""
    return {
        "step": replicated(mesh),
        "trainable": trainable_shardings,
        "opt_state": optax.tree_map_params(optimizer, lambda _, s: s, state["opt_state"], trainable_shardings,
                                           transform_non_params=lambda _: replicated(mesh)),
        "rng": replicated(mesh),
    }


def build_train_step(cfg: Config, model, mesh, total_steps: int, abstract: bool = False):
    """The initial train state placed on the mesh, and the jitted step with the loop's shardings
    (`(state, frozen, batch[A, R, T]) -> (state, metrics)`, state donated). Shared with tools/bench.py.
    `abstract` (a model from `load_model(abstract=True)`): the state as shapes with their shardings."""
    optimizer, schedule = build_optimizer(cfg, total_steps)
    t_shard, f_shard = model.shardings(mesh)

    def init(trainable):
        return init_state(trainable, optimizer, cfg.seed)

    state = jax.eval_shape(init, model.trainable) if abstract else jax.jit(init)(model.trainable)
    shardings = state_shardings(state, optimizer, t_shard, mesh)
    if abstract:
        state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                       shardings)
    else:
        state = jax.device_put(state, shardings)
    train_step = jax.jit(make_train_step(model.runner, optimizer, schedule, cfg.skip_nonfinite_steps),
                         in_shardings=(shardings, f_shard, None),
                         out_shardings=(shardings, None), donate_argnums=(0,))
    return state, train_step


def _print_first_example(data, tokenizer) -> None:
    if not is_main_process() or not data.train:
        return
    ids, labels = data.train[0]
    ids, labels = list(map(int, ids)), [int(x) for x in labels if x != -100]
    print(f"training example:\ninput_ids:\n{ids}\ninputs:\n{tokenizer.decode(ids, skip_special_tokens=False)}")
    print(f"label_ids:\n{[int(x) for x in data.train[0][1]]}\nlabels:\n"
          f"{tokenizer.decode(labels, skip_special_tokens=False)}", flush=True)


def run_training(cfg: Config) -> dict[str, Any]:
    """The train stage's results (train_results.json)."""
    return train(cfg)[0]


def _note_empty_rows(rows: int, read: int) -> None:
    """Say once how many empty rows fill up an epoch's last batch (and step), when they are many."""
    if read - rows > rows // 10 and is_main_process():
        logger.info("an epoch's %d rows fill %d rows of whole batches (and accumulation steps): %d empty rows "
                    "complete the last ones; they add no loss, only compute", rows, read, read - rows)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _older_checkpoint(cfg: Config, directory: Path, step: int, error: CorruptCheckpoint) -> int:
    """After checkpoint_<step> could not be read: with `resume_from_checkpoint: true` it is set aside (said in
    one warning) and the next older checkpoint is the one to resume; a named checkpoint, or none older, leaves
    the error standing."""
    older = [s for s in committed_steps(directory) if s < step]
    if not is_auto(cfg) or not older:
        raise error
    if is_main_process():
        aside = set_aside_damaged(directory, step)
        logger.warning("%s; it was moved to %s and the run resumes from checkpoint_%d, the newest one before it",
                       error.what, aside, older[-1])
    _sync("jaxsft: damaged checkpoint set aside")
    return older[-1]


def train(cfg: Config) -> tuple[dict[str, Any], Trained | None]:
    """Train; returns (results, the trained model on its mesh), or (results, None) when a signal stopped it."""
    init_distributed(cfg)
    out = Path(cfg.output_dir)
    resume = resume_target(cfg)
    if is_main_process() and resume is None and out.is_dir() and Checkpoints(out, async_save=False).all_steps() \
            and not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir {out} already holds checkpoints; set resume_from_checkpoint: true to "
                          f"continue, or overwrite_output_dir: true to start over")
    if resume is not None:
        directory, step = resume
        while True:
            try:
                saved = Checkpoints(directory, async_save=False).restore_config(step)
                with_optimizer = holds_optimizer_state(directory, step)
                break
            except CorruptCheckpoint as e:
                step = _older_checkpoint(cfg, directory, step, e)
        resume = directory, step
        if not with_optimizer:
            raise ConfigError(f"{directory}/checkpoint_{step} was saved with save_only_model: true and holds no "
                              f"optimizer state, so training cannot resume from it; export it (export_dir, or "
                              f"tools/convert_checkpoint.py) and start a new run from the exported model")
        check_config_change(saved, cfg, f"{directory}/checkpoint_{step}")
    from jaxsft.data.args import DataArgs
    from jaxsft.data.pipeline import build_datasets  # here: the step alone (tools/bench.py) needs no grain

    mesh = build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    data = build_datasets(DataArgs.from_config(cfg), tokenizer, process_index=jax.process_index(),
                          process_count=jax.process_count())
    _print_first_example(data, tokenizer)
    rows = rows_per_process(cfg, mesh, cfg.per_device_train_batch_size)
    accumulation = cfg.gradient_accumulation_steps
    # In memory, an epoch reads every row (its last batch and step filled up with empty rows); a stream
    # reads whole batches only.
    epoch_fill = {} if data.streaming else {"batch_multiple": accumulation, "drop_last": cfg.dataloader_drop_last}
    batches_per_epoch = data.batches_per_epoch(rows, **epoch_fill)
    if batches_per_epoch == 0:
        what = "the stream's rows" if data.streaming else f"the {len(data.train)} examples (dataloader_drop_last: true)"
        raise ConfigError(f"{what} make no full batch of {rows * jax.process_count()} rows; lower "
                          f"per_device_train_batch_size")
    if not data.streaming and not cfg.dataloader_drop_last:
        _note_empty_rows(data.plan_rows(), batches_per_epoch * rows * jax.process_count())
    total_steps, epochs = plan_steps(cfg, batches_per_epoch)

    model = load_model(cfg, mesh)
    check_token_ids({"train": data.train, "eval": data.eval, "retention": data.retention, "replay": data.replay},
                    model.config.vocab_size, cfg.model_name_or_path)
    state, train_step = build_train_step(cfg, model, mesh, total_steps)
    frozen = model.frozen
    if cfg.pissa_init and resume is None:
        save_pissa_start(model.params(), cfg, model.config, model.runner.lora_scale)
    eval_step = jit_eval_step(make_eval_step(model.runner), model, mesh)

    buckets = length_buckets(cfg.cutoff_len) if cfg.length_buckets else None
    eval_rows = rows_per_process(cfg, mesh, cfg.per_device_eval_batch_size)

    def score_retention(trainable) -> dict:
        return evaluate(eval_step, trainable, frozen, data.retention_batches(eval_rows, buckets), mesh, "retention")

    # The forgetting meter's base: the starting params (before any restore), scored once and cached.
    retention_base = base_figures(cfg, data.retention, lambda: score_retention(state["trainable"]),
                                  is_main_process()) if data.retention else None
    # A stream goes on from epoch to epoch until the planned steps are done (its epochs differ in length).
    iterator = data.train_iterator(rows, seed=cfg.seed, num_epochs=None if data.streaming else epochs,
                                   buckets=buckets, group_by_length=cfg.group_by_length, **epoch_fill)
    history = None
    if resume is not None:
        if is_main_process():  # later checkpoints must go before orbax lists the steps (it would refuse to save)
            history = prepare_output_dir(out, resume[0], resume[1])
        _sync("jaxsft: output_dir prepared for resuming")
    checkpoints = Checkpoints(out, max_to_keep=cfg.save_total_limit)
    if resume is None and cfg.overwrite_output_dir:
        checkpoints.delete_all()  # old steps would collide with this run's saves
        if is_main_process() and (stale := clear_results(str(out))):
            logger.info("overwrite_output_dir: removed the previous run's %s", ", ".join(stale))
    config_record = dataclasses.asdict(cfg)
    start_step, progress = 0, {}
    if resume is not None:
        directory, step = resume
        source = checkpoints if directory == out.absolute() else Checkpoints(directory, async_save=False)
        while True:
            try:
                restored = source.restore(step, abstract_like(state), abstract_like(frozen))
                break
            except CorruptCheckpoint as e:  # resume_from_checkpoint: true goes on from the next older one
                step = _older_checkpoint(cfg, directory, step, e)
                if is_main_process():
                    history = prepare_output_dir(out, directory, step)
                _sync("jaxsft: damaged checkpoint set aside")
                source.reload()
        state, frozen, progress = restored["state"], restored["frozen"], restored["progress"]
        iterator.set_state(restored["data"])
        start_step = int(state["step"])
        print(f"resumed from {directory}/checkpoint_{step} at step {start_step}", flush=True)
        if not progress:
            logger.warning("checkpoint_%d predates saved running totals: train_results.json covers the steps after "
                           "it only", step)

    reports = report_targets(cfg.report_to)
    trackers = Trackers(reports, config_record, cfg.run_name) \
        if is_main_process() and {"wandb", "mlflow"} & set(reports) else None
    run_log = RunLogger(str(out), total_steps, is_main_process=is_main_process(), logging_steps=cfg.logging_steps,
                        plot_loss=cfg.plot_loss, tensorboard="tensorboard" in reports,
                        initial_step=start_step, history=history, progress_bar=not cfg.disable_tqdm,
                        trackers=trackers)
    truncation = {"truncated_examples": data.stats.get("train_truncated"),
                  "truncated_tokens": data.stats.get("train_truncated_tokens")}
    if start_step == 0:  # the data's truncation counts, on the run's first log line
        run_log.note(**truncation)
        if retention_base is not None:
            run_log.log_retention(0, retention_figures(retention_base, retention_base))
    flops_per_token = functools.lru_cache(lambda width: train_flops_per_token(model.config, width))  # per row width
    peak = peak_flops_per_device()
    steps_per_epoch = max(batches_per_epoch // accumulation, 1)
    save_every = {"steps": every_n_steps(cfg.save_steps, total_steps), "epoch": steps_per_epoch}.get(cfg.save_strategy)
    eval_every = {"steps": every_n_steps(cfg.eval_steps, total_steps),
                  "epoch": steps_per_epoch}.get(cfg.eval_strategy) if data.eval or data.retention else None
    window: list[dict] = []
    counted = 0  # steps of the window already added to the totals
    window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
    # Running totals of the whole run (carried by every checkpoint, so results after a resume cover all steps).
    total_tokens = int(progress.get("total_tokens", 0))
    total_label_tokens = int(progress.get("label_tokens", 0))
    examples_seen = int(progress.get("examples_seen", 0))
    loss_sum, loss_steps = float(progress.get("loss_sum", 0.0)), int(progress.get("loss_steps", 0))
    runtime_before = float(progress.get("train_runtime", 0.0))
    # model FLOPs so far (checkpoints before this was counted: every row at cutoff_len, as they counted it)
    total_flops = float(progress.get("flops", flops_per_token(cfg.cutoff_len) * total_tokens))
    window_positions = 0  # row positions fed, padding included
    total_positions = int(progress.get("positions", 0))
    compile_seconds: dict[tuple, float] = {}  # per batch shape: the time of its first step (trace + compile)
    first_step_at = None
    loop_start = time.perf_counter()

    def running_totals() -> dict:
        return {"step": step, "total_tokens": total_tokens, "label_tokens": total_label_tokens,
                "examples_seen": examples_seen, "loss_sum": loss_sum, "loss_steps": loss_steps,
                "positions": total_positions, "flops": total_flops,
                "train_runtime": runtime_before + time.perf_counter() - loop_start}

    step = start_step
    with StopRequest() as stop:
        while step < total_steps:
            try:
                micro = [next(iterator) for _ in range(accumulation)]
            except StopIteration:  # only a stream whose every row was dropped in an epoch gets here
                logger.warning("the training data ended after step %d of the planned %d; finishing there",
                               step, total_steps)
                break
            width = max(m["input_ids"].shape[-1] for m in micro)  # micro-batches of one step share a length
            local = {k: np.stack([fit_width(m, width, data.pad_id)[k] for m in micro]) for k in micro[0]}
            tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
            positions = local["segment_ids"].size * jax.process_count()
            sft_segments = np.where(local["replay"] > 0, 0, local["segment_ids"]) if "replay" in local \
                else local["segment_ids"]  # replay pieces come after a row's SFT examples
            examples_seen += int(sft_segments.max(axis=-1).sum()) * jax.process_count()  # packed: >1 a row
            shape = local["input_ids"].shape
            first_of_shape = shape not in compile_seconds
            started = time.perf_counter()
            state, metrics = train_step(state, frozen, global_batch(local, mesh, leading_dims=1))
            if first_of_shape:
                compile_seconds[shape] = time.perf_counter() - started
            if step == start_step:  # one wait, for the time from process start to the first step done
                first_step_at = process_age() if jax.block_until_ready(metrics) is not None else None
            step += 1
            window_positions += positions
            total_positions += positions
            window.append(metrics)
            window_tokens += tokens
            total_tokens += tokens
            step_flops = tokens * flops_per_token(width)  # attention over the rows' real width (bucket or cutoff)
            window_flops += step_flops
            total_flops += step_flops
            run_log.advance(step)
            stopping = stop.requested(step)  # read once: a signal arriving later waits for the next step
            log_now = run_log.should_log(step) or step == total_steps
            save_now = (save_every and step % save_every == 0) or step == total_steps or stopping
            if log_now or save_now:
                fetched = jax.device_get(window)
                try:
                    check_finite(fetched, step - len(fetched) + 1, cfg.skip_nonfinite_steps)
                except NonFiniteLoss:
                    checkpoints.close()  # the last good checkpoint finishes committing before we stop
                    run_log.close()  # the log and plots so far stay readable
                    raise
                for m in fetched[counted:]:  # HF's train_loss: the mean of every step's loss
                    total_label_tokens += int(m["label_tokens"])
                    if bool(m["finite"]):
                        loss_sum, loss_steps = loss_sum + float(m["loss"]), loss_steps + 1
                counted = len(fetched)
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    summary = summarize(fetched, window_tokens, elapsed, window_flops, peak)
                    summary["padding_share"] = round(1 - window_tokens / max(window_positions, 1), 4)
                    summary.update(step=step, epoch=round(step * accumulation / batches_per_epoch, 4),
                                   elapsed=round(runtime_before + time.perf_counter() - loop_start, 3),
                                   total_tokens=total_tokens)
                    run_log.log_train(step, summary)
                    window, counted, window_tokens, window_positions, window_start = [], 0, 0, 0, time.perf_counter()
                    window_flops = 0.0
            final_eval_follows = step == total_steps and cfg.do_eval  # do_eval evaluates at the end anyway
            if eval_every and step % eval_every == 0 and not final_eval_follows and not stopping and data.eval:
                run_log.log_eval(step, evaluate(eval_step, state["trainable"], frozen,
                                                data.eval_batches(eval_rows, buckets), mesh))
            if eval_every and step % eval_every == 0 and step < total_steps and not stopping and data.retention:
                run_log.log_retention(step, retention_figures(score_retention(state["trainable"]), retention_base))
            interrupted = stopping and step < total_steps  # a signal at the last step: the run is done anyway
            if (save_now and cfg.save_strategy != "no") or interrupted:  # a stop saves whatever save_strategy says
                checkpoints.save(step, model_only(state) if cfg.save_only_model else state, frozen,
                                 iterator.get_state(), config_record, model.partition, running_totals())
            if interrupted:
                checkpoints.close()
                run_log.close()
                print(f"stopped by signal {stop.signal} after step {step}; checkpoint saved in {out}. "
                      f"Resume with: resume_from_checkpoint=true", flush=True)
                return {"stopped_at_step": step, "stopped_by_signal": stop.signal}, None
        # a signal from here on waits until the trained model is written, then skips the later stages
        train_runtime = running_totals()["train_runtime"]  # the whole run's, over all its sessions
        checkpoints.close()
        run_log.end_progress()
        results = {
            "train_runtime": round(train_runtime, 4),
            "train_samples_per_second": round(examples_seen / train_runtime, 3),
            "train_steps_per_second": round(step / train_runtime, 3),
            "train_tokens_per_second": round(total_tokens / train_runtime, 3),
            "train_loss": round(loss_sum / loss_steps, 4) if loss_steps else float("nan"),
            "epoch": round(step * accumulation / batches_per_epoch, 4),
            "total_flos": float(total_flops),
            "train_padding_share": round(1 - total_tokens / max(total_positions, 1), 4),
            "train_compiled_shapes": len(compile_seconds),
            "train_compile_seconds": round(sum(compile_seconds.values()), 2),
            **{f"train_{k}": v for k, v in truncation.items() if v is not None},
        }
        if first_step_at is not None:
            results["time_to_first_step"] = round(first_step_at, 2)
        run_log.save_metrics("train", results)
        if is_main_process() and (cache_line := compilation_cache_summary()):
            logger.info(cache_line)
        save_trained_model(merge(state["trainable"], frozen, model.partition), cfg, model.config, model.runner.lora_scale)
    if (late_signal := stop.agreed()) is not None:
        run_log.close()
        print(f"stopped by signal {late_signal} after training (step {step}); the trained model is saved in "
              f"{cfg.output_dir}; the stages after training (eval, predict, export) did not run", flush=True)
        return {**results, "stopped_by_signal": late_signal}, None
    if retention_base is not None:  # the forgetting meter at the end, in the log and all_results.json
        final = retention_figures(score_retention(state["trainable"]), retention_base)
        run_log.log_retention(step, final)
        run_log.save_metrics("retention", {**final, "retention_base_loss": retention_base["retention_loss"],
                                           "retention_label_tokens": retention_base["retention_label_tokens"]})
    if cfg.do_eval and data.eval:
        final = evaluate(eval_step, state["trainable"], frozen, data.eval_batches(eval_rows, buckets), mesh)
        run_log.log_eval(step, final)  # the series' last point, as HF logs trainer.evaluate() (the loop left it here)
        run_log.save_metrics("eval", final)
    run_log.close()
    model.trainable, model.frozen = state["trainable"], frozen
    return results, Trained(model, mesh)
