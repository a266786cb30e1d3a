"""Checkpoints with Orbax: training state (resumable) and batches of compressed memories.

This is the only module that imports orbax. One ``CheckpointManager`` per directory; items
are saved as an ``ocp.args.Composite`` and restored against abstract trees. Orbax writes each
step to a temporary directory and renames it when complete, so a killed save leaves the
previous steps intact; a committed step that fails to restore (corrupted files) is reported
and the previous good step is used, never a silent restart from scratch. A save that fails in
the background (a full disk) is waited for before the next save, at ``wait`` and at
``close``, and reported as one :class:`CheckpointError` naming the directory and the last
complete step, which stays on disk (Orbax's own tracebacks of that failure are not repeated).

:func:`workdir_lock` is the one exclusive lock of a run directory (``flock``), so that two
processes never train into the same checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
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
    self._pending: int | None = None  # the step whose async save may still be running
    self._filter = _SaveErrorFilter(str(self.directory))
    logging.getLogger("absl").addFilter(self._filter)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an async save of ``step``, after the previous save has finished (or failed)."""
    self._finish()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._pending = step

  def _finish(self) -> None:
    """Waits for the pending async save; raises one CheckpointError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - any background failure is reported as one error
      kept = [s for s in self.manager.all_steps() if s != step]
      logging.getLogger("absl").removeFilter(self._filter)
      raise CheckpointError(
          f"saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
          f"{_first_line(e)}); is the disk full? The last complete checkpoint "
          + (f"(step {max(kept)}) is kept" if kept else "does not exist")
          + "; free space and rerun to resume from it.") from None

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
    self._finish()

  def close(self) -> None:
    try:
      self._finish()
    finally:
      logging.getLogger("absl").removeFilter(self._filter)
      with contextlib.suppress(Exception):  # a failed save was reported by _finish
        self.manager.close()


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return text[:limit]


class _SaveErrorFilter(logging.Filter):
  """Drops Orbax's ERROR records (with tracebacks) about a failed save into ``directory``.

  Orbax logs the same background failure from several threads; TrainCheckpoints reports it
  once, as a CheckpointError, so these repeats are noise.
  """

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return self.directory not in text and "Save Finalize thread" not in text


class WorkdirBusyError(RuntimeError):
  """Another process holds a run directory's lock."""


@contextlib.contextmanager
def workdir_lock(directory: str | os.PathLike, what: str = "run"):
  """Holds an exclusive ``flock`` on ``directory/LOCK`` for the body of the ``with``.

  Args:
    directory: the run directory (created if missing).
    what: what takes the lock, for the message (e.g. "train_and_evaluate").

  Raises:
    WorkdirBusyError: another process holds the lock; names the directory and, when it
      wrote them, the holder's pid, host and start time.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / "LOCK"
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 300, 0).decode(errors="replace").strip()
    os.close(fd)
    raise WorkdirBusyError(
        f"workdir {directory} is in use by another process ({path} is locked"
        + (f" by {holder}" if holder else "") + "); wait for it to finish or use another "
        "--workdir") from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{what}, pid {os.getpid()}, host {os.uname().nodename}, since "
              f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # releases the flock


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
  if not directory.is_dir():  # a reader must not create the directory it was pointed at
    raise CheckpointError(f"{directory}: no saved memories (no such directory)")
  with ocp.CheckpointManager(directory, item_names=("memory", "meta")) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise CheckpointError(f"{directory}: no saved memories")
    out = mgr.restore(step, args=ocp.args.Composite(
        memory=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore()))
  return out["memory"], dict(out["meta"])


def load_memories_meta(directory: str | os.PathLike) -> dict:
  """The meta of the newest :func:`save_memories` in ``directory`` (the arrays are not read)."""
  directory = Path(directory).absolute()
  if not directory.is_dir():  # a reader must not create the directory it was pointed at
    raise CheckpointError(f"{directory}: no saved memories (no such directory)")
  with ocp.CheckpointManager(directory, item_names=("memory", "meta")) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise CheckpointError(f"{directory}: no saved memories")
    out = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(out["meta"])


def load_best_params(workdir: str | os.PathLike) -> tuple[dict, dict]:
  """The best-validation parameters of a finished (or running) training workdir.

  Returns (params as a nested dict of NumPy arrays, the checkpoint's meta). Raises
  CheckpointError naming the directory when it holds no readable step.
  """
  directory = (Path(workdir) / "checkpoints").absolute()
  if not directory.is_dir():
    raise CheckpointError(f"train.init_from={str(workdir)!r}: {directory} does not exist "
                          "(expected the --workdir of a training run)")
  with ocp.CheckpointManager(directory, item_names=("state", "meta")) as mgr:
    errors = []
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
        return out["state"]["best"], dict(out["meta"])
      except Exception as e:  # noqa: BLE001 - fall back to the previous step, reported
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
  raise CheckpointError(f"train.init_from: no readable checkpoint in {directory}"
                        + (" (" + "; ".join(errors) + ")" if errors else ""))
