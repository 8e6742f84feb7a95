"""Restoring pretraining checkpoints into a classifier: encoder locations declared by the objective
class (built-in or imported by path), DINO teacher/student, position embedding interpolation,
scanned stacks, and one-line errors."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import layers, vit
from medfm_jax.objectives import base
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import restore
from medfm_jax.train.checkpoint import CheckpointError
from tests import helpers


class TowerObjective(base.Objective):
  """An objective outside the package: only its encoder location matters here."""
  image_encoders = {"image": ("params", "tower", "image")}

  def init(self, rng, batch):
    raise NotImplementedError

  def loss(self, params, extra, batch, rng, step):
    raise NotImplementedError


def _init(**kw):
  model = vit.VisionTransformer(**dict(dict(variant="Mu/4", image_size=16, depth=1), **kw))
  return lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))["params"])


def _encoder_params(**kw):
  """Numpy params of the encoder (helpers.random_params: no init program to compile)."""
  return helpers.random_params(_abstract(**kw))


def _abstract(**kw):
  return jax.eval_shape(_init(**kw))


def _write(workdir, state, meta):
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=1, async_save=False)
  checkpointer.save(1, state, None, meta)
  checkpointer.close()
  return str(workdir)


def test_dino_teacher_or_student(tmp_path):
  student = _encoder_params()
  teacher = jax.tree.map(lambda x: x + 1.0, student)
  path = _write(tmp_path, {"params": {"backbone": student, "head": {"w": np.zeros(3, np.float32)}},
                           "extra": {"teacher": {"backbone": teacher}, "center": np.zeros(3, np.float32)}},
                {"step": 1, "config": json.dumps({"objective": {"name": "dino"}, "model": {"variant": "Mu/4"}})})
  got_teacher, saved = restore.load_encoder(path)                 # default: teacher
  jax.tree.map(np.testing.assert_array_equal, got_teacher, teacher)
  jax.tree.map(np.testing.assert_array_equal, restore.load_encoder(path, "student")[0], student)
  assert saved["model"]["variant"] == "Mu/4"
  with pytest.raises(CheckpointError, match=r"encoder_weights='encoder': objective 'dino' checkpoints have \['student', 'teacher'\]"):
    restore.load_encoder(path, "encoder")


def test_encoder_location_comes_from_the_objective_class(tmp_path):
  encoder = _encoder_params()
  path = _write(tmp_path / "a", {"params": {"tower": {"image": encoder}}},
                {"step": 1, "config": json.dumps({"objective": {"name": f"{__name__}:TowerObjective"}})})
  jax.tree.map(np.testing.assert_array_equal, restore.load_encoder(path)[0], encoder)
  path = _write(tmp_path / "b", {"params": {"image": encoder}},
                {"step": 1, "config": json.dumps({"objective": {"name": "unknown_objective"}})})
  with pytest.raises(CheckpointError, match="init_from=.*: the checkpoint's objective.name='unknown_objective': allowed"):
    restore.load_encoder(path)


def test_fit_interpolates_learned_pos_embed():
  old = _encoder_params(pos_embed="learned")                      # 4x4 grid at 16 px
  new = _abstract(pos_embed="learned", image_size=32)             # 8x8 grid
  fitted = restore.fit_encoder(new, old, "ckpt")
  expected = layers.interpolate_pos_embed(jnp.asarray(old["pos_embed"]), (4, 4), (8, 8), num_prefix=0)
  assert fitted["pos_embed"].shape == (1, 64, 96)
  np.testing.assert_allclose(fitted["pos_embed"], expected, atol=1e-6)
  np.testing.assert_array_equal(fitted["patch_embed/proj/kernel"], old["patch_embed"]["proj"]["kernel"])


def test_fit_keeps_new_peft_params_fresh_and_converts_scan():
  old = _encoder_params(depth=2)
  fitted = restore.fit_encoder(_abstract(depth=2, num_prompts=3, adapter_dim=4), old, "ckpt")
  assert not any(k.startswith("prompts") or "adapter_" in k for k in fitted)
  assert "encoder/layer_1/attn/query/kernel" in fitted
  stacked = restore.fit_encoder(_abstract(depth=2, scan=True), old, "ckpt")
  np.testing.assert_array_equal(stacked["encoder/layers/block/attn/query/kernel"][1],
                                old["encoder"]["layer_1"]["attn"]["query"]["kernel"])


def test_fit_errors_list_missing_unexpected_and_mismatched():
  old = _encoder_params(depth=2)
  with pytest.raises(CheckpointError) as e:
    restore.fit_encoder(_abstract(depth=1, num_registers=2, mlp_dim=128), old, "/ckpt")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("init_from='/ckpt': the checkpoint's image encoder does not fit")
  assert "missing: registers" in msg
  assert "unexpected: encoder/layer_1/" in msg
  assert "shape mismatch (stored != config): encoder/layer_0/mlp/fc1/bias (384,) != (128,)" in msg


def test_missing_subtree_and_bad_path(tmp_path):
  path = _write(tmp_path / "a", {"params": {"encoder": _encoder_params()}},
                {"step": 1, "config": json.dumps({"objective": {"name": "dino"}})})
  with pytest.raises(CheckpointError, match=r"checkpoint has no 'extra' \(found \['params'\] under 'the root'\)"):
    restore.load_encoder(path)
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    restore.load_encoder(str(tmp_path / "nowhere"))


def _mae3d_checkpoint(workdir, volume, image_size=16):
  """A fake 3D MAE checkpoint: a 1-block encoder with learned position embeddings for ``volume``
  (None: a 2-D encoder at ``image_size``) and the saved config fields the restore reads."""
  spatial = volume or (image_size, image_size)
  model = vit.VisionTransformer("Mu/4", image_size=image_size, depth=1, width=48, num_heads=2,
                                mlp_dim=96, pos_embed="learned", volume_size=volume)
  encoder = helpers.random_params(jax.eval_shape(model.init, jax.random.PRNGKey(1),
                                                 jnp.zeros((1, *spatial, 1)))["params"], seed=1)
  data = {"image_size": image_size, **({"volume": {"size": list(volume)}} if volume else {})}
  config = {"objective": {"name": "mae3d"}, "model": {"variant": "Mu/4", "pos_embed": "learned",
                                                      "patch_3d": []}, "data": data}
  return _write(workdir, {"params": {"encoder": encoder}}, {"step": 1, "config": json.dumps(config)}), encoder


def _seg3d(init_from, volume):
  from configs import seg3d  # pylint: disable=g-import-not-at-top  (configs load by path)
  from medfm_jax.train import assemble  # pylint: disable=g-import-not-at-top  (imports every objective)
  config = helpers.override(seg3d.get_config("tiny"), {
      "init_from": init_from, "model.depth": 1, "model.width": 48, "model.num_heads": 2,
      "model.mlp_dim": 96, "model.pos_embed": "learned", "data.volume.size": volume})
  return assemble.build_objective(config)[0]


def test_3d_mae_encoder_restores_into_segment3d_on_another_volume_grid(tmp_path):
  """A 3D MAE encoder with learned positions on a 4x4x4 grid (16^3 crops, 4^3 patches) restored
  into seg3d at 8x16x32 crops (a 2x4x8 grid: the same 64 tokens): the positions are resampled
  tricubically between the two 3-D grids, not copied; a 2-D checkpoint is one line."""
  path, encoder = _mae3d_checkpoint(tmp_path / "mae3d", (16, 16, 16))
  fitted = _seg3d(path, (8, 16, 32))._pretrained  # pylint: disable=protected-access
  expected = layers.interpolate_pos_embed(jnp.asarray(encoder["pos_embed"]), (4, 4, 4), (2, 4, 8), num_prefix=0)
  assert fitted["pos_embed"].shape == encoder["pos_embed"].shape == (1, 64, 48)
  np.testing.assert_allclose(fitted["pos_embed"], expected, atol=1e-6)
  assert not np.allclose(fitted["pos_embed"], encoder["pos_embed"], atol=1e-3)
  np.testing.assert_array_equal(fitted["patch_embed/proj/kernel"], encoder["patch_embed"]["proj"]["kernel"])
  same = _seg3d(path, (16, 16, 16))._pretrained  # pylint: disable=protected-access
  np.testing.assert_array_equal(same["pos_embed"], encoder["pos_embed"])

  flat, _ = _mae3d_checkpoint(tmp_path / "mae2d", None, image_size=32)   # 8x8 = 64 tokens
  with pytest.raises(CheckpointError, match=r"^init_from='[^']*mae2d': pos_embed: the checkpoint's 64 learned "
                                           r"position embeddings on a 8x8 grid cannot be resampled to the "
                                           r"model's 2x4x8 grid$"):
    _seg3d(flat, (8, 16, 32))


def test_3d_mae_run_initialised_from_a_3d_mae_on_another_volume_grid(tmp_path):
  """``init_from`` a 3D MAE checkpoint (4x4x4 grid) into a 3D MAE run at 8x16x32 crops: the whole
  model is restored and the encoder's learned positions resampled between the 3-D grids."""
  from configs import mae3d  # pylint: disable=g-import-not-at-top  (configs load by path)
  from medfm_jax.train import assemble  # pylint: disable=g-import-not-at-top  (imports every objective)

  def objective(volume, init_from=""):
    config = helpers.override(mae3d.get_config("tiny"), {
        "init_from": init_from, "model.depth": 1, "model.width": 48, "model.num_heads": 2,
        "model.mlp_dim": 96, "model.pos_embed": "learned", "data.volume.size": volume,
        "objective.mask_block": 4})
    obj = assemble.build_objective(config)[0]
    return obj, jax.eval_shape(obj.init, jax.random.PRNGKey(0), {"image": jnp.zeros((1, *volume, 1))})[0]

  _, abstract = objective((16, 16, 16))
  params = helpers.random_params(abstract, seed=2)
  config = {"objective": {"name": "mae3d"}, "model": {"variant": "Mu/4", "pos_embed": "learned", "patch_3d": []},
            "data": {"image_size": 32, "volume": {"size": [16, 16, 16]}}}
  path = _write(tmp_path / "mae3d", {"params": params}, {"step": 1, "config": json.dumps(config)})
  obj, abstract = objective((8, 16, 32), path)
  values = restore.init_from_values(obj, abstract, {})
  pos = params["encoder"]["pos_embed"]
  expected = layers.interpolate_pos_embed(jnp.asarray(pos), (4, 4, 4), (2, 4, 8), num_prefix=0)
  np.testing.assert_allclose(values["params/encoder/pos_embed"], expected, atol=1e-6)
  assert set(values) == {f"params/{k}" for k in restore._flat(params)}  # pylint: disable=protected-access
  np.testing.assert_array_equal(values["params/decoder/pred/kernel"], params["decoder"]["pred"]["kernel"])
