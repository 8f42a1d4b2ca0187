"""Orbax checkpoints of everything a run needs to continue exactly.

A checkpoint `output_dir/checkpoint_<step>/` holds separate items: `trainable` (the trained params),
`optimizer` (step, optimizer state unless `save_only_model`, RNG), `frozen` (the frozen params, so export
works from any checkpoint), `partition` (which leaves train: the freeze / LoRA split), `data` (the grain
iterator state), `config` (the resolved config) and `progress` (the run's running totals: tokens,
examples, loss sum, runtime, so results after a resume cover the whole run; absent from older
checkpoints). Reading the params for eval, predict or export needs no optimizer. Checkpoints of the
earlier layout (one `state` item with step, trainable params, optimizer state and RNG) stay readable.
Orbax writes into a temporary directory (`checkpoint_<step>.orbax-checkpoint-tmp`) and renames it on
success, so a save killed halfway leaves nothing that `latest_step` would pick up. A save that fails for
lack of disk space raises `DiskFull` naming the checkpoints that are intact; a checkpoint that cannot be
read raises `CorruptCheckpoint` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from jaxsft.config import FIELDS, Config
from jaxsft.errors import ConfigError, MissingPath, UserError
from jaxsft.params import Partition

ITEMS = ("trainable", "optimizer", "frozen", "partition", "data", "config", "progress", "state")
LEGACY_STATE = "state"  # the earlier layout's single item: step, trainable, opt_state, rng
OPTIMIZER_KEYS = ("step", "opt_state", "rng")  # the train state but its params (no opt_state: save_only_model)

def partition_record(partition: Partition) -> dict:
    return {"trainable": sorted(partition.trainable), "sliced": sorted(partition.sliced),
            "layer_range": list(partition.layer_range)}


def partition_from_record(record: dict) -> Partition:
    return Partition(trainable=frozenset(record["trainable"]), sliced=frozenset(record["sliced"]),
                     layer_range=tuple(record["layer_range"]))


def _item_tree(item_dir: Path):
    """{leaf: array metadata} of one saved item, read by the item's own handler (the checkpointer's `metadata`
    looks for step metadata inside the item and logs 'Metadata file does not exist' on every read)."""
    return ocp.StandardCheckpointHandler().metadata(Path(item_dir)).tree


def _saved_trainable(step_dir: Path) -> dict:
    """{leaf: metadata} of the trained params a checkpoint holds (either layout)."""
    if (step_dir / LEGACY_STATE).is_dir():
        return _item_tree(step_dir / LEGACY_STATE)["trainable"]
    return _item_tree(step_dir / "trainable")


def _check_same_leaves(step_dir: Path, abstract: dict) -> None:
    """The config must build the same trainable leaves (names and shapes) as the checkpoint trained."""
    saved = _saved_trainable(step_dir)
    differ = sorted(k for k in set(saved) | set(abstract)
                    if k not in saved or k not in abstract or tuple(saved[k].shape) != tuple(abstract[k].shape))
    if differ:
        k = differ[0]
        where = (f"shape {tuple(saved[k].shape)} there, {tuple(abstract[k].shape)} here" if k in saved and k in abstract
                 else "only in the checkpoint" if k in saved else "only in this config")
        raise ConfigError(f"{step_dir} trained other params than this config builds ({len(differ)} differ, e.g. "
                          f"{k!r}: {where}); set the checkpoint's finetuning_type, lora_rank, lora_target, "
                          f"additional_target or freeze_* keys")


class DiskFull(UserError, OSError):
    """A checkpoint could not be written for lack of space; earlier checkpoints are intact."""


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, also when tensorstore reports it as a ValueError ("[os_error_code='28']")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class CorruptCheckpoint(UserError, ValueError):
    """A checkpoint that exists but cannot be read (truncated, damaged or incomplete files)."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what or message  # which checkpoint and why, without the advice


def _remove_unfinished_saves(directory: Path) -> None:
    """Delete what a killed save left (`checkpoint_<step>.orbax-checkpoint-tmp`) before orbax looks. Orbax's
    own cleanup runs in a background thread per manager; with two managers on one folder (resume lookup,
    then saving) they raced over the same files and orbax logged a traceback. Process 0 only: one deleter."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for leftover in directory.glob("*.orbax-checkpoint-tmp*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


class Checkpoints:
    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, async_save: bool = True):
        self.directory = Path(directory).absolute()
        _remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            step_prefix="checkpoint",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a killed save are removed, never loaded
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: int | None = None  # the step of an async save that may not have finished

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            steps = self.all_steps()
            failed = self._pending if self._pending is not None and self._pending not in steps else step
            intact = ", ".join(f"checkpoint_{s}" for s in steps if s != failed) or "none"
            free = shutil.disk_usage(self.directory).free / 2**20
            raise DiskFull(f"no space left on device while saving checkpoint_{failed} in "
                           f"{self.directory} ({free:.1f} MiB free); intact checkpoints: {intact}. Free some space "
                           f"(or lower save_total_limit), then rerun with resume_from_checkpoint: true") from e

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Whatever orbax/tensorstore raise on damaged files becomes one line naming the checkpoint."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:
            others = ", ".join(f"checkpoint_{s}" for s in self.all_steps() if s != step) or "none"
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            what = f"checkpoint {self.directory / f'checkpoint_{step}'} cannot be read ({type(e).__name__}: {reason})"
            raise CorruptCheckpoint(f"{what}; it is damaged or incomplete. Resume from another checkpoint (here: "
                                    f"{others}), or move it aside", what=what) from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reload(self) -> None:
        """Lists the steps again (after a checkpoint was moved aside)."""
        self.manager.reload()

    def save(self, step: int, state: dict, frozen: dict, data_state: dict, config: dict,
             partition: Partition, progress: dict | None = None) -> None:
        """`state` is the train state {step, trainable, opt_state, rng}; saved as separate items."""
        items = {"trainable": ocp.args.StandardSave(state["trainable"]),
                 "optimizer": ocp.args.StandardSave({k: state[k] for k in OPTIMIZER_KEYS if k in state}),
                 "partition": ocp.args.JsonSave(partition_record(partition)),
                 "data": ocp.args.JsonSave(data_state), "config": ocp.args.JsonSave(config)}
        if progress is not None:
            items["progress"] = ocp.args.JsonSave(progress)
        if frozen:  # full fine-tuning has nothing frozen (orbax refuses empty items)
            items["frozen"] = ocp.args.StandardSave(frozen)
        with self._writing(step):  # orbax first waits for the previous async save: its error surfaces here
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._pending = step

    def step_dir(self, step: int) -> Path:
        return self.directory / f"checkpoint_{step}"

    def is_legacy(self, step: int) -> bool:
        return (self.step_dir(step) / LEGACY_STATE).is_dir()

    def restore(self, step: int, abstract_state: Any, abstract_frozen: Any) -> dict[str, Any]:
        """The train state, frozen params, data position and config, restored onto the shardings carried by the
        abstract trees (jax.ShapeDtypeStruct leaves); the optimizer state must match `abstract_state`."""
        items = {"data": ocp.args.JsonRestore(), "config": ocp.args.JsonRestore()}
        if abstract_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        if (self.step_dir(step) / "progress").is_dir():
            items["progress"] = ocp.args.JsonRestore()
        if self.is_legacy(step):
            items[LEGACY_STATE] = ocp.args.StandardRestore(abstract_state)
        else:
            items["trainable"] = ocp.args.StandardRestore(abstract_state["trainable"])
            items["optimizer"] = ocp.args.StandardRestore({k: abstract_state[k] for k in OPTIMIZER_KEYS
                                                           if k in abstract_state})
        with self._reading(step):
            _saved_trainable(self.step_dir(step))  # eval / predict read this metadata: it must be there
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored[LEGACY_STATE] if self.is_legacy(step) else \
            {"trainable": restored["trainable"], **restored["optimizer"]}
        return {"state": state, "frozen": restored["frozen"] if abstract_frozen else {},
                "data": restored["data"], "config": restored["config"],
                "progress": restored["progress"] if "progress" in items else {}}

    def restore_params(self, step: int, abstract_trainable: Any, abstract_frozen: Any) -> tuple[dict, dict]:
        """(trainable, frozen) params only, onto the abstract trees' shardings: no optimizer is needed. A
        checkpoint of the earlier layout is read on the host and placed."""
        with self._reading(step):
            _check_same_leaves(self.step_dir(step), abstract_trainable)
        items = {}
        if abstract_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        if self.is_legacy(step):
            items[LEGACY_STATE] = ocp.args.StandardRestore(_abstract(self.step_dir(step) / LEGACY_STATE))
        else:
            items["trainable"] = ocp.args.StandardRestore(abstract_trainable)
        with self._reading(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if self.is_legacy(step):
            trainable = jax.device_put(restored[LEGACY_STATE]["trainable"],
                                       jax.tree_util.tree_map(lambda a: a.sharding, abstract_trainable))
        else:
            trainable = restored["trainable"]
        return trainable, restored["frozen"] if abstract_frozen else {}

    def restore_partition(self, step: int) -> Partition | None:
        """The saved freeze / LoRA split; None for a checkpoint of the earlier layout."""
        if self.is_legacy(step) or not (self.step_dir(step) / "partition").is_dir():
            return None
        with self._reading(step):
            record = self.manager.restore(step, args=ocp.args.Composite(partition=ocp.args.JsonRestore()))
        return partition_from_record(record["partition"])

    def restore_config(self, step: int) -> dict:
        with self._reading(step):
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def delete_all(self) -> None:
        """Remove every checkpoint (overwrite_output_dir: a new run must not collide with old steps)."""
        for step in self.all_steps():
            self.manager.delete(step)

    def wait(self) -> None:
        with self._writing(None):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for a tree of live arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """`output_dir` (latest inside), or a `checkpoint_<step>` dir -> (manager dir, step)."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise MissingPath(f"checkpoint {path} does not exist: name a checkpoint_<step> directory or an output_dir "
                          f"holding them")
    if path.name.startswith("checkpoint_") and path.name.split("_", 1)[1].isdigit():
        if not (path / "commit_success.txt").exists() and not (path / "_CHECKPOINT_METADATA").exists():
            raise MissingPath(f"{path} is not a complete jaxsft checkpoint (no orbax metadata in it)")
        return path.parent, int(path.name.split("_", 1)[1])
    step = Checkpoints(path, async_save=False).latest_step()
    if step is None:
        raise MissingPath(f"no complete checkpoint found in {path}")
    return path, step


def _abstract(item_dir: Path):
    """Restore target from the saved metadata, on the host CPU (orbax restores flat dicts whose keys
    hold '/' wrongly without a target); {} for an item the checkpoint does not hold (full fine-tuning
    saves no `frozen`)."""
    if not item_dir.is_dir():
        return {}
    tree = _item_tree(item_dir)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)


def holds_optimizer_state(directory: str | Path, step: int) -> bool:
    """False for a checkpoint written with `save_only_model: true` (params, step and data position only)."""
    step_dir = Path(directory) / f"checkpoint_{step}"
    item = step_dir / (LEGACY_STATE if (step_dir / LEGACY_STATE).is_dir() else "optimizer")
    with Checkpoints(directory, async_save=False)._reading(step):
        tree = _item_tree(item)
    return "opt_state" in tree


def model_only(state: dict) -> dict:
    """The train state as `save_only_model` saves it: everything but the optimizer state."""
    return {k: v for k, v in state.items() if k != "opt_state"}


def read_trained_params(path: str | Path) -> tuple[dict, Config]:
    """(param tree with trainable and frozen parts merged back, the run's config), on the host; no optimizer."""
    directory, step = find_checkpoint(path)
    checkpoints = Checkpoints(directory, async_save=False)
    step_dir = directory / f"checkpoint_{step}"
    try:
        trainable_item = step_dir / (LEGACY_STATE if checkpoints.is_legacy(step) else "trainable")
        abstract = _abstract(trainable_item)
        abstract = abstract["trainable"] if checkpoints.is_legacy(step) else abstract
        trainable, frozen = checkpoints.restore_params(step, abstract, _abstract(step_dir / "frozen"))
        partition = checkpoints.restore_partition(step)
        values = checkpoints.restore_config(step)
    finally:
        checkpoints.close()
    from jaxsft.params import freeze_partition, merge

    cfg = Config(**{k: v for k, v in values.items() if k in FIELDS})
    if partition is None and cfg.finetuning_type == "freeze":  # the earlier layout kept no partition
        from jaxsft.model.hf import load_hf_config
        partition = freeze_partition({**frozen, **trainable}, cfg, load_hf_config(cfg.model_name_or_path).num_layers)
    elif partition is None:  # full and LoRA: trainable and frozen hold whole leaves
        partition = Partition(trainable=frozenset(trainable))
    return merge(trainable, frozen, partition), cfg


def trained_lora_scale(cfg: Config) -> float:
    """The scale the run trained with: a resumed PEFT adapter keeps its own r/alpha, else the config's."""
    from jaxsft.lora import adapter_scale, lora_scale, read_adapter_config

    if cfg.adapter_name_or_path and not cfg.create_new_adapter:
        return adapter_scale(read_adapter_config(Path(cfg.adapter_name_or_path)))
    return lora_scale(cfg.lora_alpha, cfg.lora_rank, cfg.use_rslora)
