"""Validation: each bad field fails fast with one line naming it; the CLI writes nothing."""
import os

import pytest

from configs import dino, flava, mae
from medfm_jax import config as config_lib
from tests import helpers


def _validate(overrides, workdir=None, num_devices=1):
  return config_lib.validate(helpers.tiny_mae_config(**overrides), workdir, num_devices)


def test_valid_config_resolves_mesh():
  assert _validate({}, num_devices=8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert _validate({"mesh.data": 2, "mesh.fsdp": -1}, num_devices=8) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("overrides, num_devices, field", [
    ({"data.image_size": 18}, 1, "data.image_size"),
    ({"objective.mask_ratio": 1.0}, 1, "objective.mask_ratio"),
    ({"objective.mask_ratio": 0.0}, 1, "objective.mask_ratio"),
    ({"model.variant": "Q/16"}, 1, "model.variant"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, 8, "mesh"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "mesh"),
    ({"batch_size": 12, "mesh.data": 8}, 8, "batch_size"),
    ({"batch_size": 16, "grad_accum_steps": 4, "mesh.data": 8}, 8, "batch_size"),
    ({"dtype": "float16"}, 1, "dtype"),
    ({"mesh.tensor": 2, "mesh.data": 1}, 2, "mesh.tensor"),
    ({"objective.name": "simclr"}, 1, "objective.name"),
    ({"total_steps": 0}, 1, "total_steps"),
    ({"stop_check_every": 0}, 1, "stop_check_every"),
    ({"eval_every": -1}, 1, "eval_every"),
    ({"data.channels": 2}, 1, "data.channels"),
    ({"model.remat": "some"}, 1, "model.remat"),
    ({"model.num_heads": 5}, 1, "model.num_heads"),
    ({"grad_clip_mode": "layer"}, 1, "grad_clip_mode"),
    ({"weight_decay_end": -0.1}, 1, "weight_decay_end"),
    ({"model.attention_impl": "flash"}, 1, "model.attention_impl"),
    ({"objective.knn_train_examples": -1}, 1, "objective.knn_train_examples"),
])
def test_each_bad_field_is_named(overrides, num_devices, field):
  with pytest.raises(config_lib.ConfigError) as e:
    _validate(overrides, num_devices=num_devices)
  message = str(e.value)
  assert field in message and "\n" not in message


@pytest.mark.parametrize("overrides, field", [
    ({"objective.centering": "mean"}, "objective.centering"),
    ({"data.patch_masks": None}, "data.patch_masks"),
    ({"data.patch_masks.patch_size": 8}, "data.patch_masks"),
    ({"model.mask_token": False}, "model.mask_token"),
    ({"objective.koleo_loss_weight": -1.0}, "objective.koleo_loss_weight"),
    ({"data.multicrop.local_size": 10}, "data.multicrop.local_size"),
    ({"objective.layerwise_decay": 0.0}, "objective.layerwise_decay"),
])
def test_each_bad_dino_field_is_named(overrides, field):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(helpers.tiny_dino_config("tiny_v2", **overrides), None, 1)
  assert field in str(e.value) and "\n" not in str(e.value)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  # /proc is a directory in which nobody, root included (as CI runs), can create anything; root
  # ignores permission bits, so a chmod-ed directory would not be unwritable there.
  unwritable = "/proc/medfm_jax_run/run"
  with pytest.raises(OSError):
    os.makedirs(unwritable)
  for workdir in (str(blocker / "run"), unwritable):
    with pytest.raises(config_lib.ConfigError) as e:
      _validate({}, workdir=workdir)
    assert str(e.value) == f"--workdir={workdir!r}: not a writable directory"
  _validate({}, workdir=str(tmp_path / "new" / "run"))   # creatable: accepted, and not created
  assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_cli_bad_config_exits_with_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = helpers.run_cli(["--config=configs/mae.py:tiny", f"--workdir={workdir}",
                            "--config.objective.mask_ratio=1.5"])
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith("medfm_jax:")]
  assert errors == ["medfm_jax: config error: objective.mask_ratio=1.5: must be in the open interval (0, 1)"]
  assert not workdir.exists()


def test_final_eval_is_checked_before_training():
  from medfm_jax import main  # pylint: disable=g-import-not-at-top  (defines the CLI's flags)
  from medfm_jax.evaluate import protocols  # pylint: disable=g-import-not-at-top
  c = mae.get_config("tiny")
  assert main._final_eval_config(c).protocol == "linear_probe"  # pylint: disable=protected-access
  c.final_eval.labels = ("lesion_location", "nope")
  with pytest.raises(protocols.EvalError, match="final_eval.labels: data.label='nope'"):
    main._final_eval_config(c)  # pylint: disable=protected-access
  c.final_eval.config = "configs/eval/missing.py:tiny"
  with pytest.raises(config_lib.ConfigError, match="final_eval.config='configs/eval/missing.py:tiny'"):
    main._final_eval_config(c)  # pylint: disable=protected-access
  c.final_eval.config = ""
  assert main._final_eval_config(c) is None  # pylint: disable=protected-access


def test_dino_tiny_spatial_is_the_measured_recipe():
  """configs/dino.py:tiny_spatial is the DINO run docs/benchmark.md fine-tuned (tiny plus these
  overrides, its closing table aside): a change to either must be re-measured."""
  measured = helpers.override(dino.get_config("tiny"), {
      "model.patch_embed": "conv", "model.cls_pool": "max", "model.layer_scale_init": 0.1,
      "data.flip": False, "data.multicrop.global_scale": (0.7, 1.0), "data.multicrop.num_local": 0})
  assert dino.get_config("tiny_spatial").to_dict() == measured.to_dict()
  assert dino.get_config("tiny").data.multicrop.num_local == 4     # the plain recipe is unchanged
  config_lib.validate(dino.get_config("tiny_spatial"), None, 1)


def test_flava_tiny_contrastive_is_the_measured_recipe():
  """configs/flava.py:tiny_contrastive is the FLAVA run docs/benchmark.md probed over pretraining
  seeds 0-2 (tiny plus these overrides, its closing table aside): a change to either must be
  re-measured."""
  measured = helpers.override(flava.get_config("tiny"), {
      "objective.weights.contrastive": 3.0, "objective.init_logit_scale": 3.912, "total_steps": 800})
  assert flava.get_config("tiny_contrastive").to_dict() == measured.to_dict()
  assert flava.get_config("tiny").total_steps == 600     # the plain recipe is unchanged
  config_lib.validate(flava.get_config("tiny_contrastive"), None, 1)
  with pytest.raises(ValueError, match="allowed: tiny, full, tiny_contrastive"):
    flava.get_config("tiny_contrastiv")


def test_dino_tiny_ibot_is_the_measured_recipe():
  """configs/dino.py:tiny_ibot is the run docs/benchmark.md measured (tiny_v2 plus these overrides,
  its closing table aside): a change to either must be re-measured."""
  measured = helpers.override(dino.get_config("tiny_v2"), {
      "model.patch_embed": "conv", "model.cls_pool": "max", "model.layer_scale_init": 0.1,
      "objective.momentum_teacher": 0.99, "data.patch_masks.probability": 1.0,
      "data.patch_masks.ratio": (0.3, 0.7), "objective.dino_loss_weight": 0.0,
      "objective.ibot_loss_weight": 1.0, "data.multicrop.num_local": 0, "total_steps": 1000})
  assert dino.get_config("tiny_ibot").to_dict() == measured.to_dict()
  config_lib.validate(dino.get_config("tiny_ibot"), None, 1)
