"""ViT-C convolutional stem (``model.patch_embed='conv'``): torch reference parity, logical names,
scan, sharding, mask token, keep_ids and errors.

Params come from helpers.random_params (numpy, nothing to compile) and forwards run as one jitted
program each (eager, every op of the model compiles on its own)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medfm_jax.models import layers, vit
from medfm_jax.parallel import mesh as mesh_lib
from tests.helpers import random_params


def _model(**kw):
  return vit.VisionTransformer("Mu/4", image_size=16, patch_embed="conv", **kw)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, x, **kwargs):
  return model.apply({"params": params}, x, **kwargs)


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _params(model, x, std=0.05):
  return random_params(jax.eval_shape(model.init, jax.random.key(0), x)["params"], std=std)


@pytest.fixture(scope="module")
def conv_vit():
  x = _normal((4, 16, 16, 1), 1)
  model = _model(mask_token=True)
  return model, _params(model, x), x


def _torch_stem(params, width):
  """The stem written with torch modules from our params (Conv2d weight = HWIO -> OIHW)."""
  t = lambda a: torch.tensor(np.asarray(a))
  mods, n = [], sum(k.startswith("conv_") for k in params)
  for i in range(n):
    k = params[f"conv_{i}"]["kernel"]
    conv = torch.nn.Conv2d(k.shape[2], k.shape[3], 3, 2, 1)
    conv.weight.data, conv.bias.data = t(k).permute(3, 2, 0, 1).contiguous(), t(params[f"conv_{i}"]["bias"])
    mods += [conv, torch.nn.GELU()]
  proj = torch.nn.Conv2d(width, width, 1)
  proj.weight.data = t(params["proj"]["kernel"]).T[:, :, None, None].contiguous()
  proj.bias.data = t(params["proj"]["bias"])
  return torch.nn.Sequential(*mods, proj)


@pytest.mark.slow
def test_conv_stem_matches_torch_reference():
  stem = vit.ConvStem(patch_size=8, width=32)
  x = _normal((2, 24, 16, 3), 2)
  params = _params(stem, x, std=0.2)         # about the scale of the init (+ 0.1 noise) it replaces
  assert [params[f"conv_{i}"]["kernel"].shape[-1] for i in range(3)] == [8, 16, 32]
  y = _apply(stem, params, x)                                               # [2, 3*2, 32]
  with torch.no_grad():
    ref = _torch_stem(params, 32)(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2))
  ref = ref.flatten(2).transpose(1, 2).numpy()                              # row-major tokens
  assert y.shape == ref.shape == (2, 6, 32)
  np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-5)


def test_conv_layer_matches_lax_reference_with_padding_and_stride():
  conv = layers.Conv(5, 3, strides=2, padding=1)
  x = _normal((1, 7, 6, 2), 0)
  p = _params(conv, x, std=0.5)
  y = _apply(conv, p, x)
  # Direct sum over the 3x3 window of the zero-padded input at output (1, 2): input rows 1..3, cols 3..5.
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.einsum("hwi,hwio->o", xp[0, 2:5, 4:7], np.asarray(p["kernel"])) + np.asarray(p["bias"])
  assert y.shape == (1, 4, 3, 5)
  np.testing.assert_allclose(y[0, 1, 2], want, atol=1e-5)


@pytest.mark.slow
def test_conv_vit_logical_names_and_scan(conv_vit):
  model, params, x = conv_vit
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  leaves = jax.tree.leaves(boxed["patch_embed"], is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(a, nn.Partitioned) for a in leaves)
  assert boxed["patch_embed"]["conv_0"]["kernel"].names == (None, None, None, "embed")
  assert set(params["patch_embed"]) == {"conv_0", "conv_1", "proj"}
  y = _apply(model, params, x)
  assert y.shape == (4, 1 + 16, 96)
  scanned = model.clone(scan=True)
  np.testing.assert_allclose(_apply(scanned, vit.stack_layers(params), x), y, atol=1e-5)


@pytest.mark.slow
def test_conv_vit_sharded_forward_matches_single_device(conv_vit):
  model, params, x = conv_vit
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  specs = jax.tree.map(lambda s: s.spec, mesh_lib.tree_shardings(boxed, mesh))
  assert specs["patch_embed"]["conv_1"]["kernel"] == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  sharded = jax.tree.map(lambda p, s: jax.device_put(p, jax.sharding.NamedSharding(mesh, s)), params, specs)
  with mesh_lib.use_mesh(mesh):
    xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, 4))
    y = _apply(model, sharded, xs)
  np.testing.assert_allclose(y, _apply(model, params, x), atol=1e-5)


def test_conv_vit_mask_token_and_keep_ids(conv_vit):
  model, params, x = conv_vit
  apply = lambda img, **kw: _apply(model, params, img, **kw)
  # Every token masked: nothing depends on the pixels any more.
  all_masked = np.ones((4, 16), bool)
  np.testing.assert_allclose(apply(x, patch_mask=all_masked), apply(2 * x + 1, patch_mask=all_masked),
                             atol=1e-5)
  assert not np.allclose(apply(x), apply(2 * x + 1), atol=1e-3)
  # keep_ids selects stem tokens: keeping all in order is the full forward, a subset has its length.
  ids = np.tile(np.arange(16), (4, 1))
  np.testing.assert_allclose(apply(x, keep_ids=ids), apply(x), atol=1e-5)
  assert apply(x, keep_ids=ids[:, ::4]).shape == (4, 1 + 4, 96)


@pytest.mark.parametrize("patch,width,match", [(6, 96, "power-of-two"), (1, 96, "power-of-two"),
                                               (16, 100, "divisible")])
def test_conv_stem_rejects_unbuildable_sizes(patch, width, match):
  with pytest.raises(ValueError, match=match):
    vit.conv_stem_depth(patch, width)


def test_unknown_patch_embed_is_rejected():
  with pytest.raises(ValueError, match="model.patch_embed='pixels'"):
    jax.eval_shape(vit.VisionTransformer("Mu/4", image_size=16, patch_embed="pixels").init,
                   jax.random.key(0), jnp.ones((1, 16, 16, 1)))


@pytest.mark.parametrize("overrides, message", [
    ({"model.patch_embed": "pixels"}, "model.patch_embed='pixels'"),
    ({"model.patch_embed": "conv", "model.variant": "Mu/3", "data.image_size": 18}, "power-of-two"),
])
def test_config_rejects_bad_patch_embed(overrides, message):
  from medfm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  c = helpers.tiny_eval_config("finetune", **{"model.patch_embed": "patch"})
  config_lib.validate(c, None, 1)
  helpers.override(c, overrides)
  with pytest.raises(config_lib.ConfigError, match="model.patch_embed") as e:
    config_lib.validate(c, None, 1)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_config_rejects_conv_stem_for_mae_only():
  from medfm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  config_lib.validate(helpers.tiny_eval_config("finetune", **{"model.patch_embed": "conv"}), None, 1)
  with pytest.raises(config_lib.ConfigError, match="model.patch_embed='conv'.*objective.name='mae'"):
    config_lib.validate(helpers.tiny_mae_config(allow_new=("model.patch_embed",), **{"model.patch_embed": "conv"}), None, 1)
