"""GPU-only checks, skipped where there is no GPU (run them on a GPU machine with
``JAX_PLATFORMS=cuda,cpu python -m pytest tests/gpu``): cuDNN flash attention against XLA's
attention, and a float32 train step on the GPU against the same step on the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import layers
from medfm_jax.parallel import mesh as mesh_lib
from tests import helpers


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = pytest.mark.skipif(not _gpus(), reason="needs a GPU (JAX_PLATFORMS=cuda,cpu on a GPU machine)")

_B, _S, _D, _H = 4, 77, 256, 4     # head_dim 64; 77 is not a multiple of cuDNN's tiles


def _masks(kind):
  """None, key padding (each row keeps a different number of keys), or causal."""
  if kind == "padding":
    valid = np.arange(_S)[None, :] < np.array([_S, 60, 33, 5])[:, None]       # [b, k]
    return jnp.asarray(valid[:, None, None, :]), False
  return None, kind == "causal"


def _attention_and_grads(implementation, dtype, params, x, mask, causal):
  module = layers.Attention(_H, dtype=dtype, implementation=implementation)
  def loss(p, x):
    y = module.apply({"params": p}, x, mask=mask, is_causal=causal)
    return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(y.size).reshape(y.shape) * 0.1)), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return jax.device_get((y.astype(jnp.float32), grads))


def _max_error(a, b):
  return max(float(np.max(np.abs(np.asarray(u, np.float32) - np.asarray(v, np.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_cudnn_flash_attention_matches_xla(mask_kind):
  """Outputs and gradients of our Attention layer in bf16 with cuDNN vs XLA attention: the gap
  between the two must be within 2x bf16's own error against a float32 XLA reference."""
  x = jax.random.normal(jax.random.key(0), (_B, _S, _D), jnp.float32)
  params = layers.Attention(_H).init(jax.random.key(1), x)["params"]
  mask, causal = _masks(mask_kind)
  reference = _attention_and_grads(None, jnp.float32, params, x, mask, causal)
  xla = _attention_and_grads("xla", jnp.bfloat16, params, x, mask, causal)
  cudnn = _attention_and_grads("cudnn", jnp.bfloat16, params, x, mask, causal)
  bf16_error = _max_error(xla, reference)
  assert _max_error(cudnn, xla) <= 2 * bf16_error + 1e-3, (_max_error(cudnn, xla), bf16_error)
  if mask_kind != "none":   # negative control: the same comparison sees a dropped mask
    unmasked = _attention_and_grads("cudnn", jnp.bfloat16, params, x, None, False)
    assert _max_error(unmasked, xla) > 2 * bf16_error + 1e-3


def test_float32_train_step_on_gpu_matches_cpu():
  """Two plain-SGD steps of the tiny MAE in float32 (matmuls at 'highest' precision, no TF32) on
  the GPU and on the CPU from the same initial state: same losses, gradient norms and updates."""
  config = helpers.tiny_mae_config(**helpers.sgd_overrides())
  mesh = lambda device: mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device])
  with jax.default_matmul_precision("highest"):
    cpu = helpers.StepRunner(config, mesh(jax.devices("cpu")[0]))
    gpu = helpers.StepRunner(config, mesh(_gpus()[0]))
    gpu._initial = cpu._initial   # pylint: disable=protected-access  (one initial state for both)
    ref = cpu.run(2)
    helpers.assert_same_training(gpu.run(2), ref, loss_atol=1e-5, rtol=1e-4)
    helpers.assert_check_sees_gradient_scale(gpu, ref, loss_atol=1e-5, rtol=1e-4)
