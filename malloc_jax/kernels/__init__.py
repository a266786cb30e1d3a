"""Pallas kernels of the compressed reads (see malloc_jax.reads for the jnp versions)."""

from malloc_jax.kernels.pallas_reads import (
    kivi_read,
    kivi_rows_read,
    lowrank_read,
    rows_read,
    uniform_read,
)

__all__ = ["kivi_read", "kivi_rows_read", "lowrank_read", "rows_read", "uniform_read"]
