"""DINO objective wired into the shared trainer: EMA teacher, centering, frozen last layer."""
import os

import flax
import jax
import numpy as np
import pytest

from medfm_jax import objectives
from medfm_jax.data import pipeline
from medfm_jax.metrics import feature_monitor, fewshot, knn
from medfm_jax.objectives import dino_losses
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import loop, optim
from medfm_jax.train import state as state_lib
from tests import helpers
from tests.metrics import test_fewshot, test_knn

pytestmark = pytest.mark.xdist_group("dino")   # module fixtures compile multi-device steps once


def _config(**overrides):
  return helpers.tiny_dino_config(**overrides)


@pytest.mark.slow   # ~18 CPU-s: compiles two DINO steps
@helpers.own_xdist_group   # uses no module fixture
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
def device_runners():
  """DINOv2 (iBOT separate head + KoLeo + Sinkhorn-Knopp, SGD): the train step compiled on
  fsdp=8, its 2-step run there, and the 1-device reference run."""
  config = helpers.tiny_dino_config("tiny_v2", **helpers.sgd_overrides())
  assert config.objective.centering == "sinkhorn_knopp" and config.objective.ibot_separate_head
  eight, reference = helpers.sharded_and_reference_runs(config, {"data": 1, "fsdp": 8, "tensor": 1})
  return eight, eight.run(), reference


@pytest.mark.slow
def test_dinov2_teacher_sharded_like_student_with_knn_and_attention_maps(device_runners, tmp_path, monkeypatch):
  eight, run, _ = device_runners
  state = run.state
  assert "ibot_head" in state.params and "mask_token" in state.params["backbone"]
  kernel = lambda p: p["backbone"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  assert kernel(state.params).sharding.spec[0] == "fsdp"
  assert len({s.data.shape for s in kernel(state.params).addressable_shards}) == 1
  assert kernel(state.extra["teacher"]).sharding.spec == kernel(state.params).sharding.spec
  assert all(m["ibot_loss"] > 0 and m["masked_fraction"] > 0 for m in run.metrics)
  assert all(np.isfinite(m["koleo_loss"]) and m["teacher_entropy"] > 0 and m["ibot_teacher_entropy"] > 0
             for m in run.metrics)
  # The eval hooks on the sharded teacher. kNN: the float64 reference's accuracies on the
  # features the hook classifies, with the labels read from the source.
  calls, real_knn = [], knn.knn_accuracy
  monkeypatch.setattr(knn, "knn_accuracy", lambda *a, **kw: calls.append((a, kw)) or real_knn(*a, **kw))
  with mesh_lib.use_mesh(eight.mesh):
    got = eight.objective.evaluate(state.params, state.extra, eight.mesh, 2)
    batch = mesh_lib.to_global_batch(next(iter(pipeline.make_eval_batches(
        eight.config.data, "val", 8, 8))), eight.mesh)
    eight.objective.eval_artifacts(state.params, state.extra, batch, jax.random.PRNGKey(0), str(tmp_path), 2)
  source = pipeline.make_source(eight.config.data, eight.config.data.eval_split)
  assert len(calls) == 2
  for (train_x, train_y, val_x, val_y, classes), kw in calls:
    name = {6: "finding", 4: "modality"}[classes]
    assert (len(train_x), len(val_x), kw["k"]) == (16, 8, 16)
    np.testing.assert_array_equal(val_y, [source[i][name] for i in range(8)])
    want = np.mean(test_knn.numpy_knn(train_x, train_y, val_x, classes, 16, 0.07).argmax(-1) == val_y)
    assert got[f"knn_{name}_acc"] == want, name
    # Few-shot: the nearest-centroid reference averaged over the monitor's episodes (1-shot needs
    # every class in the 16-image bank; 10-shot never fits, so it is left out).
    assert f"fewshot10_{name}_acc" not in got
    if np.bincount(train_y, minlength=classes).min() >= 1:
      centre = train_x.astype(np.float64).mean(0)
      accs = [np.mean(test_fewshot.reference_predictions(
          train_x[i], train_y[i], val_x, centre, classes) == val_y)
          for i in (fewshot.sample_shots(train_y, 1, classes, e) for e in range(feature_monitor.EPISODES))]
      np.testing.assert_allclose(got[f"fewshot1_{name}_acc"], np.mean(accs), atol=1e-12)
  assert "fewshot1_modality_acc" in got   # the 16-image bank holds every modality
  assert os.listdir(tmp_path / "attention") == ["step_0000002.png"]


@pytest.mark.slow
def test_dinov2_trains_identically_on_one_and_eight_devices(device_runners):
  _, run, reference = device_runners
  helpers.assert_same_training(run, reference, loss_atol=2e-5)


@pytest.mark.slow
def test_dinov2_device_equality_check_sees_gradient_scale(device_runners):
  eight, _, reference = device_runners
  helpers.assert_check_sees_gradient_scale(eight, reference, loss_atol=2e-5)


def test_dinov2_lr_multipliers_layerwise_and_patch_embed():
  objective = objectives.build(helpers.tiny_dino_config("tiny_v2"))
  params = jax.eval_shape(objective.init, jax.random.PRNGKey(0),
                          {"global": jax.ShapeDtypeStruct((2, 2, 16, 16, 1), np.float32)})[0]
  mult = objective.optimizer_kwargs()["lr_multipliers"](flax.linen.unbox(params))
  depth = objective.model.backbone.size.depth
  assert mult["head"]["mlp_0"]["kernel"] == 1.0
  np.testing.assert_allclose(mult["backbone"]["encoder"][f"layer_{depth - 1}"]["attn"]["query"]["kernel"], 0.9)
  np.testing.assert_allclose(mult["backbone"]["patch_embed"]["proj"]["kernel"], 0.2 * 0.9 ** (depth + 1))


# Per objective: the configs/dino.py variant of the CI-sized learning run and its overrides: 2
# blocks, batch 8, 16-px global crops, 400 steps (batch 16 separates more, 1-shot gains 0.178 ±
# 0.027 / 0.181 ± 0.027, at 1.5 times the CPU: docs/benchmark.md, part 6). DINOv2 (DINO + iBOT +
# KoLeo + Sinkhorn-Knopp + LayerScale) runs on tiny_spatial's tower, views and teacher momentum:
# tiny_v2's own 0.996 leaves the teacher mostly at its init in a short run.
_SPATIAL_VIEWS = {"model.patch_embed": "conv", "model.cls_pool": "max", "data.flip": False,
                  "data.multicrop.global_scale": (0.7, 1.0), "data.multicrop.num_local": 0,
                  "objective.momentum_teacher": 0.99}
LEARNING_RUNS = {"dino": ("tiny_spatial", {}), "dinov2": ("tiny_v2", _SPATIAL_VIEWS)}
LEARNING_STEPS = 400


def dino_learning_run(workdir, seed=0, objective="dino"):
  """The CI-sized run of ``objective`` (the scenario of the next test, re-measured per seed by
  ``tools/seed_spread.py --scenarios dino,dinov2``), with the frozen-feature monitor's bank and
  queries 512 images each: the eval metrics at step 0 (the random init) and at the end."""
  from configs import dino  # pylint: disable=g-import-not-at-top
  variant, overrides = LEARNING_RUNS[objective]
  steps = LEARNING_STEPS
  config = helpers.override(dino.get_config(variant), {
      **overrides, "seed": seed, "model.depth": 2, "batch_size": 8, "data.image_size": 16,
      "data.multicrop.global_size": 16, "total_steps": steps, "log_every": 100, "eval_every": steps,
      "checkpoint_every": steps, "data.eval_examples": 512, "objective.knn_train_examples": 512,
      "final_eval.config": ""})
  loop.train(config, workdir, helpers.single_device_mesh(config))
  first, last = [m for m in helpers.read_metrics(workdir) if "eval/knn_modality_acc" in m]
  return first, last


# Per objective: the least gains (accuracy, step 0 -> 400) of the teacher's few-shot modality
# accuracy, 1-shot and 10-shot (the monitor's nearest centroid over 50 support draws, 512 queries):
# mean - 3 sample s.d. of the gains, rounded down (None: not asserted, mean - 3 s.d. <= 0), from
# tools/seed_spread.py --scenarios dino,dinov2, seeds 0/1/2/3/4 (2026-12-01):
# - DINO: 1-shot 0.561 / 0.602 / 0.524 / 0.588 / 0.564 -> 0.646 / 0.751 / 0.683 / 0.718 / 0.704
#   (gains 0.132 ± 0.028); 10-shot 0.745 / 0.788 / 0.656 / 0.769 / 0.738 -> 0.800 / 0.903 / 0.804 /
#   0.860 / 0.860 (gains 0.106 ± 0.035, mean - 3 s.d. -0.000).
# - DINOv2: 1-shot 0.563 / 0.587 / 0.508 / 0.596 / 0.537 -> 0.660 / 0.739 / 0.688 / 0.695 / 0.698
#   (gains 0.138 ± 0.037); 10-shot 0.743 / 0.780 / 0.656 / 0.771 / 0.708 -> 0.833 / 0.909 / 0.816 /
#   0.848 / 0.860 (gains 0.122 ± 0.037).
# kNN modality (bank 512) moves 0.024 ± 0.022 / 0.009 ± 0.013: within its spread, not asserted.
LEARNING_MARGINS = {"dino": (0.04, None), "dinov2": (0.02, 0.01)}


@helpers.own_xdist_group   # uses no module fixture
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dino", "dinov2"])
def test_learning_signal_ci(tmp_path, objective):
  """400 steps of the test-sized DINO / DINOv2: the teacher's few-shot modality accuracy (a
  benchmark task, nearest-centroid protocol) rises above its own step-0 (random-init) value by the
  margin its seed spread allows (the full recipes: docs/benchmark.md)."""
  first, last = dino_learning_run(str(tmp_path), objective=objective)
  assert (first["step"], last["step"]) == (0, LEARNING_STEPS)
  for shots, margin in zip((1, 10), LEARNING_MARGINS[objective]):
    k = f"eval/fewshot{shots}_modality_acc"
    assert margin is None or last[k] - first[k] > margin, (k, first[k], last[k])
