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
