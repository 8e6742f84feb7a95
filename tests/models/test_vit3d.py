"""Volumetric ViT: 3-D patches and position embeddings on the 2-D blocks, scan and sharding.

Params come from helpers.random_params (numpy, nothing to compile) and shapes from jax.eval_shape;
forwards and resamplings run as one jitted program each (eager, every op compiles on its own)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import layers, vit
from medfm_jax.parallel import mesh as mesh_lib
from tests.helpers import random_params

VOL = np.random.default_rng(0).standard_normal((2, 8, 16, 12, 1)).astype(np.float32)
_interpolate = jax.jit(layers.interpolate_pos_embed, static_argnums=(1, 2), static_argnames=("num_prefix",))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  return model.apply(variables, x)


def _variables(model, x, seed=0):
  return random_params(jax.eval_shape(model.init, jax.random.key(0), x), seed)


def _vit(**kw):
  return vit.VisionTransformer(**({"variant": "Mu/4", "depth": 2, "width": 48, "num_heads": 2,
                                   "mlp_dim": 96, "pos_embed": "sincos3d"} | kw))


def test_patchify3d_roundtrip_and_order():
  x = jnp.arange(2 * 4 * 8 * 6 * 2, dtype=jnp.float32).reshape(2, 4, 8, 6, 2)
  p = vit.patchify3d(x, (2, 4, 3))
  assert p.shape == (2, 2 * 2 * 2, 2 * 4 * 3 * 2)
  # Token (d=1, h=0, w=1) is index 1*4 + 0*2 + 1; voxels flattened in (pd, ph, pw, c) order.
  np.testing.assert_array_equal(p[1, 5], np.asarray(x[1, 2:4, 0:4, 3:6]).reshape(-1))
  np.testing.assert_array_equal(vit.unpatchify3d(p, (2, 4, 3), (2, 2, 2), 2), x)


def test_patch_embed_is_a_strided_3d_convolution():
  embed = vit.PatchEmbed((2, 4, 4), 8)
  params = _variables(embed, VOL)["params"]
  kernel = params["proj"]["kernel"].reshape(2, 4, 4, 1, 8)                # DHWIO
  conv = jax.lax.conv_general_dilated(VOL, kernel, (2, 4, 4), "VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  conv = conv + params["proj"]["bias"]
  np.testing.assert_allclose(_apply(embed, {"params": params}, VOL), conv.reshape(2, -1, 8), atol=1e-5)


def test_sincos3d_values_match_formula():
  emb = layers.sincos_3d(14, 2, 3, 4, cls_token=True)     # e = 4 channels per axis, 2 zeros
  assert emb.shape == (1 + 24, 14)
  np.testing.assert_array_equal(emb[0], 0.0)
  d, h, w = 1, 2, 3
  row = emb[1 + d * 12 + h * 4 + w]
  for k, pos in enumerate((w, h, d)):
    np.testing.assert_allclose(row[4 * k:4 * k + 4], layers.sincos_1d(4, np.array([pos]))[0], rtol=1e-6)
  np.testing.assert_array_equal(row[12:], 0.0)
  assert len({tuple(r) for r in np.round(emb[1:], 5)}) == 24                # every position distinct


def test_volume_forward_tokens_and_pos_embed_checks():
  model = _vit(patch_3d=(2, 4, 4))
  out = _apply(model, _variables(model, VOL), VOL)
  assert out.shape == (2, 1 + 4 * 4 * 3, 48)
  with pytest.raises(ValueError, match="sincos3d"):
    jax.eval_shape(_vit(pos_embed="sincos2d").init, jax.random.PRNGKey(0), VOL)
  with pytest.raises(ValueError, match="not divisible by the patch size 4x4x4"):
    jax.eval_shape(_vit().init, jax.random.PRNGKey(0), VOL[:, :6])


def test_learned_3d_pos_embed_is_resampled_to_a_new_grid():
  model = _vit(pos_embed="learned", patch_3d=(2, 4, 4), volume_size=(8, 16, 12))
  variables = _variables(model, VOL)
  assert variables["params"]["pos_embed"].shape == (1, 4 * 4 * 3, 48)
  assert _apply(model, variables, np.ones((1, 16, 16, 12, 1), np.float32)).shape == (1, 1 + 8 * 4 * 3, 48)
  # A field linear along d is resampled (tricubic, half-pixel centres) to a twice-as-deep grid
  # as the same linear ramp away from the borders; h and w are left as they were.
  ramp = np.broadcast_to(np.arange(4.0, dtype=np.float32)[:, None, None, None], (4, 4, 3, 2)).reshape(1, -1, 2)
  grid = np.asarray(_interpolate(ramp, (4, 4, 3), (8, 4, 3), num_prefix=0))
  grid = grid.reshape(8, 4, 3, 2)
  np.testing.assert_allclose(grid[3:5, 1, 2, 0], [1.25, 1.75], atol=1e-5)
  np.testing.assert_allclose(grid[:, 0], grid[:, 3], atol=1e-6)


def test_3d_pos_embed_resampling_is_separable_per_axis_in_d_h_w_order():
  """Tricubic resampling of a product field f(d) g(h) k(w) is the product of the 1-D cubic
  resamplings of the factors (the kernel is separable), each along its own axis, for up- and
  downsampling; a grid read in another axis order (negative control) does not give it."""
  rng = np.random.default_rng(0)
  old, new = (3, 5, 4), (6, 4, 7)
  factors = [rng.normal(size=n).astype(np.float32) for n in old]
  field = np.einsum("d,h,w->dhw", *factors)[..., None] * np.array([1.0, -2.0], np.float32)
  got = np.asarray(_interpolate(field.reshape(1, -1, 2), old, new, num_prefix=0)).reshape(*new, 2)
  resized = [np.asarray(jax.image.resize(f, (n,), "cubic")) for f, n in zip(factors, new)]
  want = np.einsum("d,h,w->dhw", *resized)[..., None] * np.array([1.0, -2.0], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Negative control: the same tokens taken as a (w, h, d)-ordered grid.
  swapped = np.asarray(_interpolate(field.transpose(2, 1, 0, 3).reshape(1, -1, 2), old, new, num_prefix=0))
  assert not np.allclose(swapped.reshape(*new, 2), want, atol=1e-2)


@pytest.mark.slow
def test_scanned_rematted_stack_matches_unrolled_on_volumes():
  x = VOL[:, :, :, :8]
  unrolled = _vit()
  params = _variables(unrolled, x, seed=1)["params"]
  scanned = _vit(remat="full", scan=True)
  np.testing.assert_allclose(_apply(scanned, {"params": vit.stack_layers(params)}, x),
                             _apply(unrolled, {"params": params}, x), atol=2e-5)


@pytest.mark.slow
def test_sharded_volume_forward_matches_single_device():
  """data=2 x fsdp=4 over the 8 fake devices: params sharded by their logical names (the patch
  projection's embed dim over fsdp), the output equals the unsharded forward."""
  model = _vit(patch_3d=(2, 4, 4), width=64, num_heads=4)
  x = np.tile(VOL, (4, 1, 1, 1, 1))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  host = random_params(abstract)
  ref = _apply(model, host, x)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  with mesh_lib.use_mesh(mesh):
    variables = jax.device_put(host, mesh_lib.tree_shardings(abstract, mesh))
    xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, 5))
    out = _apply(model, variables, xs)
  kernel = variables["params"]["patch_embed"]["proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  np.testing.assert_allclose(out, ref, atol=2e-5)
