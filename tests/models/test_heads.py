import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import heads
from medfm_jax.objectives import dino_losses as dl
from medfm_jax.parallel import programs


def _init(head, d=24, b=6, seed=0):
  x = np.random.default_rng(seed).standard_normal((b, d)).astype(np.float32)   # numpy: no program per shape
  return x, programs.jit_once(head.init)(jax.random.PRNGKey(1), x)


def _effective_kernel(params, gain=None):
  v = np.asarray(nn.unbox(params)["params"]["last_layer"]["v"], np.float64)
  w = v / np.linalg.norm(v, axis=0, keepdims=True)
  return w if gain is None else w * gain


def test_shape_dtype_and_unit_columns():
  head = heads.DinoHead(out_dim=40, hidden_dim=32, bottleneck_dim=16)
  x, variables = _init(head)
  y = jax.jit(head.apply)(variables, x)
  assert y.shape == (6, 40) and y.dtype == jnp.float32
  p = nn.unbox(variables)["params"]
  assert set(p["last_layer"]) == {"v"}            # gain fixed at 1: no trainable g
  assert p["last_layer"]["v"].shape == (16, 40)
  np.testing.assert_allclose(np.linalg.norm(_effective_kernel(variables), axis=0), 1.0, rtol=1e-6)
  # Logits are cosines of the normalised bottleneck with unit columns: |y| <= 1.
  assert np.all(np.abs(np.asarray(y)) <= 1.0 + 1e-5)


def test_matches_numpy_forward_and_normalised_bottleneck():
  head = heads.DinoHead(out_dim=12, hidden_dim=20, bottleneck_dim=8, num_layers=3)
  x, variables = _init(head)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
  h = np.asarray(x, np.float64)
  gelu = lambda z: 0.5 * z * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2)))
  for i in range(3):
    h = h @ p[f"mlp_{i}"]["kernel"] + p[f"mlp_{i}"]["bias"]
    if i < 2:
      h = gelu(h)
  z = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(jax.jit(head.apply)(variables, x), z @ _effective_kernel(variables),
                             rtol=1e-4, atol=1e-5)


def test_trainable_gain_when_not_norm_last_layer():
  head = heads.DinoHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
  x, variables = _init(head)
  p = nn.unbox(variables)["params"]["last_layer"]
  np.testing.assert_array_equal(p["g"], 1.0)
  grads = jax.jit(jax.grad(lambda v: head.apply(v, x).sum()))(variables)
  assert np.any(np.asarray(nn.unbox(grads)["params"]["last_layer"]["g"]) != 0)


def test_every_param_boxed_with_logical_names():
  head = heads.DinoHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
  variables = jax.eval_shape(head.init, jax.random.PRNGKey(1), np.zeros((6, 24), np.float32))
  leaves = jax.tree_util.tree_flatten_with_path(
      variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]
  assert len(leaves) == 3 * 2 + 2
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == leaf.value.ndim and all(n is not None for n in leaf.names), path
  boxed = variables["params"]["last_layer"]
  assert boxed["v"].names == ("embed", "vocab") and boxed["g"].names == ("vocab",)
  assert variables["params"]["mlp_0"]["kernel"].names == ("embed", "mlp")


def test_init_scales():
  head = heads.DinoHead(out_dim=512, hidden_dim=256, bottleneck_dim=64)
  _, variables = _init(head, d=128)
  p = nn.unbox(variables)["params"]
  assert abs(float(np.std(p["mlp_1"]["kernel"])) - 0.02) < 0.002
  np.testing.assert_array_equal(p["mlp_0"]["bias"], 0.0)
  assert float(np.max(np.abs(p["last_layer"]["v"]))) <= 1 / np.sqrt(64)


def test_weight_norm_gradient_orthogonal_to_v():
  head = heads.DinoHead(out_dim=16, hidden_dim=24, bottleneck_dim=8)
  x, variables = _init(head, b=8)
  params = nn.unbox(variables)
  rng = np.random.default_rng(0)
  s_views = jnp.asarray(rng.normal(size=(4, 8, 24)).astype(np.float32))
  teacher = jnp.asarray(rng.normal(size=(2, 8, 16)).astype(np.float32))

  def loss_fn(p):
    logits = jax.vmap(lambda v: head.apply(p, v))(s_views)
    return dl.dino_loss(logits, teacher, jnp.zeros(16), 0.1, 0.04, 2)[0]

  grad_v = np.asarray(jax.jit(jax.grad(loss_fn))(params)["params"]["last_layer"]["v"], np.float64)
  v = np.asarray(params["params"]["last_layer"]["v"], np.float64)
  assert np.abs(grad_v).max() > 1e-4
  cos = np.sum(grad_v * v, 0) / (np.linalg.norm(grad_v, axis=0) * np.linalg.norm(v, axis=0))
  np.testing.assert_allclose(cos, 0.0, atol=1e-4)


def test_patch_tokens_and_last_layer_mask():
  head = heads.DinoHead(out_dim=10, hidden_dim=16, bottleneck_dim=8)
  x = np.ones((2, 5, 12), np.float32)
  variables = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(head.apply, variables, x).shape == (2, 5, 10)
  mask = heads.last_layer_mask(nn.unbox(variables)["params"])
  assert mask["last_layer"]["v"] is True and mask["mlp_0"]["kernel"] is False
