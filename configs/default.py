r"""Default run: HSTU on the built-in synthetic long histories; native vs 4x low-rank memory.

  python -m malloc_jax.main --config configs/default.py
  python -m malloc_jax.main --config configs/default.py:model=sasrec,steps=300 --workdir /tmp/run

``get_config(arg)`` takes comma-separated ``key=value`` pairs (see ``malloc_jax/config_lib.py``):
model (hstu|sasrec), steps, data (synthetic|ml-100k|ml-1m|recbole|sasrec), path, runlocal
(tiny shapes for a smoke test), negatives (batch|user|position: which predictions share a draw
of the sampled-softmax negatives, ``train.negative_sharing``). Any field can also be set with absl: --config.train.lr=3e-4.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg)
  config.compressors.lowrank_4x = {"name": "lowrank", "reduction": 4, "rank": 0}
  return config
