"""Last-layer cls attention maps: consistent with the block's own attention output, scan-safe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medfm_jax.metrics import attention_maps
from medfm_jax.models import vit
from tests.helpers import random_params


def _model_and_params(**kw):
  """Numpy params and images (an init and jax.random draws would compile programs of their own)."""
  model = vit.VisionTransformer("Mu/4", image_size=16, num_registers=2, **kw)
  images = np.random.default_rng(0).standard_normal((3, 16, 16, 1)).astype(np.float32)
  return model, random_params(jax.eval_shape(model.init, jax.random.PRNGKey(1), images)["params"]), images


@pytest.mark.slow
def test_probs_reproduce_the_blocks_attention_output():
  model, params, images = _model_and_params()

  @jax.jit   # one program (eager, every op compiles on its own); XLA merges the repeated forwards
  def outputs(params, images):
    probs = attention_maps.cls_attention(model, params, images, patches_only=False)   # [b, h, T]
    x, attn, _ = attention_maps.last_block_input(model, params, images)
    v = attention_maps.project(x, attn["value"])
    mixed = jnp.einsum("bhs,bshk->bhk", probs, v, precision="highest")
    ours = jnp.einsum("bhk,hkd->bd", mixed, attn["out"]["kernel"], precision="highest") + attn["out"]["bias"]
    last = f"layer_{model.size.depth - 1}"
    _, state = model.apply({"params": params}, images, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: m.path == ("encoder", last, "attn"))
    reference = state["intermediates"]["encoder"][last]["attn"]["__call__"][0][:, 0]
    return probs, ours, reference, attention_maps.cls_attention(model, params, images)

  probs, ours, reference, maps = outputs(params, images)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(ours, reference, atol=1e-5)
  assert maps.shape == (3, model.size.num_heads, 4, 4)
  np.testing.assert_allclose(maps.reshape(3, model.size.num_heads, 16), probs[:, :, 3:], rtol=1e-6)


@pytest.mark.slow
def test_scanned_encoder_gives_same_maps_and_png(tmp_path):
  model, params, images = _model_and_params()
  scanned = model.clone(scan=True)
  stacked = dict(params, encoder=vit.stack_layers(params["encoder"], stack=np.stack))
  maps_of = jax.jit(attention_maps.cls_attention, static_argnums=0)
  maps = np.asarray(maps_of(model, params, images))
  np.testing.assert_allclose(maps_of(scanned, stacked, images), maps, atol=1e-6)
  path = str(tmp_path / "attn.png")
  attention_maps.write_attention_png(path, images, maps, (0.5,), (0.25,), scale=1)
  png = np.asarray(Image.open(path))
  assert png.shape == (3 * 16, (2 + model.size.num_heads) * 16) and png.std() > 0
