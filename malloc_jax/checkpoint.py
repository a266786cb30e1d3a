"""Checkpoints with Orbax: training state (resumable) and batches of compressed memories.

This is the only module that imports orbax. One ``CheckpointManager`` per directory; items
are saved as an ``ocp.args.Composite`` and restored against abstract trees. Orbax writes each
step to a temporary directory and renames it when complete, so a killed save leaves the
previous steps intact; a committed step that fails to restore (corrupted files) is reported
and the previous good step is used, never a silent restart from scratch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from malloc_jax.fileio import write_json_atomic  # noqa: F401 - re-exported


class CheckpointError(RuntimeError):
  """No step of a checkpoint directory could be restored."""


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class TrainCheckpoints:
  """Saves and restores ``{'state': pytree, 'meta': json}`` at training steps."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest readable step into the structure of ``target``.

    Returns (step, state, meta), or None if the directory holds no step. Raises
    CheckpointError if steps exist but none can be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
        if errors:
          logging.warning("checkpoint: fell back to step %d after: %s", step, "; ".join(errors))
        return step, out["state"], dict(out["meta"])
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous
        errors.append(f"step {step} in {self.directory} is unreadable ({type(e).__name__}: "
                      f"{str(e)[:200]})")
        logging.warning("%s", errors[-1])
    raise CheckpointError("no readable checkpoint: " + "; ".join(errors) +
                          ". Delete the directory to start over.")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_memories(directory: str | os.PathLike, memory: Any, meta: dict | None = None) -> None:
  """Saves a batch of users' compressed memories (any memory pytree) with Orbax."""
  directory = Path(directory).absolute()
  with ocp.CheckpointManager(directory, item_names=("memory", "meta"),
                             options=ocp.CheckpointManagerOptions(create=True)) as mgr:
    step = (mgr.latest_step() or 0) + 1
    mgr.save(step, args=ocp.args.Composite(memory=ocp.args.StandardSave(memory),
                                           meta=ocp.args.JsonSave(meta or {})))
    mgr.wait_until_finished()


def load_memories(directory: str | os.PathLike, like: Any) -> tuple[Any, dict]:
  """Restores the newest saved memories into the structure of ``like`` (arrays or shapes)."""
  directory = Path(directory).absolute()
  with ocp.CheckpointManager(directory, item_names=("memory", "meta")) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise CheckpointError(f"{directory}: no saved memories")
    out = mgr.restore(step, args=ocp.args.Composite(
        memory=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore()))
  return out["memory"], dict(out["meta"])
