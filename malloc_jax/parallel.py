"""Data parallelism: a one-axis device mesh with the user batch sharded, parameters replicated.

Training, evaluation and calibration shard every batch of users along a ``"batch"`` mesh axis
and keep parameters, optimizer state and shared compressor state (low-rank bases) replicated;
``jax.jit`` inserts the gradient all-reduce and the rest. Nothing in the models or compressors
knows about devices.

* ``num_devices=0`` (the default everywhere) uses every device JAX sees: all local devices
  in one process, all devices of all hosts after ``jax.distributed.initialize()``.
* With one device (or ``num_devices=1``) :func:`data_mesh` returns ``None`` and every helper
  here is the plain single-device path: arrays are built with ``jnp.asarray`` as before, so
  results are bit-identical to code that never heard of meshes.
* Multi-host: every host builds the same dataset and computes the same global batch indices
  (they are a pure function of step and seed); :func:`shard_batch` then lets each host
  materialize only the rows of its own devices, and :func:`to_host` all-gathers results
  (ranks) so every host computes the same metrics.

The mesh is built with ``AxisType.Auto`` (sharding propagated by XLA): with JAX's default
explicit axes, gathers from a replicated embedding table by sharded ids need explicit
out-shardings.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"


def data_mesh(num_devices: int = 0) -> Mesh | None:
  """A 1-D ``("batch",)`` mesh over ``num_devices`` devices (0: all), or None for one device.

  Args:
    num_devices: devices to shard over; 0 uses ``jax.devices()`` (every local device, and
      every host's devices after ``jax.distributed.initialize()``).

  Returns:
    The mesh, or None when only one device is used (the unsharded single-device path).

  Raises:
    ValueError: ``num_devices`` is negative or more than the devices available, or a subset
      of the devices is asked for in a multi-host run.
  """
  devices = jax.devices()
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 0:
    raise ValueError(f"config.num_devices={num_devices!r}: expected an integer >= 0 "
                     "(0: all devices)")
  if num_devices > len(devices):
    raise ValueError(f"config.num_devices={num_devices}: only {len(devices)} device(s) "
                     f"available ({devices[0].platform})")
  n = num_devices or len(devices)
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"config.num_devices={num_devices}: a multi-host run ({jax.process_count()}"
                     f" processes) must use all {len(devices)} devices (0)")
  if n == 1:
    return None
  return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def num_shards(mesh: Mesh | None) -> int:
  """Devices the batch is split over (1 without a mesh)."""
  return 1 if mesh is None else mesh.size


def padded_batch_size(batch_size: int, mesh: Mesh | None) -> int:
  """``batch_size`` rounded up to a multiple of the device count (for masked padding)."""
  n = num_shards(mesh)
  return math.ceil(batch_size / n) * n


def check_batch_size(batch_size: int, mesh: Mesh | None, field: str) -> None:
  """Raises ValueError naming ``field`` unless ``batch_size`` divides over the devices."""
  n = num_shards(mesh)
  if batch_size % n:
    raise ValueError(f"config.{field}={batch_size} is not divisible by the {n} devices the "
                     f"batch is sharded over; use a multiple of {n} (e.g. "
                     f"{padded_batch_size(batch_size, mesh)}) or set config.num_devices")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (axis 0) split over the mesh, other axes whole."""
  return NamedSharding(mesh, P(AXIS))


def shard_batch(mesh: Mesh | None, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Places global host arrays ``[B, ...]`` on the devices, rows split over the mesh.

  Without a mesh this is ``jnp.asarray`` (the single-device path). A batch whose size does
  not divide over the devices is replicated instead (every device computes all of it), so
  callers may pass a short last batch. In a multi-host run every host passes the same global
  arrays and keeps only the rows of its own devices.
  """
  if mesh is None:
    return tuple(jnp.asarray(x) for x in arrays)
  out = []
  for x in arrays:
    x = np.asarray(x)
    sharding = (batch_sharding(mesh) if x.ndim and x.shape[0] % mesh.size == 0
                else NamedSharding(mesh, P()))
    out.append(_put(x, sharding))
  return tuple(out)


def replicate(mesh: Mesh | None, tree: Any) -> Any:
  """Copies a pytree (or an nnx module's state) onto every device of the mesh.

  Without a mesh the tree is returned unchanged. Arrays already replicated on the mesh are
  not copied.
  """
  if mesh is None:
    return tree
  from flax import nnx

  sharding = NamedSharding(mesh, P())
  if isinstance(tree, nnx.Module):
    graphdef, state = nnx.split(tree)
    return nnx.merge(graphdef, replicate(mesh, state))
  return jax.tree.map(lambda x: _put(x, sharding) if isinstance(x, jax.Array | np.ndarray)
                      else x, tree)


def _put(x, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Multi-host: x is the same global array on every host; each host fills its own devices.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly sharded) result as one NumPy array, all hosts' rows gathered."""
  if jax.process_count() == 1 or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh: Mesh | None) -> str:
  """One line for logs: how the batch is spread over devices."""
  if mesh is None:
    return f"1 device ({jax.devices()[0]})"
  hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return f"data parallel over {mesh.size} {mesh.devices.flat[0].platform} devices{hosts}"
