"""Primus tokens-only patch decoder: nnssl's stage widths, shapes, and logits that depend on the
encoder's tokens alone (UNETR, with its input skip, is the negative control)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import patch_decoder, unetr, vit
from medfm_jax.parallel import programs

VOL = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 8, 1)), jnp.float32)


def _encoder():
  return vit.VisionTransformer(variant="Mu/4", depth=1, width=48, num_heads=2, mlp_dim=96,
                               pos_embed="sincos3d", image_size=8)


def test_stage_channels_follow_nnssl_patch_decode():
  # Primus-M, 2 classes: r = (864 / 4)^(1/3) = 6 -> 144, 24, 4 -> round8 keeps >= 8, last = classes.
  assert patch_decoder.stage_channels(864, 2, 8) == (144, 24, 2)
  # Tiny (Mu/4, 4 classes): r = (96 / 8)^(1/2) = 3.46 -> 27.7 -> 24, then 4 classes.
  assert patch_decoder.stage_channels(96, 4, 4) == (24, 4)
  with pytest.raises(ValueError, match=r"^objective.decoder='vnet': allowed: unetr, primus$"):
    patch_decoder.segmentation_model("vnet", _encoder(), 4, 8)


def _with_tokens(tokens):
  """Every encoder call returns ``tokens`` (and them as each hidden state UNETR asks for) without
  running the encoder, so the decoder sees fixed tokens whatever the input volume."""
  def fixed(next_fun, args, kwargs, context):
    if not isinstance(context.module, vit.VisionTransformer) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    hidden = kwargs.get("return_hidden", ())
    return (tokens, [tokens] * len(hidden)) if hidden else tokens
  return nn.intercept_methods(fixed)


def _decoder_and_logits(model, tokens):
  """(decoder params, logits(volumes, tokens)) with the encoder replaced by ``tokens``."""
  with _with_tokens(tokens):   # traced inside the interception; one program each, not op by op
    params = programs.jit_once(lambda: model.init(jax.random.PRNGKey(0), VOL))()["params"]

  @jax.jit
  def logits(volumes, toks):
    with _with_tokens(toks):
      return model.apply({"params": params}, volumes)
  return params, logits


def test_primus_shapes_and_params():
  model = patch_decoder.segmentation_model("primus", _encoder(), 4, 8)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), VOL)["params"]
  assert set(params) == {"encoder", "decoder"}
  assert params["decoder"]["up0"]["kernel"].value.shape == (48, 2, 2, 2, 16)
  logits = jax.eval_shape(lambda p: model.apply(p, VOL), {"params": params})
  assert logits.shape == (2, 8, 8, 8, 4) and logits.dtype == jnp.float32


def test_primus_logits_depend_on_the_tokens_only():
  model = patch_decoder.segmentation_model("primus", _encoder(), 4, 8)
  prefix = model.encoder.num_prefix_tokens
  tokens = jax.random.normal(jax.random.PRNGKey(1), (2, prefix + 8, 48))   # 2^3 token grid, width 48
  params, logits = _decoder_and_logits(model, tokens)
  assert set(params) == {"decoder"}
  held = logits(VOL, tokens)
  np.testing.assert_array_equal(held, logits(VOL[::-1] * 3.0 + 1.0, tokens))
  assert float(jnp.abs(held - logits(VOL, tokens + 1.0)).max()) > 1e-3
  # Each token decodes only its own 4^3 voxels.
  diff = jnp.abs(logits(VOL, tokens.at[:, prefix].add(1.0)) - held).max(-1)
  assert float(diff[:, :4, :4, :4].min()) > 0
  assert float(diff[:, 4:].max() + diff[:, :, 4:].max() + diff[:, :, :, 4:].max()) == 0


def test_unetr_logits_see_the_input_volume():
  """Negative control: the same check detects UNETR's skip from the input volume."""
  model = unetr.Unetr(_encoder(), 4, 2)
  tokens = jax.random.normal(jax.random.PRNGKey(1), (2, model.encoder.num_prefix_tokens + 8, 48))
  _, logits = _decoder_and_logits(model, tokens)
  assert float(jnp.abs(logits(VOL, tokens) - logits(VOL[::-1] * 3.0 + 1.0, tokens)).max()) > 1e-3
