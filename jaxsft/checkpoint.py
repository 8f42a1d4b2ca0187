"""Orbax checkpoints of everything a run needs to continue exactly.

A checkpoint `output_dir/checkpoint_<step>/` holds: `state` (step, trainable params, optimizer state
unless `save_only_model`, RNG), `frozen` (the frozen params, so export works from any checkpoint),
`data` (the grain iterator state), `config` (the resolved config) and `progress` (the run's running
totals: tokens, examples, loss sum, runtime, so results after a resume cover the whole run; absent
from older checkpoints). Orbax writes into a temporary directory (`checkpoint_<step>.orbax-checkpoint-tmp`)
and renames it on success, so a save killed halfway leaves nothing that `latest_step` would pick up. A
save that fails for lack of disk space raises `DiskFull` naming the checkpoints that are intact; a
checkpoint that cannot be read raises `CorruptCheckpoint` naming it.
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

from jaxsft.errors import MissingPath, UserError

ITEMS = ("state", "frozen", "data", "config", "progress")


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


class Checkpoints:
    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, async_save: bool = True):
        self.directory = Path(directory).absolute()
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
            raise CorruptCheckpoint(f"checkpoint {self.directory / f'checkpoint_{step}'} cannot be read "
                                    f"({type(e).__name__}: {reason}); it is damaged or incomplete. Resume from "
                                    f"another checkpoint (here: {others}), or move it aside") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, frozen: dict, data_state: dict, config: dict,
             progress: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state),
                 "config": ocp.args.JsonSave(config)}
        if progress is not None:
            items["progress"] = ocp.args.JsonSave(progress)
        if frozen:  # full fine-tuning has nothing frozen (orbax refuses empty items)
            items["frozen"] = ocp.args.StandardSave(frozen)
        with self._writing(step):  # orbax first waits for the previous async save: its error surfaces here
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._pending = step

    def restore(self, step: int, abstract_state: Any, abstract_frozen: Any) -> dict[str, Any]:
        """Restore onto the shardings carried by the abstract trees (jax.ShapeDtypeStruct leaves)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore(),
                 "config": ocp.args.JsonRestore()}
        if abstract_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        if (self.directory / f"checkpoint_{step}" / "progress").is_dir():
            items["progress"] = ocp.args.JsonRestore()
        with self._reading(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {name: restored[name] if name in items else {} for name in ITEMS}

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
    if path.name.startswith("checkpoint_") and path.name.split("_", 1)[1].isdigit():
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
    tree = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)


def holds_optimizer_state(directory: str | Path, step: int) -> bool:
    """False for a checkpoint written with `save_only_model: true` (params, step and data position only)."""
    with Checkpoints(directory, async_save=False)._reading(step):
        tree = ocp.StandardCheckpointer().metadata(Path(directory) / f"checkpoint_{step}" / "state").item_metadata.tree
    return "opt_state" in tree


def model_only(state: dict) -> dict:
    """The train state as `save_only_model` saves it: everything but the optimizer state."""
    return {k: v for k, v in state.items() if k != "opt_state"}


def read_trained_params(path: str | Path) -> tuple[dict, Config]:
    """(param tree with trainable and frozen parts merged back, the run's config)."""
    directory, step = find_checkpoint(path)
    checkpoints = Checkpoints(directory, async_save=False)
    step_dir = directory / f"checkpoint_{step}"
    try:
        restored = checkpoints.restore(step, _abstract(step_dir / "state"), _abstract(step_dir / "frozen"))
    finally:
        checkpoints.close()
    from jaxsft.model.hf import load_hf_config
    from jaxsft.params import Partition, freeze_partition, merge

    values = {k: v for k, v in restored["config"].items() if k in FIELDS}
    cfg = Config(**values)
    trainable, frozen = restored["state"]["trainable"], restored["frozen"]
    if cfg.finetuning_type == "freeze":
        num_layers = load_hf_config(cfg.model_name_or_path).num_layers
        partition = freeze_partition({**frozen, **trainable}, cfg, num_layers)
    else:  # full and LoRA: trainable and frozen hold whole leaves
        partition = Partition(trainable=frozenset(trainable))
    return merge(trainable, frozen, partition), cfg


def trained_lora_scale(cfg: Config) -> float:
    """The scale the run trained with: a resumed PEFT adapter keeps its own r/alpha, else the config's."""
    from jaxsft.lora import adapter_scale, lora_scale, read_adapter_config

    if cfg.adapter_name_or_path and not cfg.create_new_adapter:
        return adapter_scale(read_adapter_config(Path(cfg.adapter_name_or_path)))
    return lora_scale(cfg.lora_alpha, cfg.lora_rank, cfg.use_rslora)
