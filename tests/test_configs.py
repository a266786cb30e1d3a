"""Every registered method has a config file, and every config file parses and validates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from malloc_jax import compressors as C
from malloc_jax.config_validation import validate_config
from malloc_jax.experiment import resolve_compressors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"_config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_registered_method_has_a_config():
  missing = [n for n in C.specs() if not (CONFIGS / f"{n}.py").is_file()]
  assert not missing, f"no configs/<method>.py for {missing}"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")
                                        if p.stem != "sweep"))
def test_run_config_parses_and_validates(name):
  module = load(name)
  assert "python -m malloc_jax.main --config configs/" in module.__doc__
  for arg in ("", "runlocal=True"):
    config = module.get_config(arg)
    validate_config(config)
    resolve_compressors(config)


@pytest.mark.parametrize("name", [n for n, s in C.specs().items() if s.tuned])
def test_method_config_resolves_the_ratio(name):
  """``configs/<method>.py:ratio=r`` keeps the method's memory within native / r bytes."""
  ratio = 1.5
  config = load(name).get_config(f"runlocal=True,ratio={ratio}")
  (label, (method, params)), = [kv for kv in resolve_compressors(config).items()
                                if kv[0] != "native"]
  assert method == name and "ratio" not in params
  m = config.model
  cache = C.cache_spec(m.num_layers, m.heads, config.data.max_len, m.dim // m.heads)
  assert C.memory_bytes(name, cache, **params) <= C.memory_bytes("native", cache) / ratio
  with pytest.raises(ValueError, match=f"config.compressors.{label}"):
    config.compressors[label].ratio = 0.5
    resolve_compressors(config)
