"""``train.init_from``: a run starts from another workdir's best weights (warm start)."""

import jax
import numpy as np
import pytest
from flax import nnx

from malloc_jax import config_lib, experiment
from malloc_jax.checkpoint import CheckpointError, load_best_params


def _config(max_len=16, **train):
  c = config_lib.base_config("runlocal=True,steps=4")
  c.data.max_len = max_len
  c.train.update(eval_every=2, checkpoint_every=2, eval_users=16, patience=0, **train)
  return c


def _flat(state):
  import jax
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


def test_warm_start_copies_best_weights_and_grows_position_tables(tmp_path):
  quiet = lambda s: None
  src_cfg = _config(max_len=16)
  data = experiment.load_data(src_cfg)
  experiment.check_workdir(tmp_path / "src", src_cfg)
  experiment.train_model(src_cfg, tmp_path / "src", data, quiet)
  source, meta = load_best_params(tmp_path / "src")
  assert meta["best_step"] > 0

  # Same shapes: every leaf equals the source's best weights (the independent reference:
  # the checkpoint read back as plain NumPy).
  from malloc_jax.train import Trainer, make_optimizer
  model = experiment.build_model(src_cfg, data.num_items)
  params = Trainer(model, make_optimizer(1e-3, 0.0), 8).init_state["params"]
  same, extended = experiment.warm_start(params, source)
  assert extended == []
  got = _flat(same)
  for name, value in got.items():
    node = source
    for k in name.split("/"):
      node = node[k]
    np.testing.assert_array_equal(value, np.asarray(node.get("value", node)
                                                    if isinstance(node, dict) else node))

  # A longer capacity: position tables grow along their position axis; the leading part is
  # the source, the rest repeats the source's farthest position; every other leaf is copied.
  big = _config(max_len=40)
  model = experiment.build_model(big, data.num_items)
  params = Trainer(model, make_optimizer(1e-3, 0.0), 8).init_state["params"]
  grown, extended = experiment.warm_start(params, source)
  assert extended, "the capacity-40 model has larger position tables"
  for name, value in _flat(grown).items():
    node = source
    for k in name.split("/"):
      node = node[k]
    src = np.asarray(node["value"] if isinstance(node, dict) else node)
    if src.shape == value.shape:
      np.testing.assert_array_equal(value, src)
      continue
    axis = [a for a in range(src.ndim) if src.shape[a] != value.shape[a]]
    assert len(axis) == 1 and value.shape[axis[0]] == 40 and src.shape[axis[0]] == 16, name
    a = axis[0]
    np.testing.assert_array_equal(np.take(value, range(16), axis=a), src)
    tail = np.take(value, range(16, 40), axis=a)
    np.testing.assert_array_equal(tail, np.broadcast_to(np.take(src, [15], axis=a), tail.shape))

  # A warm-started training run reads the source and trains on from it.
  big.train.init_from = str(tmp_path / "src")
  lines = []
  experiment.check_workdir(tmp_path / "big", big)
  experiment.train_model(big, tmp_path / "big", data, lines.append)
  assert any(line.startswith(f"initialized from {tmp_path / 'src'}") for line in lines), lines


def test_warm_start_refuses_other_shapes_and_missing_sources(tmp_path):
  cfg = _config(max_len=16)
  data = experiment.load_data(cfg)
  from malloc_jax.train import Trainer, make_optimizer
  model = experiment.build_model(cfg, data.num_items)
  params = Trainer(model, make_optimizer(1e-3, 0.0), 8).init_state["params"]
  source = nnx.to_pure_dict(params)
  source["item_emb"]["embedding"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="item_emb/embedding"):
    experiment.warm_start(params, source)
  del source["item_emb"]
  with pytest.raises(ValueError, match="no parameter 'item_emb"):
    experiment.warm_start(params, source)
  with pytest.raises(CheckpointError, match="init_from"):
    load_best_params(tmp_path / "nowhere")


def test_partial_warm_start_converts_a_trained_model_into_a_variant():
  """``kept=`` (variant uptraining): every leaf of the same shape is the source's, a
  single-head rab table fills every head, and a projection of another shape keeps its init
  and is listed, never padded."""
  from malloc_jax.models import make_model
  src_model = make_model("hstu", 30, dim=8, heads=1, num_layers=1, max_len=12, dropout=0.0,
                         seed=1)
  source = nnx.to_pure_dict(nnx.state(src_model, nnx.Param))
  source = jax.tree.map(np.asarray, source)
  strkeys = lambda d: {str(k): strkeys(v) for k, v in d.items()} if isinstance(d, dict) else d
  target = make_model("hstu_gqa", 30, dim=8, heads=4, kv_heads=2, num_layers=1, max_len=12,
                      dropout=0.0, seed=2)
  params = nnx.state(target, nnx.Param)
  init = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  kept = []
  new, extended = experiment.warm_start(params, strkeys(source), kept=kept)
  out = jax.tree.map(np.asarray, nnx.to_pure_dict(new))
  np.testing.assert_array_equal(out["item_emb"]["embedding"], source["item_emb"]["embedding"])
  np.testing.assert_array_equal(out["rank_head"]["kernel"], source["rank_head"]["kernel"])
  layer, src_layer, init_layer = out["layers"][0], source["layers"][0], init["layers"][0]
  np.testing.assert_array_equal(layer["rab_pos"], np.repeat(src_layer["rab_pos"], 4, axis=0))
  np.testing.assert_array_equal(layer["ln"]["scale"], src_layer["ln"]["scale"])
  np.testing.assert_array_equal(layer["uvqk"]["kernel"], init_layer["uvqk"]["kernel"])
  assert any(k.startswith("layers/0/uvqk/kernel") for k in kept)
  assert "layers/0/rab_pos (1, 12) -> (4, 12)" in extended
  with pytest.raises(ValueError, match="uvqk"):  # without kept= the same source is refused
    experiment.warm_start(params, strkeys(source))


def test_rab_recipe_fields_train_faster_rab_and_keep_old_workdirs(tmp_path):
  """``train.bias_lr_scale`` and ``train.rank_score_offset`` reach the ranking trainer: after
  one step (Adam's first update is lr · sign(g), closed form) the rab tables moved
  ``bias_lr_scale`` times as far as at scale 1 from the same init (``rank_score_offset``),
  every other parameter equally; a workdir whose train_config predates the two fields
  resumes when they are at their defaults and is refused when one is set."""
  import importlib.util
  import json
  from pathlib import Path

  spec = importlib.util.spec_from_file_location(
      "_rs", Path(__file__).resolve().parents[1] / "configs" / "ranking_synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def run(scale, name):
    c = module.get_config("runlocal=True,model=hstu,steps=1")
    c.train.update(steps=1, bias_lr_scale=scale, rank_score_offset=-3.0, eval_every=0,
                   checkpoint_every=1, weight_decay=0.0)
    experiment.check_workdir(tmp_path / name, c)
    model, _ = experiment.train_model(c, tmp_path / name, experiment.load_data(c),
                                      print_fn=lambda *a, **k: None)
    return c, _flat(nnx.state(model, nnx.Param))

  c1, one = run(1.0, "a")
  _, seven = run(7.0, "b")
  init_model = experiment.build_model(c1, experiment.load_data(c1).num_items)
  from malloc_jax.train import tie_query_key_init
  tie_query_key_init(init_model, -3.0)
  init = _flat(nnx.state(init_model, nnx.Param))
  for name, p0 in init.items():
    d1, d7 = one[name] - p0, seven[name] - p0
    if "rab_pos" in name or "rab_time" in name:
      np.testing.assert_allclose(d7, 7.0 * d1, rtol=1e-4, atol=1e-7, err_msg=name)
      assert np.abs(d1).max() > 0, name
    else:
      np.testing.assert_allclose(d7, d1, rtol=1e-4, atol=1e-7, err_msg=name)
  # An older workdir's train_config has neither field.
  saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
  for k in ("bias_lr_scale", "rank_score_offset"):
    saved["train"].pop(k)
  (tmp_path / "a" / "train_config.json").write_text(json.dumps(saved))
  c1.train.update(bias_lr_scale=1.0, rank_score_offset=0.0)
  experiment.check_workdir(tmp_path / "a", c1)  # defaults: accepted
  c1.train.bias_lr_scale = 30.0
  with pytest.raises(ValueError, match="differs in: .*train"):
    experiment.check_workdir(tmp_path / "a", c1)


def test_memories_meta_round_trip_and_missing_directory_is_not_created(tmp_path):
  """``checkpoint.load_memories_meta`` (what ``ranking_table.py --backbone`` checks first)
  returns the newest save's meta; a missing directory is an error and is not created."""
  from malloc_jax.checkpoint import load_memories, load_memories_meta, save_memories
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  save_memories(tmp_path / "bb", tree, {"settings": {"length": 32}})
  save_memories(tmp_path / "bb", tree, {"settings": {"length": 64}})
  assert load_memories_meta(tmp_path / "bb") == {"settings": {"length": 64}}
  got, meta = load_memories(tmp_path / "bb", tree)
  np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"])
  for fn in (load_memories_meta, lambda d: load_memories(d, tree)):
    with pytest.raises(CheckpointError, match="no such directory"):
      fn(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
