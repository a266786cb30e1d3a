"""malloc_jax: memory-aware compression of the per-user KV caches of sequential recommenders."""

from malloc_jax import cache, compressors, models
from malloc_jax.cache import Cache, Signals

__version__ = "0.1.0"
__all__ = ["Cache", "Signals", "cache", "compressors", "models"]
