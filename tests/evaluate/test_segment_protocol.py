"""The 'segment' protocol: restores a run of objective 'sam'; Dice / IoU per prompt type and class."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import sam as sam_config
from configs.eval import segment as segment_config
from medfm_jax import config as config_lib
from medfm_jax.data import phantoms, pipeline
from medfm_jax.evaluate import protocols, results as results_lib
from medfm_jax.objectives import sam
from medfm_jax.parallel import programs
from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers

TINY = ("tiny,data.image_size=32,model.width=32,model.depth=2,model.num_heads=2,model.mlp_dim=64,"
        "model.sam.prompt_dim=16,model.sam.decoder_mlp_dim=32,model.sam.iou_head_hidden_dim=16,"
        "objective.recipe='sam'")


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
  """A 'sam' checkpoint with random weights (the protocol only restores and evaluates it)."""
  config = sam_config.get_config(TINY)
  config_lib.validate(config)
  objective = sam.SamObjective(config)
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in objective.data.abstract_batch(1).items()}
  params = nn.unbox(programs.jit_once(lambda r: objective.init(r, batch)[0])(jax.random.key(1)))
  workdir = str(tmp_path_factory.mktemp("sam_run"))
  ckpt_lib.export_params(workdir, 7, params, {"step": 7, "config": config.to_json_best_effort()})
  return workdir, config, objective, params


def _sam_dice(logits, target):
  pred, gt = np.asarray(logits) > 0, np.asarray(target) > 0.5
  return 2 * (pred & gt).sum((1, 2)) / np.maximum(pred.sum((1, 2)) + gt.sum((1, 2)), 1)


@pytest.mark.slow   # ~35 CPU-s of SAM compiles (every prompt type)
def test_segment_protocol_matches_sam_predictions(sam_run, tmp_path):
  workdir, _, objective, params = sam_run
  c = segment_config.get_config(f"tiny,init_from='{workdir}',data.eval_examples=8,data.eval_batch_size=8,"
                                "segment.point_rounds=2,segment.overlay_examples=3")
  config_lib.validate(c)
  protocols.check_config(c)
  res = protocols.run(c, str(tmp_path), helpers.single_device_mesh(c))
  m = res["metrics"]
  assert res["prompts"] == ["box", "points_1", "points_2"] and res["steps"] == 7 and m["num_examples"] == 8
  assert sum(res["class_examples"].values()) == 8

  # The same examples through SAM's own prompt interface: a box with a single mask, one point
  # (SAM's padding) with the best of 3 masks by predicted IoU.
  spec = dataclasses.replace(objective.data, segment=dataclasses.replace(objective.data.segment,
                                                                       classes=tuple(c.segment.classes)))
  batches = list(pipeline.make_eval_batches(spec, "test", 8, 8))
  @jax.jit
  def sam_prompts(p, b):
    v = {"params": objective.effective_params(p)}
    emb = objective.model.apply(v, b["image"], method="embed_image")
    box, _ = objective.model.apply(v, emb, boxes=b["box"][:, None], multimask_output=False, method="predict")
    point, iou = objective.model.apply(v, emb, b["points"][:, None, :1], jnp.ones((8, 1, 1), jnp.int32),
                                       multimask_output=True, method="predict")
    best = jnp.argmax(iou[:, 0], -1)
    return objective._upsample(box[:, 0, 0]), objective._upsample(point[jnp.arange(8), 0, best])
  box_dice, point_dice, classes = [], [], []
  for b in batches:
    box, point = sam_prompts(params, b)
    box_dice.append(_sam_dice(box, b["target"]))
    point_dice.append(_sam_dice(point, b["target"]))
    classes.append(b["target_class"])
  box_dice, point_dice, classes = map(np.concatenate, (box_dice, point_dice, classes))
  assert 0 < box_dice.mean() < 1
  np.testing.assert_allclose(m["dice_box"], box_dice.mean(), atol=1e-5)
  np.testing.assert_allclose(m["dice_points_1"], point_dice.mean(), atol=1e-5)
  for name in c.segment.classes:
    rows = classes == phantoms.MASK_CLASSES.index(name)
    assert res["class_examples"].get(name, 0) == rows.sum()
    if rows.any():
      np.testing.assert_allclose(m[f"dice_box/{name}"], box_dice[rows].mean(), atol=1e-5)
    else:
      assert np.isnan(m[f"dice_box/{name}"])
  assert all(m[f"iou_{p}"] <= m[f"dice_{p}"] + 1e-6 for p in res["prompts"])

  picture = np.asarray(Image.open(res["overlay"]))
  assert picture.shape == (2 * 32 * 4, 3 * 32 * 4, 3)          # box row + last-click row, 3 examples
  json_path, md_path = results_lib.write(str(tmp_path), res)
  assert json.load(open(json_path))["metrics"]["dice_box"] == pytest.approx(m["dice_box"])
  assert "| points_2 |" in open(md_path).read()


def test_segment_protocol_needs_a_sam_run(tmp_path):
  c = segment_config.get_config("tiny")
  with pytest.raises(protocols.EvalError, match="set --config.init_from"):
    protocols.run(c, str(tmp_path), helpers.single_device_mesh(c))
  ckpt_lib.export_params(str(tmp_path / "mae"), 1, {"w": np.zeros(2, np.float32)},
                         {"step": 1, "config": json.dumps({"objective": {"name": "mae"}})})
  c = segment_config.get_config(f"tiny,init_from='{tmp_path / 'mae'}'")
  with pytest.raises(protocols.EvalError, match="trained with objective 'mae'; segment needs"):
    protocols.run(c, str(tmp_path), helpers.single_device_mesh(c))
  c = segment_config.get_config("tiny")
  c.segment.classes = ("tumour",)
  with pytest.raises(config_lib.ConfigError, match="segment.classes"):
    protocols.check_config(c)


def test_center_points_pick_the_deepest_error_pixel():
  target = np.zeros((3, 12, 12), np.float32)
  target[:, 2:11, 2:11] = 1                       # 9x9 square
  logits = np.where(target > 0, 5.0, -5.0)
  logits[0, 2:11, 2:6] = -5                       # left part missed (9 x 4): click inside it, positive
  logits[1, 0:1, :] = 5                           # a thin false-positive row, nothing missed: negative click
  xy, label = sam.center_points(jnp.asarray(logits), jnp.asarray(target))   # 2: perfect: the centre
  x, y = np.asarray(xy, int).T
  assert label.tolist() == [1, 0, 1]
  assert 3 <= x[0] <= 4 and y[0] == 6            # the middle of the 9 rows
  assert y[1] == 0
  assert (x[2], y[2]) == (6, 6)
