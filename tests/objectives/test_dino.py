"""DINO objective wired into the shared trainer: EMA teacher, centering, frozen last layer."""
import os

import flax
import jax
import numpy as np
import pytest

from medfm_jax import objectives
from medfm_jax.data import pipeline
from medfm_jax.objectives import dino_losses
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import loop, optim
from medfm_jax.train import state as state_lib
from tests import helpers


def _config(**overrides):
  return helpers.tiny_dino_config(**overrides)


def test_step_updates_teacher_by_ema_center_and_keeps_last_layer_frozen():
  config = _config(**{"objective.teacher_temp": 0.07})   # warmup_teacher_temp 0.04 -> 0.07
  objective = objectives.build(config)
  tx = optim.make_optimizer(config, None, **objective.optimizer_kwargs())
  batch = next(pipeline.make_train_iterator(config.data, config.batch_size, config.seed))
  assert batch["global"].shape == (8, 2, 16, 16, 1) and batch["local"].shape == (8, 2, 8, 8, 1)
  _, state = state_lib._boxed_init(objective, tx, 0, batch)  # pylint: disable=protected-access
  step = jax.jit(state_lib.make_train_step(objective, tx, config))
  s1, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < np.log(64) + 1
  m = float(dino_losses.cosine_schedule(0, config.total_steps, 0.996, 1.0))
  kernel = lambda p: p["backbone"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  np.testing.assert_allclose(kernel(s1.extra["teacher"]),
                             m * kernel(state.extra["teacher"]) + (1 - m) * kernel(s1.params), atol=1e-7)
  # Last layer: no update and no weight decay during the first freeze_last_layer_steps (the
  # backbone moves from step 1 on; the lr of step 0 is 0 at the start of the warmup).
  v = lambda s: s.params["head"]["last_layer"]["v"]
  s2, _ = step(s1, batch)
  assert not np.array_equal(kernel(s2.params), kernel(state.params))
  np.testing.assert_array_equal(v(s2), v(state))
  s3, _ = step(s2, batch)
  assert not np.array_equal(v(s3), v(state))
  # Center: m_c * 0 + (1 - m_c) * mean of the teacher's logits over both global views and the
  # batch; the teacher temperature starts at warmup_teacher_temp.
  o = config.objective
  views = batch["global"].reshape(-1, *batch["global"].shape[2:])
  logits = jax.jit(objective.model.apply)({"params": state.extra["teacher"]}, views)["logits"]
  np.testing.assert_allclose(s1.extra["center"], (1 - o.center_momentum) * np.mean(logits, axis=0),
                             rtol=1e-5, atol=1e-6)
  assert float(np.linalg.norm(s1.extra["center"])) > 0
  assert float(metrics["teacher_temp"]) == pytest.approx(o.warmup_teacher_temp) != o.teacher_temp


def test_collapse_warning_names_ln_k():
  objective = objectives.build(_config())
  assert objective.warnings({"loss": 2.0, "teacher_entropy": 1.0}) == []
  (message,) = objective.warnings({"loss": float(np.log(64)), "teacher_entropy": 0.01})
  assert "ln K = 4.159" in message and "collapsed" in message


def test_after_update_is_ema_with_cosine_momentum():
  """teacher <- m t + (1 - m) s, m = 1 - (1 - m0) (1 + cos(pi k / T)) / 2: m0 at step 0, 1 at T
  (float64 reference; the train step itself cannot show it: lr(0) = 0 leaves student = teacher)."""
  config = _config(total_steps=100)
  m0 = config.objective.momentum_teacher
  assert 0.9 < m0 < 1.0
  objective = objectives.build(config)
  rng = np.random.default_rng(0)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  teacher = {"a": f32(3, 4), "b": {"c": f32(5)}}
  student = jax.tree.map(lambda t: t + f32(*t.shape), teacher)
  center = f32(64)
  for step in (0, 30, 100, 150):
    out = objective.after_update(student, {"teacher": teacher, "center": center}, step)
    m = 1.0 - (1.0 - m0) * (1.0 + np.cos(np.pi * min(step, 100) / 100)) / 2.0
    for got, t, s in zip(jax.tree.leaves(out["teacher"]), jax.tree.leaves(teacher), jax.tree.leaves(student),
                         strict=True):
      np.testing.assert_allclose(got, m * t.astype(np.float64) + (1.0 - m) * s, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["center"], center)


@pytest.fixture(scope="module")
def dinov2_runs(tmp_path_factory):
  """2 steps of DINOv2 (iBOT separate head + KoLeo + Sinkhorn-Knopp) on fsdp=8 and on 1 device."""
  config = helpers.tiny_dino_config("tiny_v2", total_steps=2, checkpoint_every=2)
  assert config.objective.centering == "sinkhorn_knopp" and config.objective.ibot_separate_head
  runs = {}
  for name, shape in (("eight", {"data": 1, "fsdp": 8, "tensor": 1}), ("one", {"data": 1, "fsdp": 1, "tensor": 1})):
    workdir = str(tmp_path_factory.mktemp(name))
    mesh = mesh_lib.make_mesh(shape, jax.devices()[:1] if name == "one" else None)
    runs[name] = (workdir, loop.train(config, workdir, mesh))
  return runs


def test_dinov2_teacher_sharded_like_student_with_knn_and_attention_maps(dinov2_runs):
  workdir, state = dinov2_runs["eight"]
  assert "ibot_head" in state.params and "mask_token" in state.params["backbone"]
  kernel = lambda p: p["backbone"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  assert kernel(state.params).sharding.spec[0] == "fsdp"
  assert kernel(state.extra["teacher"]).sharding.spec == kernel(state.params).sharding.spec
  metrics = helpers.read_metrics(workdir)
  train = [m for m in metrics if "loss" in m]
  assert len(train) == 2 and all(m["ibot_loss"] > 0 and m["masked_fraction"] > 0 for m in train)
  assert all(np.isfinite(m["koleo_loss"]) and m["teacher_entropy"] > 0 for m in train)
  knn_acc = [m["eval/knn_modality_acc"] for m in metrics if "eval/knn_modality_acc" in m]
  assert len(knn_acc) == 2 and all(0.0 <= a <= 1.0 for a in knn_acc)     # at step 0 and at the end
  assert sorted(os.listdir(os.path.join(workdir, "attention"))) == ["step_0000000.png", "step_0000002.png"]


def test_dinov2_trains_identically_on_one_and_eight_devices(dinov2_runs):
  (w8, eight), (w1, one) = dinov2_runs["eight"], dinov2_runs["one"]
  m8, m1 = ([m for m in helpers.read_metrics(w) if "loss" in m] for w in (w8, w1))
  for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
    np.testing.assert_allclose([m[key] for m in m8], [m[key] for m in m1], rtol=2e-5, atol=2e-5)
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_dinov2_lr_multipliers_layerwise_and_patch_embed():
  objective = objectives.build(helpers.tiny_dino_config("tiny_v2"))
  params = jax.eval_shape(objective.init, jax.random.PRNGKey(0),
                          {"global": jax.ShapeDtypeStruct((2, 2, 16, 16, 1), np.float32)})[0]
  mult = objective.optimizer_kwargs()["lr_multipliers"](flax.linen.unbox(params))
  depth = objective.model.backbone.size.depth
  assert mult["head"]["mlp_0"]["kernel"] == 1.0
  np.testing.assert_allclose(mult["backbone"]["encoder"][f"layer_{depth - 1}"]["attn"]["query"]["kernel"], 0.9)
  np.testing.assert_allclose(mult["backbone"]["patch_embed"]["proj"]["kernel"], 0.2 * 0.9 ** (depth + 1))
