"""What the runner needs to know about a backbone, declared once next to its class.

Every backbone module ends with ``SPECS = (VariantSpec(...), ...)``: the native HSTU and
SASRec, and each trained attention variant. ``malloc_jax.models.BACKBONES``, the FLOPs closed
form of ``malloc_jax.costs``, the sweep's granularity column and the tests' small options all
read these specs; adding a variant is adding its module (or a class and a spec to one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """One backbone.

  Attributes:
    name: the config name (``model.name``), e.g. "hstu_gqa".
    model: the class (``model(num_items, rngs=..., **options)``).
    granularity: what its memory saves on (DESIGN.md's catalogue: "none" for the native
      backbones, else "token", "head", "layer", "sequence" or "architecture").
    flops: ``(model, *, batch, cached, request) -> dict`` closed-form FLOPs of a serving
      request (see :mod:`malloc_jax.flops`), or None.
    reference: the paper it implements.
    test_options: small valid constructor options for tests (dim 16 or more, max_len 32 or
      more), so that a new variant joins every variant test.
  """

  name: str
  model: type
  granularity: str
  flops: Callable[..., dict] | None
  reference: str
  test_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
