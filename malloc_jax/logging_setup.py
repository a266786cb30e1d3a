"""One logging setup for every entry point: quiet by default, ``--verbosity`` to see more.

Every command line (``malloc_jax.main``, ``malloc_jax.sweep``, ``malloc_jax.report``,
``scripts/*.py``) calls :func:`setup` first thing in its ``main``. By default only warnings
and errors are logged: the INFO lines of absl, Orbax (``CheckpointManagerOptions(...)``
dumps, handler registrations) and JAX (the libtpu probe) are hidden; the programs' own
progress goes to stdout with ``print``. absl's own ``--verbosity`` flag (``-v``) shows more:
``--verbosity=0`` INFO, ``--verbosity=1`` DEBUG; ``--verbosity=-2`` errors only.
"""

from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging
from absl.logging import converter

__all__ = ["QUIET", "setup"]

QUIET = absl_logging.WARNING  # -1: warnings and errors only


def setup(verbosity: int | None = None) -> int:
  """Sets the log level of absl, Orbax, JAX and Python's root logger.

  Args:
    verbosity: absl verbosity (-3 fatal ... -1 warning, 0 info, 1 debug). None: the
      ``--verbosity`` / ``-v`` flag when it was given on the command line, else warnings only.

  Returns:
    The verbosity in effect.
  """
  if verbosity is None:
    given = "verbosity" in flags.FLAGS and flags.FLAGS.is_parsed() and \
        flags.FLAGS["verbosity"].present
    verbosity = flags.FLAGS.verbosity if given else QUIET
  absl_logging.set_verbosity(verbosity)
  # absl sets the root logger itself only when its handler is installed (under app.run).
  logging.getLogger().setLevel(converter.absl_to_standard(verbosity))
  return verbosity
