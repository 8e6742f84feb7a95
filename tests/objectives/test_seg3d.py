"""3D segmentation objective: Dice + CE, per-structure hard Dice, few-shot volumes, config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import seg3d as seg3d_config
from medfm_jax import config as config_lib
from medfm_jax.data import phantoms3d, pipeline
from medfm_jax.objectives import seg3d
from tests import helpers


def test_dice_ce_loss_values():
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 4, 4, 4)))
  perfect = 50.0 * jax.nn.one_hot(labels, 3)
  loss, metrics = seg3d.dice_ce_loss(perfect, labels, 3)
  assert float(loss) < 1e-4 and float(metrics["soft_dice"]) > 0.9999
  uniform = jnp.zeros((2, 4, 4, 4, 3))
  loss, metrics = seg3d.dice_ce_loss(uniform, labels, 3, dice_weight=0.0)
  np.testing.assert_allclose(loss, np.log(3), rtol=1e-6)
  # Soft Dice of uniform probabilities: 2 * (n_c / 3) / (N / 3 + n_c) per foreground class.
  n = np.array([(np.asarray(labels) == c).sum() for c in (1, 2)], np.float64)
  expected = np.mean(2 * n / 3 / (labels.size / 3 + n))
  np.testing.assert_allclose(metrics["soft_dice"], expected, rtol=1e-4)


def test_hard_dice_per_example():
  labels = jnp.asarray([[[[1, 1], [0, 0]]], [[[0, 0], [0, 0]]]])
  pred = jnp.asarray([[[[1, 0], [0, 0]]], [[[0, 0], [0, 0]]]])
  d, present = seg3d.hard_dice(pred, labels, 1)
  np.testing.assert_allclose(d, [2 / 3, 0.0])
  assert list(np.asarray(present)) == [True, False]


def test_few_shot_train_volumes_and_config_errors():
  c = seg3d_config.get_config("tiny")
  config_lib.validate(c, None, 1)
  assert len(pipeline.make_source(c.data, "train")) == 8 and len(pipeline.make_source(c.data, "val")) == 500
  few = pipeline.make_source(c.data, "train")   # few-shot volumes are read once, then kept read-only
  calls = []
  few.source = type("Counting", (), {"__len__": lambda _: 8, "__getitem__": lambda _, i: calls.append(i) or
                                     phantoms3d.VolumePhantomSource("train", 40)[i]})()
  first, again = few[3], few[3]
  assert calls == [3] and first["image"] is again["image"] and not again["image"].flags.writeable
  np.testing.assert_array_equal(again["label_map"], phantoms3d.VolumePhantomSource("train", 40)[3]["label_map"])
  for key, value, message in (("objective.num_classes", 3, r"^objective.structures=.*needs objective.num_classes=3"),
                              ("data.volume.labels", False, r"^objective.name='seg3d' needs data.volume with labels"),
                              ("model.patch_3d", (4, 4, 2), r"^model.patch_3d=\(4, 4, 2\): the 3D segmentation decoders need cubic"),
                              ("objective.decoder", "vnet", r"^objective.decoder=.vnet.: allowed: unetr, primus$")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(helpers.override(seg3d_config.get_config("tiny"), {key: value}), None, 1)


def _lr_mult_objective(mult):
  from medfm_jax.train import assemble  # pylint: disable=g-import-not-at-top  (imports every objective)
  return assemble.build_objective(helpers.override(seg3d_config.get_config("tiny"), {
      "model.depth": 1, "model.width": 48, "model.num_heads": 2, "model.mlp_dim": 96,
      "data.volume.size": (8, 8, 8), "objective.feature_size": 2, "objective.encoder_lr_mult": mult,
      "warmup_steps": 0}))


def test_encoder_lr_mult_scales_or_freezes_the_encoder_steps():
  params = {"encoder": {"kernel": np.ones((3, 2), np.float32), "bias": np.ones(2, np.float32)},
            "decoder": {"kernel": np.ones((2, 2), np.float32)}}
  grads = jax.tree.map(lambda p: np.cos(np.arange(p.size, dtype=np.float32).reshape(p.shape)), params)
  updates = {}
  for mult in (1.0, 0.5, 0.0):
    tx = _lr_mult_objective(mult)[1]
    updates[mult] = tx.update(grads, tx.init(params), params)[0]
  assert float(np.abs(updates[1.0]["encoder"]["kernel"]).max()) > 0
  for mult in (0.5, 0.0):   # Adam's step (and weight decay) scale with the multiplier; the decoder's do not
    for full, scaled in zip(jax.tree.leaves(updates[1.0]["encoder"]), jax.tree.leaves(updates[mult]["encoder"])):
      np.testing.assert_allclose(scaled, mult * full, rtol=1e-6)
    np.testing.assert_array_equal(updates[mult]["decoder"]["kernel"], updates[1.0]["decoder"]["kernel"])
  with pytest.raises(config_lib.ConfigError, match=r"^objective.encoder_lr_mult=-1.0: must be >= 0"):
    config_lib.validate(helpers.override(seg3d_config.get_config("tiny"), {"objective.encoder_lr_mult": -1.0}), None, 1)


@pytest.mark.slow
def test_frozen_encoder_gets_no_gradient():
  objective = _lr_mult_objective(0.0)[0]
  batch = {"image": np.random.default_rng(0).normal(size=(1, 8, 8, 8, 1)).astype(np.float32),
           "label_map": np.random.default_rng(1).integers(0, 4, (1, 8, 8, 8))}
  abstract, extra = jax.eval_shape(objective.init, jax.random.PRNGKey(0), batch)
  params = helpers.random_params(abstract)   # numpy: no init program to compile
  grads = jax.jit(jax.grad(lambda p: objective.loss(p, extra, batch, jax.random.PRNGKey(1), 0)[0]))(params)
  assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(grads["encoder"]))   # no backward pass
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads["decoder"]))
