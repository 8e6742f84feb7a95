"""3D MAE: block masking, MSE on the masked voxels, config checks, a tiny run through main."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae3d as mae3d_config
from medfm_jax import config as config_lib
from medfm_jax.models import mae as mae_model
from medfm_jax.models import vit
from medfm_jax.objectives import mae3d
from medfm_jax.parallel import programs
from tests import helpers


def _config(**overrides):
  return helpers.override(mae3d_config.get_config("tiny"), {
      "model.depth": 1, "model.width": 48, "model.num_heads": 2, "model.mlp_dim": 96,
      "data.volume.size": (16, 16, 16), "data.image_size": 16} | overrides)


def test_block_noise_masks_whole_blocks():
  noise = jax.random.uniform(jax.random.PRNGKey(0), (3, 2 * 2 * 3))
  patch_noise = mae_model.block_noise(noise, (4, 4, 6), (2, 2, 2))
  _, mask, _ = mae_model.random_masking(patch_noise, 0.75, block=8)
  blocks = np.asarray(mask).reshape(3, 2, 2, 2, 2, 3, 2).transpose(0, 1, 3, 5, 2, 4, 6).reshape(3, 12, 8)
  assert (blocks.min(-1) == blocks.max(-1)).all()                # every block all masked or all kept
  np.testing.assert_array_equal(blocks[..., 0].sum(1), [9, 9, 9])   # 75% of 12 blocks


@pytest.mark.slow
def test_loss_is_mse_on_masked_voxels_and_blocks_are_16_cubed():
  config = _config(**{"objective.mask_block": 8})
  objective = mae3d.Mae3dObjective(config)
  assert objective.patch_shape == (4, 4, 4) and objective.block == (2, 2, 2) and objective.mask_block == 8
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 16, 1))
  params, _ = programs.jit_once(objective.init)(jax.random.PRNGKey(0), {"image": images})
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  rng = jax.random.PRNGKey(3)
  loss, (metrics, _), out = jax.jit(lambda p: (
      *objective.loss(p, {}, {"image": images}, rng, 0),
      objective._forward(p, images, rng, deterministic=False)))(params)
  grid = (4, 4, 4)
  pred = np.asarray(vit.unpatchify3d(out["pred"], (4, 4, 4), grid, 1))
  voxel_mask = np.asarray(vit.unpatchify3d(jnp.repeat(out["mask"][..., None], 64, -1), (4, 4, 4), grid, 1))
  expected = (np.square(pred - np.asarray(images)) * voxel_mask).sum() / voxel_mask.sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics["mask_fraction"]) == 0.75
  # objective.visible_loss_weight adds w x the MSE on the visible voxels (same params, masks).
  both = mae3d.Mae3dObjective(_config(**{"objective.mask_block": 8, "objective.visible_loss_weight": 0.5}))
  loss_both = jax.jit(lambda p: both.loss(p, {}, {"image": images}, rng, 0)[0])(params)
  visible = (np.square(pred - np.asarray(images)) * (1 - voxel_mask)).sum() / (1 - voxel_mask).sum()
  np.testing.assert_allclose(loss_both, expected + 0.5 * visible, rtol=1e-5)
  # The mask is constant over 8^3-voxel blocks.
  v = voxel_mask[0, ..., 0].reshape(2, 8, 2, 8, 2, 8)
  assert (v.min((1, 3, 5)) == v.max((1, 3, 5))).all()


@pytest.mark.parametrize("key,value,message", [
    ("objective.mask_block", 6, r"^objective.mask_block=\(6, 6, 6\): must be a multiple of the patch shape"),
    ("data.volume.size", (16, 16, 14), r"^data.volume.size=\(16, 16, 14\): must be divisible by the patch"),
    ("objective.mask_ratio", 0.99, r"^objective.mask_ratio=0.99: keeps no block"),
    ("model.pos_embed", "sincos2d", r"^model.pos_embed='sincos2d': volumes allow"),
    ("objective.knn_train_examples", 64, r"^objective.knn_train_examples: the frozen-feature monitor"),
    ("objective.visible_loss_weight", -1.0, r"^objective.visible_loss_weight=-1.0: must be >= 0"),
    ("objective.encoder_tokens", "masked", r"^objective.encoder_tokens='masked': allowed 'visible'"),
    ("objective.encoder_tokens", "all", r"^objective.encoder_tokens='all' needs model.mask_token=True"),
])
def test_config_errors_are_one_line(key, value, message):
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(_config(**{key: value}), None, 1)
  assert "\n" not in str(e.value)


def test_variants_validate():
  for variant in ("tiny", "tiny_seg", "tiny_seg_all", "primus_m"):
    config_lib.validate(mae3d_config.get_config(variant), None, 1)
  tiny, tiny_seg = mae3d_config.get_config("tiny"), mae3d_config.get_config("tiny_seg")
  assert tiny_seg.objective.norm_pix_loss and not tiny.objective.norm_pix_loss
  assert tiny_seg.model == tiny.model and tiny_seg.data == tiny.data
  # tiny_seg_all is the part-8 run of docs/volumes.md: tiny_seg plus these fields, nothing else.
  tiny_seg_all = mae3d_config.get_config("tiny_seg_all")
  assert tiny_seg_all.objective.encoder_tokens == "all" and tiny_seg_all.model.mask_token
  assert (tiny_seg_all.total_steps, tiny_seg_all.warmup_steps) == (900, 45)
  for key, value in (("objective.encoder_tokens", "visible"), ("model.mask_token", False),
                     ("total_steps", tiny_seg.total_steps), ("warmup_steps", tiny_seg.warmup_steps)):
    helpers.override(tiny_seg_all, {key: value})
  assert tiny_seg_all == tiny_seg
  c = mae3d_config.get_config("primus_m")
  size = vit.size_from_config(c.model)
  assert (size.width, size.depth, size.num_heads, size.patch_size) == (864, 16, 12, 8)
  assert tuple(c.data.volume.size) == (160, 160, 160) and c.objective.mask_ratio == 0.75
  assert c.objective.mask_block == 16


@pytest.mark.slow
def test_tiny_runs_through_main_and_writes_orthogonal_slices(tmp_path):
  run = helpers.run_cli(["--config=configs/mae3d.py:tiny", f"--workdir={tmp_path}",
                         "--config.total_steps=6", "--config.eval_every=6", "--config.log_every=3",
                         "--config.checkpoint_every=6", "--config.data.volume.size=16",
                         "--config.data.volume.phantom_size=20", "--config.data.image_size=16",
                         "--config.model.depth=1"], timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  evals = [m for m in helpers.read_metrics(tmp_path) if "eval/loss" in m]
  assert [m["step"] for m in evals] == [0, 6] and np.isfinite(evals[-1]["eval/loss"])
  assert os.path.getsize(tmp_path / "recon" / "step_0000006.png") > 1000
