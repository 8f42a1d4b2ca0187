"""Orbax checkpoints of everything a run needs to continue exactly.

A checkpoint `output_dir/checkpoint_<step>/` holds: `state` (step, trainable params, optimizer state,
RNG), `frozen` (the frozen params, so export works from any checkpoint), `data` (the grain iterator
state) and `config` (the resolved config). Orbax writes into a temporary directory and renames it on
success, so a save killed halfway leaves nothing that `latest_step` would pick up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "frozen", "data", "config")


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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, frozen: dict, data_state: dict, config: dict) -> None:
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state),
                 "config": ocp.args.JsonSave(config)}
        if frozen:  # full fine-tuning has nothing frozen (orbax refuses empty items)
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, abstract_frozen: Any) -> dict[str, Any]:
        """Restore onto the shardings carried by the abstract trees (jax.ShapeDtypeStruct leaves)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore(),
                 "config": ocp.args.JsonRestore()}
        if abstract_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {name: restored[name] if name in items else {} for name in ITEMS}

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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
        raise FileNotFoundError(f"no complete checkpoint found in {path}")
    return path, step
