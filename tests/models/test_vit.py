import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import layers, vit
from tests.helpers import random_params

# Params come from helpers.random_params (numpy, nothing to compile; non-trivial norms) and inits'
# structures, shapes and dtypes from jax.eval_shape; forward passes run as one jitted program each
# (eager, every op of the model and every jax.random shape of its init compiles on its own).


@functools.partial(jax.jit, static_argnums=0, static_argnames=("deterministic",))
def _apply(model, variables, *args, **kwargs):
  return model.apply(variables, *args, **kwargs)


def _images(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _params(model, x, seed=0):
  return random_params(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed)


def test_sincos_values_match_formula():
  emb = layers.sincos_2d(8, 2, 3, cls_token=True)       # [1 + 2*3, 8]
  assert emb.shape == (7, 8)
  np.testing.assert_array_equal(emb[0], 0.0)
  # Patch (row=1, col=2) is index 1 + 1*3 + 2. First half encodes the column, second the row.
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  col, row = 2, 1
  expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(emb[1 + 1 * 3 + 2], expected, rtol=1e-6)


def test_patchify_roundtrip_and_order():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  p = vit.patchify(x, 4)
  assert p.shape == (2, 6, 48)
  # Second patch of the first row: pixels [0:4, 4:8], flattened in (p, q, c) order.
  np.testing.assert_array_equal(p[0, 1], np.asarray(x[0, 0:4, 4:8, :]).reshape(-1))
  np.testing.assert_array_equal(vit.unpatchify(p, 4, (2, 3), 3), x)


@pytest.mark.parametrize("bad", ["X/16", "B", "B/0", "B/x"])
def test_parse_variant_rejects(bad):
  with pytest.raises(ValueError, match="model.variant"):
    vit.parse_variant(bad)


def test_parse_variant():
  assert vit.parse_variant("L/16") == vit.ViTSize(1024, 24, 16, 4096, 16)
  assert vit.parse_variant("H/14").patch_size == 14


def test_params_carry_logical_names():
  model = vit.VisionTransformer("Mu/4", image_size=16)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16, 16, 1)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  q = boxed["encoder"]["layer_0"]["attn"]["query"]["kernel"]
  assert q.names == ("embed", "heads", "kv") and q.value.shape == (96, 3, 32)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.slow
def test_scan_matches_unrolled(remat):
  x = _images((2, 16, 16, 3))
  unrolled = vit.VisionTransformer("Mu/4", image_size=16, drop_path=0.1)
  scanned = unrolled.clone(scan=True, remat=remat)
  params = _params(unrolled, x)
  stacked = vit.stack_layers(params)
  y0 = _apply(unrolled, {"params": params}, x)
  y1 = _apply(scanned, {"params": stacked}, x)
  np.testing.assert_allclose(y0, y1, atol=1e-5)
  # The scanned init has exactly the stacked structure.
  init_scanned = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x))["params"]
  assert jax.tree.structure(init_scanned) == jax.tree.structure(stacked)
  assert jax.tree.map(jnp.shape, init_scanned) == jax.tree.map(jnp.shape, stacked)
  assert jax.tree.structure(vit.unstack_layers(stacked)) == jax.tree.structure(params)


@pytest.mark.slow
def test_drop_path_only_in_training():
  x = _images((8, 16, 16, 1))
  model = vit.VisionTransformer("Mu/4", image_size=16, drop_path=0.5)
  variables = {"params": _params(model, x)}
  det = _apply(model, variables, x)
  np.testing.assert_array_equal(det, _apply(model, variables, x))
  train = _apply(model, variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(det, train)


@pytest.mark.slow
def test_learned_pos_embed_interpolates_and_registers():
  model = vit.VisionTransformer("Mu/4", image_size=16, pos_embed="learned", num_registers=2)
  x = np.ones((1, 16, 16, 1), np.float32)
  params = _params(model, x)
  assert params["pos_embed"].shape == (1, 16, 96)
  out = _apply(model, {"params": params}, np.ones((1, 24, 24, 1), np.float32))   # 6x6 grid from a 4x4 table
  assert out.shape == (1, 1 + 2 + 36, 96)


def test_bfloat16_compute_keeps_float32_params():
  model = vit.VisionTransformer("Mu/4", image_size=16, dtype=jnp.bfloat16)
  x = jnp.ones((1, 16, 16, 1))
  variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16


def test_mask_token_replaces_masked_patches_only():
  model = vit.VisionTransformer("Mu/4", image_size=16, mask_token=True, layer_norm_eps=1e-6)
  x = _images((2, 16, 16, 1), seed=0)
  params = _params(model, x)
  assert params["mask_token"].shape == (1, 1, model.size.width)
  none = np.zeros((2, 16), bool)
  np.testing.assert_array_equal(_apply(model, {"params": params}, x, patch_mask=none),
                                _apply(model, {"params": params}, x))
  # A masked patch no longer depends on its pixels: two images differing only there agree.
  mask = none.copy()
  mask[:, 0] = True
  y = x.copy()
  y[:, :4, :4] = 5.0                 # patch 0 is the top-left 4x4 block
  np.testing.assert_allclose(_apply(model, {"params": params}, x, patch_mask=mask),
                             _apply(model, {"params": params}, y, patch_mask=mask), atol=1e-6)
  with pytest.raises(ValueError, match="mask_token"):
    jax.eval_shape(vit.VisionTransformer("Mu/4", image_size=16).init, jax.random.PRNGKey(1), x, patch_mask=mask)
