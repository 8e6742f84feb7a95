"""``model.cls_pool``: the first output token holds the max / mean of the final patch tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import vit
from tests.helpers import random_params


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.slow
def test_cls_slot_holds_pooled_patch_tokens(pool):
  x = np.random.default_rng(1).standard_normal((2, 16, 16, 1)).astype(np.float32)
  base = vit.VisionTransformer("Mu/4", image_size=16, num_registers=2)
  variables = random_params(jax.eval_shape(base.init, jax.random.key(0), x))   # numpy: no init to compile
  # Both forwards in one program: XLA merges the tower they share.
  ref, out = jax.jit(lambda v, x: (base.apply(v, x), base.clone(cls_pool=pool).apply(v, x)))(variables, x)
  patches = np.asarray(ref[:, 3:])                                 # ref: [2, 1 + 2 + 16, 96]
  want = patches.max(1) if pool == "max" else patches.mean(1)
  np.testing.assert_allclose(out[:, 0], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[:, 1:], ref[:, 1:])            # registers and patches untouched
  assert not np.allclose(out[:, 0], ref[:, 0])


def test_cls_pool_errors():
  x = jnp.ones((1, 16, 16, 1))
  with pytest.raises(ValueError, match="model.cls_pool='top'"):
    jax.eval_shape(vit.VisionTransformer("Mu/4", image_size=16, cls_pool="top").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="class_token=True"):
    jax.eval_shape(vit.VisionTransformer("Mu/4", image_size=16, cls_pool="max", class_token=False).init,
                   jax.random.key(0), x)


@pytest.mark.parametrize("overrides, message", [
    ({"model.cls_pool": "top"}, "model.cls_pool='top'"),
    ({"model.cls_pool": "max", "model.class_token": False}, "model.class_token=True"),
])
def test_config_rejects_bad_cls_pool(overrides, message):
  from medfm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from configs import clip  # pylint: disable=g-import-not-at-top
  c = clip.get_config("tiny")
  c.model.cls_pool = "max"
  config_lib.validate(c, None, 1)
  for k, v in overrides.items():
    c.model[k.split(".")[1]] = v
  with pytest.raises(config_lib.ConfigError, match="model.cls_pool") as e:
    config_lib.validate(c, None, 1)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_max_pool_gradient_same_at_every_xla_optimisation_level():
  """The max-pooled cls slot's gradient does not depend on how XLA fuses the model: CLIP tiny's
  tower (conv stem, LayerScale) compiled at XLA's CPU optimisation level 0 and at the default 3.
  ``patches.max`` failed this (level 0: NaN gradients; level 1: image-tower gradients off by up
  to 65% in a CLIP step): its gradient goes to the entries equal to the forward maximum, and a
  recomputed ``patches`` in another fusion, with other rounding, matched none of them."""
  x = np.random.RandomState(0).randn(4, 16, 16, 1).astype(np.float32)
  w = np.random.RandomState(1).randn(4, 32).astype(np.float32)
  model = vit.VisionTransformer("Mu/4", image_size=16, width=32, depth=1, num_heads=2, mlp_dim=64,
                                patch_embed="conv", layer_scale_init=0.1, cls_pool="max")
  params = random_params(jax.eval_shape(model.init, jax.random.key(0), x))   # numpy: no init to compile
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x)[:, 0] * w))).lower(params)
  want, got = (grad.compile(compiler_options={"xla_backend_optimization_level": level})(params)
               for level in (3, 0))
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * largest, err_msg=jax.tree_util.keystr(path))
