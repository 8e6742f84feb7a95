"""CLIP objective in the shared trainer: 1 vs 8 devices, LiT locking, no decay on scale/bias,
eval hook, config validation, and the CI-sized learning-signal run."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from medfm_jax import config as config_lib
from medfm_jax import objectives
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import loop, optim
from tests import helpers


def _first_losses(config, mesh, workdir):
  loop.train(config, str(workdir), mesh)
  return [m["loss"] for m in helpers.read_metrics(workdir) if "loss" in m]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_train_steps_equal_on_1_and_8_devices(tmp_path, loss):
  config = helpers.tiny_clip_config(**{"objective.loss": loss, "total_steps": 2, "checkpoint_every": 100})
  if loss == "siglip":
    config.objective.init_logit_scale = float(np.log(10.0))
  one = _first_losses(config, helpers.single_device_mesh(config), tmp_path / "one")
  eight = _first_losses(config, mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}), tmp_path / "eight")
  np.testing.assert_allclose(one, eight, atol=1e-5)
  assert len(one) == 2 and one[1] < one[0] + 1.0


def test_no_weight_decay_on_logit_scale_and_bias():
  config = helpers.tiny_clip_config(**{"objective.loss": "siglip"})
  objective = objectives.build(config)
  batch = {"image": np.zeros((2, 16, 16, 1), np.float32), "tokens": np.zeros((2, 80), np.int32)}
  params = nn.unbox(jax.eval_shape(lambda: objective.init(jax.random.PRNGKey(0), batch)[0]))
  decay = optim.decay_mask(params)
  assert decay["logit_scale"] is False and decay["logit_bias"] is False
  assert decay["text_projection"]["kernel"] is True
  assert not any(jax.tree.leaves(decay["text"]["norm"]))


def test_lit_locks_the_restored_image_tower(tmp_path):
  mae_dir = tmp_path / "mae"
  mae_cfg = helpers.tiny_mae_config(total_steps=1, checkpoint_every=1, **{"model.depth": 2})
  loop.train(mae_cfg, str(mae_dir), helpers.single_device_mesh(mae_cfg))
  from medfm_jax.train import checkpoint
  mae_encoder = checkpoint.restore_subtree(str(mae_dir), ("params", "encoder"))
  # LiT on the MAE encoder: the MAE tower has sin-cos positions, GELU, no ln_pre.
  config = helpers.tiny_clip_config(**{"objective.lit_init_from": str(mae_dir), "total_steps": 2,
                                       "model.pos_embed": "sincos2d", "model.ln_pre": False,
                                       "model.activation": "gelu", "model.layer_norm_eps": 1e-6})
  state = loop.train(config, str(tmp_path / "lit"), helpers.single_device_mesh(config))
  image = jax.device_get(state.params["image"])
  for a, b in zip(jax.tree.leaves(image), jax.tree.leaves(mae_encoder)):
    np.testing.assert_array_equal(a, b)                            # restored, then never updated
  objective = objectives.build(config)
  assert not any(jax.tree.leaves(objective.trainable(state.params)["image"]))
  assert all(jax.tree.leaves(objective.trainable(state.params)["text"]))


@pytest.mark.parametrize("overrides, field", [
    ({"objective.loss": "triplet"}, "objective.loss"),
    ({"data.tokenizer": "bpe"}, "data.tokenizer"),
    ({"data.tokenizer": "hf"}, "data.tokenizer_path"),
    ({"data.context_length": 100}, "data.context_length"),
    ({"model.text.vocab_size": 100}, "model.text.vocab_size"),
    ({"model.text.pooling": "max"}, "model.text.pooling"),
    ({"model.text.num_heads": 5}, "model.text.num_heads"),
    ({"model.image_pool": "mean"}, "model.image_pool"),
    ({"model.class_token": False}, "model.class_token"),
])
def test_each_bad_clip_field_is_named(overrides, field):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(helpers.tiny_clip_config(**overrides), None, 1)
  assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("variant", ["vit_b16", "siglip_b16", "biomedclip_b16"])
def test_recipe_configs_validate(variant):
  from configs import clip
  config = clip.get_config(f"{variant},mesh.fsdp=8")
  assert config_lib.validate(config, None, num_devices=8)["fsdp"] == 8
