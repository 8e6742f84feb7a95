"""The cuDNN attention path's padding, checked on CPU: ``layers.dot_product_attention(...,
'cudnn')`` hands cuDNN only sequence lengths that are multiples of 8 and masks shaped
``[b, h, T, S]`` (the shapes cuDNN accepts, seen failing on an H200 otherwise), and undoes the
padding exactly. cuDNN itself is replaced by XLA's attention here; tests/gpu compares the real
kernel with XLA on a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import layers

_XLA_ATTENTION = jax.nn.dot_product_attention


@pytest.fixture
def cudnn_as_xla(monkeypatch):
  """Routes implementation='cudnn' to XLA after checking the shapes cuDNN would be given."""
  seen = []
  def fake(q, k, v, *args, implementation=None, **kwargs):
    if implementation == "cudnn":
      mask = kwargs.get("mask")
      seen.append((q.shape[1], k.shape[1], None if mask is None else mask.shape))
    return _XLA_ATTENTION(q, k, v, *args, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return seen


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.slow
def test_cudnn_path_pads_to_multiples_of_8_and_matches_unpadded_attention(cudnn_as_xla, masked, causal):
  rng = np.random.default_rng(0)   # numpy: each jax.random shape is a program of its own
  q, k, v = (rng.standard_normal((4, 77, 2, 8)).astype(np.float32) for _ in range(3))
  valid = np.arange(77)[None, :] < np.array([77, 60, 33, 5])[:, None]
  mask = valid[:, None, None, :] if masked else None

  @jax.jit   # both paths, outputs and gradients, in one program (eager: every op compiles alone)
  def outputs(q):
    out = []
    for impl in (None, "cudnn"):
      attend = lambda q, impl=impl: layers.dot_product_attention(q, k, v, mask, causal, impl)
      out.append((attend(q), jax.grad(lambda q: jnp.sum(jnp.sin(attend(q))))(q)))
    return out
  (want, want_grad), (got, got_grad) = outputs(q)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)
  assert cudnn_as_xla
  for t, s, mask_shape in cudnn_as_xla:
    assert t % 8 == 0 and s % 8 == 0
    assert mask_shape is None or mask_shape == (4, 1, t, s)
  # Negative control: padded keys left visible change the result.
  if not masked and not causal:
    padded = lambda x: np.pad(x, ((0, 0), (0, 3), (0, 0), (0, 0)))
    leaky = np.asarray(jax.jit(_XLA_ATTENTION)(padded(q), padded(k), padded(v)))[:, :77]
    assert float(np.abs(leaky - want).max()) > 1e-3
