r"""Command line: ``python -m malloc_jax.main --config configs/default.py[:k=v,...]``.

Parses flags and calls :func:`malloc_jax.experiment.train_and_evaluate`; nothing else lives
here, so a notebook can call the same function.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from malloc_jax import experiment, logging_setup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, results). Default: runs/<config name>.")


def main(argv):
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir is None:
    spec = flags.FLAGS["config"].config_filename
    name = Path(spec.split(":")[0]).stem
    suffix = spec.split(":", 1)[1].replace(",", "_").replace("=", "-") if ":" in spec else ""
    workdir = os.path.join("runs", name + (f"_{suffix}" if suffix else ""))
  experiment.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
