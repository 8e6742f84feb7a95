"""Volumetric ViT: 3-D patches and position embeddings on the 2-D blocks, scan and sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import layers, vit
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.parallel import programs

VOL = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 16, 12, 1)), jnp.float32)


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
  params = embed.init(jax.random.PRNGKey(0), VOL)["params"]
  kernel = params["proj"]["kernel"].value.reshape(2, 4, 4, 1, 8)          # DHWIO
  conv = jax.lax.conv_general_dilated(VOL, kernel, (2, 4, 4), "VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  conv = conv + params["proj"]["bias"].value
  np.testing.assert_allclose(embed.apply({"params": params}, VOL), conv.reshape(2, -1, 8), atol=1e-5)


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
  variables = programs.jit_once(model.init)(jax.random.PRNGKey(0), VOL)
  out = model.apply(variables, VOL)
  assert out.shape == (2, 1 + 4 * 4 * 3, 48)
  with pytest.raises(ValueError, match="sincos3d"):
    _vit(pos_embed="sincos2d").init(jax.random.PRNGKey(0), VOL)
  with pytest.raises(ValueError, match="not divisible by the patch size 4x4x4"):
    _vit().init(jax.random.PRNGKey(0), VOL[:, :6])


def test_learned_3d_pos_embed_is_resampled_to_a_new_grid():
  model = _vit(pos_embed="learned", patch_3d=(2, 4, 4), volume_size=(8, 16, 12))
  variables = programs.jit_once(model.init)(jax.random.PRNGKey(0), VOL)
  assert variables["params"]["pos_embed"].value.shape == (1, 4 * 4 * 3, 48)
  assert model.apply(variables, jnp.ones((1, 16, 16, 12, 1))).shape == (1, 1 + 8 * 4 * 3, 48)
  # A field linear along d is resampled (tricubic, half-pixel centres) to a twice-as-deep grid
  # as the same linear ramp away from the borders; h and w are left as they were.
  ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 4, 3, 2)).reshape(1, -1, 2)
  grid = np.asarray(layers.interpolate_pos_embed(ramp, (4, 4, 3), (8, 4, 3), num_prefix=0))
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
  got = np.asarray(layers.interpolate_pos_embed(jnp.asarray(field.reshape(1, -1, 2)), old, new,
                                                num_prefix=0)).reshape(*new, 2)
  resized = [np.asarray(jax.image.resize(f, (n,), "cubic")) for f, n in zip(factors, new)]
  want = np.einsum("d,h,w->dhw", *resized)[..., None] * np.array([1.0, -2.0], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Negative control: the same tokens taken as a (w, h, d)-ordered grid.
  swapped = np.asarray(layers.interpolate_pos_embed(
      jnp.asarray(field.transpose(2, 1, 0, 3).reshape(1, -1, 2)), old, new, num_prefix=0))
  assert not np.allclose(swapped.reshape(*new, 2), want, atol=1e-2)


@pytest.mark.slow
def test_scanned_rematted_stack_matches_unrolled_on_volumes():
  x = VOL[:, :, :, :8]
  unrolled = _vit()
  params = nn.unbox(programs.jit_once(unrolled.init)(jax.random.PRNGKey(1), x))["params"]
  scanned = _vit(remat="full", scan=True)
  np.testing.assert_allclose(scanned.apply({"params": vit.stack_layers(params)}, x),
                             unrolled.apply({"params": params}, x), atol=2e-5)


@pytest.mark.slow
def test_sharded_volume_forward_matches_single_device():
  """data=2 x fsdp=4 over the 8 fake devices: params sharded by their logical names (the patch
  projection's embed dim over fsdp), the output equals the unsharded forward."""
  model = _vit(patch_3d=(2, 4, 4), width=64, num_heads=4)
  x = jnp.tile(VOL, (4, 1, 1, 1, 1))
  init = lambda: model.init(jax.random.PRNGKey(0), x)
  ref = model.apply(init(), x)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  with mesh_lib.use_mesh(mesh):
    shardings = mesh_lib.tree_shardings(jax.eval_shape(init), mesh)
    variables = jax.jit(lambda: mesh_lib.unbox(init()), out_shardings=shardings)()
    xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, 5))
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, xs)
  kernel = variables["params"]["patch_embed"]["proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  np.testing.assert_allclose(out, ref, atol=2e-5)
