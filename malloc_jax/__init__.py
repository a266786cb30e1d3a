"""malloc_jax: memory-aware compression of the per-user KV caches of sequential recommenders."""

from malloc_jax import cache, compressors, models
from malloc_jax.bank import BankCorruptedError, MemoryBank
from malloc_jax.cache import Cache, Signals

__version__ = "0.1.0"
__all__ = ["BankCorruptedError", "Cache", "MemoryBank", "Signals", "cache", "compressors",
           "models"]
