"""SAM objective pieces: correction clicks, losses, freezing; prompt-encoder conventions it relies on."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dino as dino_config
from configs import sam as sam_config
from medfm_jax import config as config_lib
from medfm_jax.errors import ConfigError
from medfm_jax.models import sam_encoder, sam_prompt
from medfm_jax.objectives import sam
from medfm_jax.parallel import programs
from medfm_jax.train import restore
from tests import helpers


def test_correction_points_come_from_the_error_region():
  target = np.zeros((3, 16, 16), np.float32)
  target[:, 4:12, 4:12] = 1
  logits = np.full((3, 16, 16), -5.0, np.float32)
  logits[0, 4:12, 4:8] = 5           # left half found: clicks must be on the missed right half
  logits[1] = np.where(target[1] > 0, 5, -5)
  logits[1, 0, 0] = 5                # one false positive pixel and nothing missed
  logits[2] = np.where(target[2] > 0, 5, -5)   # perfect: a click inside the target
  for seed in range(20):
    xy, label = sam.correction_points(jax.random.key(seed), jnp.asarray(logits), jnp.asarray(target))
    x, y = np.asarray(xy, int).T
    assert 4 <= y[0] < 12 and 8 <= x[0] < 12 and label[0] == 1
    assert (x[1], y[1], int(label[1])) == (0, 0, 0)
    assert target[2, y[2], x[2]] == 1 and label[2] == 1


def test_losses_and_scores():
  target = jnp.zeros((1, 8, 8)).at[:, 2:6, 2:6].set(1.0)
  good, bad = 20 * (2 * target - 1), -20 * (2 * target - 1)
  assert float(sam.dice_loss(good, target)[0]) < 1e-3 < 0.9 < float(sam.dice_loss(bad, target)[0])
  assert float(sam.focal_loss(good, target)[0]) < 1e-6 < float(sam.focal_loss(bad, target)[0])
  tiny = jnp.zeros((1, 8, 8)).at[:, 3, 3:5].set(1.0)          # a 2-pixel target, nothing predicted
  np.testing.assert_allclose(float(sam.dice_loss(jnp.full((1, 8, 8), -30.0), tiny)[0]), 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(sam.dice_loss(jnp.full((1, 8, 8), -30.0), tiny, 1e-5)[0]), 1, atol=1e-4)
  dice, iou = sam.hard_scores(good.at[0, 2, 2].set(-1.0), target)
  np.testing.assert_allclose([float(dice[0]), float(iou[0])], [30 / 31, 15 / 16], rtol=1e-6)


def test_box_equals_two_corner_points():
  """A box is the same two tokens as points labelled 2 / 3 (the training prompts rely on it)."""
  enc = sam_prompt.SamPromptEncoder(16, (4, 4), (32, 32), 8)
  boxes = jnp.array([[[3.0, 5.0, 20.0, 27.0]]])
  params = programs.jit_once(lambda b: enc.init(jax.random.key(0), boxes=b))(boxes)
  as_box, _ = jax.jit(lambda p, b: enc.apply(p, boxes=b))(params, boxes)
  as_points = jax.jit(lambda p, b: enc.apply(p, b, jnp.array([[[2, 3]]]), False, method="embed_points"))(
      params, boxes.reshape(1, 1, 2, 2))
  np.testing.assert_allclose(as_box, as_points, atol=1e-6)


def test_window_partition_round_trip():
  x = jnp.arange(2 * 7 * 5 * 3, dtype=jnp.float32).reshape(2, 7, 5, 3)
  windows, padded = sam_encoder.window_partition(x, 3)
  assert windows.shape == (2 * 3 * 2, 3, 3, 3) and padded == (9, 6)
  np.testing.assert_array_equal(sam_encoder.window_unpartition(windows, 3, padded, (7, 5)), x)


@pytest.mark.parametrize("freeze", sam.FREEZES)
def test_trainable_masks(freeze):
  c = sam_config.get_config(f"tiny,objective.freeze={freeze}")
  config_lib.validate(c)
  obj = sam.SamObjective(c)
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in obj.data.abstract_batch(2).items()}
  params = jax.eval_shape(lambda: nn.unbox(obj.init(jax.random.key(0), batch)[0]))
  mask = obj.trainable(params)
  assert set(params) == {"image_encoder", "prompt_encoder", "mask_decoder"} | ({"lora"} if freeze == "lora" else set())
  enc = jax.tree.leaves(mask["image_encoder"]["encoder"])
  assert all(enc) if freeze == "full" else not any(enc)
  assert all(jax.tree.leaves(mask["image_encoder"]["neck"])) and all(jax.tree.leaves(mask["mask_decoder"]))
  assert not any(jax.tree.leaves(mask["prompt_encoder"]))   # MedSAM recipe: frozen


def test_config_errors():
  with pytest.raises(ConfigError, match="objective.recipe"):
    config_lib.validate(sam_config.get_config("tiny,objective.recipe='sam2'"))
  c = sam_config.get_config("tiny")
  c.data.segment = None
  with pytest.raises(ConfigError, match="needs data.segment"):
    config_lib.validate(c)
  with pytest.raises(ConfigError, match="sam_checkpoint needs objective.encoder='vitdet'"):
    config_lib.validate(sam_config.get_config("tiny,objective.sam_checkpoint='x.pth'"))


def test_init_from_adopts_the_checkpoints_encoder_architecture(monkeypatch):
  # A DINO run's ViT has learned positions and registers: the SAM encoder must be built with them.
  saved = dino_config.get_config("tiny,model.num_registers=2").to_dict()
  monkeypatch.setattr(restore, "checkpoint_objective", lambda path: ("dino", saved))
  c = sam_config.get_config("tiny,init_from='runs/dino_tiny'")
  restore.adopt_architecture(c)
  encoder = sam.build_model(c).image_encoder.encoder
  assert (encoder.pos_embed, encoder.num_registers) == ("learned", 2)


def test_overlay_grid_outlines():
  t = np.zeros((2, 8, 8), bool)
  t[:, 2:6, 2:6] = True
  p = np.zeros_like(t)
  p[1, 0:3, 0:3] = True
  grid = sam.overlay_grid(np.full((2, 8, 8, 1), 0.5), t, p, np.array([[2, 2, 5, 5], [1, 1, 6, 6]], np.float32),
                          scale=2)
  assert grid.shape == (16, 32, 3) and grid.dtype == np.uint8
  green = (grid[..., 1] > 200) & (grid[..., 0] < 100)
  red = (grid[..., 0] > 200) & (grid[..., 1] < 100)
  assert green[:, :16].any() and not red[:, :16].any() and red[:, 16:].any()
  assert green[4, 4 + 2] and not green[8, 8]     # the target's outline, not its inside
  clicks = sam.overlay_grid(np.full((2, 8, 8, 1), 0.5), t, p, None, np.array([[[1, 6], [4, 4]]] * 2, np.float32),
                            np.array([[1, 0], [-1, 3]]), scale=2)
  yellow = (clicks[..., 0] > 200) & (clicks[..., 1] > 200) & (clicks[..., 2] < 100)
  magenta = (clicks[..., 0] > 200) & (clicks[..., 1] < 100) & (clicks[..., 2] > 200)
  assert yellow[12:14, 2:4].all() and magenta[8:10, 8:10].all()     # (x, y) = (1, 6) and (4, 4), x2
  assert not yellow[:, 16:].any() and not magenta[:, 16:].any()      # labels -1 / 3 are not clicks


def test_training_prompts_encode_as_sam_prompts():
  """Round-0 tokens (pad_points=False) equal SAM's encoding of a box, and of one point + padding."""
  enc = sam_prompt.SamPromptEncoder(16, (4, 4), (32, 32), 8)
  box = jnp.array([[[3.0, 5.0, 20.0, 27.0]]])
  point = jnp.array([[[[7.0, 9.0]]]])
  params = programs.jit_once(lambda b: enc.init(jax.random.key(0), boxes=b))(box)
  run = jax.jit(lambda p, pts, lab: enc.apply(p, pts, lab, pad_points=False)[0])
  sam_box = jax.jit(lambda p, b: enc.apply(p, boxes=b)[0])(params, box)
  sam_point = jax.jit(lambda p, pts: enc.apply(p, pts, jnp.ones((1, 1, 1), jnp.int32))[0])(params, point)
  np.testing.assert_allclose(run(params, box.reshape(1, 1, 2, 2), jnp.array([[[2, 3]]])), sam_box, atol=1e-6)
  np.testing.assert_allclose(run(params, jnp.concatenate([point, jnp.zeros_like(point)], 2), jnp.array([[[1, -1]]])),
                             sam_point, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.slow   # ~15 CPU-s per case
def test_correction_rounds_feed_back_the_previous_logits(train):
  """Round 2 of an interaction = round 1's prompt plus the click from round 1's error region, with
  round 1's chosen low-res logits as the mask prompt (SAM's interactive training and its
  evaluation), recomputed here from the model's own predict."""
  c = sam_config.get_config("tiny,model.width=32,model.depth=1,model.num_heads=2,model.mlp_dim=32,"
                            "data.image_size=16,objective.recipe='sam',objective.rounds=2")
  obj = sam.SamObjective(c)
  rng = np.random.default_rng(0)
  target = np.zeros((2, 16, 16), np.float32)
  target[0, 3:9, 4:12], target[1, 8:14, 2:7] = 1, 1
  batch = {"image": jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32), "target": jnp.asarray(target),
           "box": jnp.array([[4.0, 3.0, 11.0, 8.0], [2.0, 8.0, 6.0, 13.0]]),
           "points": jnp.array([[[6.0, 5.0]], [[4.0, 10.0]]]), "point_labels": jnp.ones((2, 1), jnp.int32)}
  key = jax.random.key(3)
  corners, box_labels = batch["box"].reshape(2, 1, 2, 2), jnp.array([[[2, 3]]] * 2)
  up = lambda x: jax.image.resize(x, (2, 16, 16), "bilinear")

  @jax.jit
  def rounds(params):
    v = {"params": obj.effective_params(params)}
    emb = obj.model.apply(v, batch["image"], method="embed_image")
    _, ups, points, labels = obj._interact(v, emb, batch, key, "box", 2, train=train)  # pylint: disable=protected-access
    first = obj.model.apply(v, emb, corners, box_labels, multimask_output=False, pad_points=False,
                            method="predict")[0][:, 0, 0]                  # [B, h, w] low-res logits
    click_rng = jax.random.split(key, 3)[2]                                 # the second round's key
    click, label = (sam.correction_points(click_rng, ups[0], batch["target"]) if train
                    else sam.center_points(ups[0], batch["target"]))
    run = lambda masks: up(obj.model.apply(v, emb, points[:, None], labels[:, None], masks=masks,
                                           multimask_output=False, pad_points=False, method="predict")[0][:, 0, 0])
    return ups, points, labels, up(first), click, label, run(first[:, None]), run(None)

  # numpy params: the SAM init is the dearest compile of this test after `rounds` itself
  params = helpers.random_params(jax.eval_shape(lambda k: obj.init(k, batch)[0], jax.random.key(0)))
  ups, points, labels, first, click, label, second, no_mask = rounds(params)
  np.testing.assert_allclose(ups[0], first, atol=1e-5)
  np.testing.assert_array_equal(points[:, 2], click)
  np.testing.assert_array_equal(labels, jnp.concatenate([box_labels[:, 0], label[:, None]], 1))
  np.testing.assert_allclose(ups[1], second, atol=1e-5)
  assert np.abs(np.asarray(ups[1]) - np.asarray(no_mask)).max() > 1e-3    # the mask prompt matters
