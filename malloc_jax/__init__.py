"""malloc_jax: memory-aware compression of the per-user KV caches of sequential recommenders.

Subpackages load on first use, so ``import malloc_jax.data`` loads no model, compressor or
storage code: ``malloc_jax.compressors``, ``malloc_jax.models``, ``malloc_jax.MemoryBank``
and the rest are imported when first accessed.
"""

import importlib

__version__ = "0.1.0"
_SUBMODULES = ("cache", "compressors", "data", "models", "serving")
_NAMES = {"BankCorruptedError": "malloc_jax.bank", "MemoryBank": "malloc_jax.bank",
          "Cache": "malloc_jax.cache", "Signals": "malloc_jax.cache"}
__all__ = ["BankCorruptedError", "Cache", "MemoryBank", "Signals", "cache", "compressors",
           "data", "models", "serving"]


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(_NAMES[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
