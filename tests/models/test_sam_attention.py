"""SAM's relative-position attention computed a query chunk at a time equals the whole computation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import sam as sam_lib
from medfm_jax.models import sam_encoder

GRID = (6, 5)          # not square, so a row / column mix-up in the chunked bias shows
HEADS, WIDTH = 2, 16


def _random_params(module, x, seed=0):
  """Init, then overwrite every leaf (the rel-pos tables init at zero) with random values."""
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), x))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _output_and_grads(chunk, params, x, cotangent, use_rel_pos=True):
  attn = sam_encoder.RelPosAttention(HEADS, GRID, use_rel_pos=use_rel_pos, query_chunk=chunk)
  f = lambda p, inp: jnp.sum(attn.apply(p, inp) * cotangent)
  out = jax.jit(attn.apply)(params, x)
  grads = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
  return out, grads


@pytest.fixture(scope="module")
def whole():
  x = jax.random.normal(jax.random.key(2), (2, *GRID, WIDTH))
  cotangent = jax.random.normal(jax.random.key(3), (2, *GRID, WIDTH))
  params = _random_params(sam_encoder.RelPosAttention(HEADS, GRID), x)
  return params, x, cotangent, _output_and_grads(0, params, x, cotangent)


@pytest.mark.parametrize("chunk", [7, 10])   # 30 queries: a padded last chunk, and an exact split
def test_chunked_equals_whole_outputs_and_gradients(whole, chunk):
  params, x, cotangent, (out0, (gp0, gx0)) = whole
  out, (gp, gx) = _output_and_grads(chunk, params, x, cotangent)
  np.testing.assert_allclose(out, out0, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gx, gx0, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), gp, gp0)


def test_the_bias_is_exercised(whole):
  """Negative control: the comparison above would pass vacuously if the position bias were ~0. With
  the tables' random values, dropping the bias (or misplacing it: the rows of the grid shifted by
  one, as an off-by-one in the chunked gather would) moves the outputs far beyond the tolerance."""
  params, x, cotangent, (out0, _) = whole
  no_bias, _ = _output_and_grads(7, params, x, cotangent, use_rel_pos=False)
  assert float(jnp.abs(no_bias - out0).max()) > 1e-2
  table_h = params["params"]["rel_pos_h"]
  shifted = jax.tree.map(lambda a: a, params)
  shifted["params"]["rel_pos_h"] = jnp.roll(table_h, 1, axis=0)
  moved, _ = _output_and_grads(7, shifted, x, cotangent)
  assert float(jnp.abs(moved - out0).max()) > 1e-2


def test_encoder_with_attention_chunk_gives_the_same_embeddings():
  """The field reaches the global blocks through ``build_sam``; windowed blocks (fewer tokens than
  the chunk) keep the whole computation."""
  cfg = dict(image_size=48, patch_size=8, channels=1, width=16, depth=2, num_heads=2, mlp_dim=32,
             window_size=4, global_attn_indexes=(1,), prompt_dim=16, decoder_heads=2, decoder_mlp_dim=32,
             iou_head_hidden_dim=16)
  images = jax.random.normal(jax.random.key(0), (1, 48, 48, 1))
  whole_model, chunked = sam_lib.build_sam(cfg), sam_lib.build_sam(cfg, attention_chunk=10)
  assert chunked.image_encoder.attention_chunk == 10
  params = _random_params(whole_model.image_encoder, images)
  emb0 = jax.jit(whole_model.image_encoder.apply)(params, images)
  emb = jax.jit(chunked.image_encoder.apply)(params, images)
  np.testing.assert_allclose(emb, emb0, atol=1e-5, rtol=1e-5)


def test_chunks_bound_the_backward_pass_temporaries():
  """The point of chunking: a global block's gradient program over a 32 x 32 grid needs a fraction
  of the temporaries (XLA's own memory analysis; the whole version holds [b, heads, 1024, 1024]
  bias, logits and probabilities for the backward pass)."""
  grid = (32, 32)
  x = jnp.zeros((1, *grid, WIDTH))

  def temporaries(chunk):
    attn = sam_encoder.RelPosAttention(HEADS, grid, query_chunk=chunk)
    params = jax.eval_shape(attn.init, jax.random.key(0), x)
    loss = lambda p, inp: jnp.sum(attn.apply(p, inp) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temporaries(0), temporaries(128)
  assert chunked < 0.3 * whole, (chunked, whole)
