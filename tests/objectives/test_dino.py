"""DINO objective wired into the shared trainer: EMA teacher, centering, frozen last layer."""
import jax
import numpy as np

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
  config = _config()
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
  assert float(np.linalg.norm(s1.extra["center"])) > 0


def test_teacher_sharded_like_student_and_tiny_run_checkpoints(tmp_path):
  config = _config(**{"mesh": {"data": 1, "fsdp": 8, "tensor": 1}})
  mesh = mesh_lib.make_mesh(config.mesh)
  state = loop.train(config, str(tmp_path), mesh)
  student = state.params["backbone"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  teacher = state.extra["teacher"]["backbone"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  assert student.sharding.spec[0] == "fsdp" and teacher.sharding.spec == student.sharding.spec
  losses = [m["loss"] for m in helpers.read_metrics(str(tmp_path)) if "loss" in m]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert any(m.get("teacher_entropy", 0) > 0 for m in helpers.read_metrics(str(tmp_path)))
  knn_acc = [m["eval/knn_modality_acc"] for m in helpers.read_metrics(str(tmp_path)) if "eval/knn_modality_acc" in m]
  assert len(knn_acc) == 2 and all(0.0 <= a <= 1.0 for a in knn_acc)     # at step 0 and at the end


def test_collapse_warning_names_ln_k():
  objective = objectives.build(_config())
  assert objective.warnings({"loss": 2.0, "teacher_entropy": 1.0}) == []
  (message,) = objective.warnings({"loss": float(np.log(64)), "teacher_entropy": 0.01})
  assert "ln K = 4.159" in message and "collapsed" in message
