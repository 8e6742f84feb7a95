import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medfm_jax.models import vit
from medfm_jax.peft import lora
from tests.helpers import random_params

ALL_ATTN = (r".*/attn/(query|key|value|out)/kernel$", r".*/mlp/fc1/kernel$")


def _init(scan: bool):
  """(jitted forward, numpy params, images): params from helpers.random_params, nothing compiled
  but the forward (eager, each jax.random shape of an init is a program of its own)."""
  model = vit.VisionTransformer("Mu/4", image_size=16, scan=scan)
  images = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
  return jax.jit(model.apply), random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), images)), images


@pytest.fixture(scope="module")
def unrolled():
  return _init(False)


@pytest.fixture(scope="module")
def scanned():
  return _init(True)


def _randomize_b(adapters, seed=3):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  rng = np.random.default_rng(seed)
  out = [jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32) if lora.path_str(p).endswith("/b") else x
         for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def _assert_trees_equal(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b)


@pytest.mark.parametrize("fixture", ["unrolled", "scanned"])
def test_init_is_bitwise_identity(fixture, request):
  fwd, params, images = request.getfixturevalue(fixture)
  adapters, spec = lora.init(params, targets=ALL_ATTN, rank=4, rng=jax.random.PRNGKey(7))
  eff = lora.apply(params, adapters, spec)
  _assert_trees_equal(eff, params)
  eff_jit = jax.jit(lambda p, a, s: lora.apply(p, a, s))(params, adapters, spec)
  _assert_trees_equal(eff_jit, params)
  assert np.array_equal(fwd(eff, images), fwd(params, images))
  assert np.array_equal(fwd(eff_jit, images), fwd(params, images))


def test_adapter_shapes_and_split_rule(unrolled):
  _, params, _ = unrolled
  adapters, spec = lora.init(params, targets=lora.DEFAULT_TARGETS + (r".*/attn/out/kernel$",), rank=8)
  assert spec.scale == 2.0
  layer = adapters["params"]["encoder"]["layer_2"]["attn"]
  assert set(layer) == {"query", "value", "out"}
  assert set(adapters["params"]) == {"encoder"}          # only matched kernels are mirrored
  for name in ("query", "value"):                        # [96, 3, 32]: in = 96, out = 3*32
    assert layer[name]["kernel"]["a"].shape == (96, 8)
    assert layer[name]["kernel"]["b"].shape == (8, 96)
  assert layer["out"]["kernel"]["a"].shape == (96, 8)    # [3, 32, 96]: in = 3*32, out = 96
  assert layer["out"]["kernel"]["b"].shape == (8, 96)
  a = np.asarray(layer["query"]["kernel"]["a"])
  assert np.abs(a).max() <= 1 / math.sqrt(96) and np.abs(a).max() > 0.5 / math.sqrt(96)
  assert not np.any(np.asarray(layer["query"]["kernel"]["b"]))
  # Different kernels get different A.
  assert not np.array_equal(a, layer["value"]["kernel"]["a"])
  assert lora.split_dims("x/attn/out/kernel", (3, 32, 96)) == (0, 2, 1)
  assert lora.split_dims("x/attn/query/kernel", (96, 3, 32)) == (0, 1, 2)
  assert lora.split_dims("x/mlp/fc1/kernel", (96, 384)) == (0, 1, 1)
  assert lora.split_dims("x/layers/block/attn/out/kernel", (4, 3, 32, 96)) == (1, 2, 1)
  assert lora.split_dims("x/layers/block/attn/value/kernel", (4, 96, 3, 32)) == (1, 1, 2)


def test_scanned_adapters_match_unrolled(unrolled, scanned):
  _, params, _ = unrolled
  _, sparams, _ = scanned
  targets = lora.DEFAULT_TARGETS + (r".*/attn/out/kernel$",)
  sadapters, _ = lora.init(sparams, targets=targets, rank=8)
  block = sadapters["params"]["encoder"]["layers"]["block"]["attn"]
  assert block["query"]["kernel"]["a"].shape == (4, 96, 8)
  assert block["query"]["kernel"]["b"].shape == (4, 8, 96)
  assert block["out"]["kernel"]["a"].shape == (4, 96, 8)
  # One independent adapter per layer, and the stacked transform equals the per-layer one.
  a = block["query"]["kernel"]["a"]
  assert not np.array_equal(a[0], a[1])
  adapters, spec = lora.init(params, targets=targets, rank=8, rng=jax.random.PRNGKey(5))
  adapters = _randomize_b(adapters)
  stacked_base = vit.stack_layers(params["params"])
  stacked_adapters = vit.stack_layers(adapters["params"])
  got = lora.apply(stacked_base, stacked_adapters, spec)
  want = vit.stack_layers(lora.apply(params, adapters, spec)["params"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), got, want)


def test_apply_formula_and_merge_roundtrip(unrolled):
  fwd, params, images = unrolled
  targets = lora.DEFAULT_TARGETS + (r".*/attn/out/kernel$",)
  adapters, spec = lora.init(params, targets=targets, rank=4, alpha=8.0)
  adapters = _randomize_b(adapters)
  eff = lora.apply(params, adapters, spec)
  for name, shape in (("query", (96, 3, 32)), ("out", (3, 32, 96))):
    w0 = params["params"]["encoder"]["layer_1"]["attn"][name]["kernel"]
    ab = adapters["params"]["encoder"]["layer_1"]["attn"][name]["kernel"]
    want = w0 + 2.0 * (np.asarray(ab["a"], np.float64) @ np.asarray(ab["b"], np.float64)).reshape(shape)
    np.testing.assert_allclose(eff["params"]["encoder"]["layer_1"]["attn"][name]["kernel"], want, atol=1e-6)
  assert not np.array_equal(fwd(eff, images), fwd(params, images))
  merged = lora.merge(params, adapters, spec)
  _assert_trees_equal(merged, eff)
  # bfloat16 kernels: float32 math, cast back to the kernel dtype.
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lora.merge(bf, adapters, spec)))
  _assert_trees_equal(lora.apply(bf, lora.init(bf, rank=4)[0], spec), bf)


def test_rslora_scale(unrolled):
  _, params, _ = unrolled
  a1, s1 = lora.init(params, rank=16, alpha=16.0)
  a2, s2 = lora.init(params, rank=16, alpha=16.0, rslora=True)
  assert s1.scale == 1.0 and s2.scale == 4.0
  a1 = _randomize_b(a1)
  d1 = jax.tree.map(np.subtract, lora.apply(params, a1, s1), params)
  d2 = jax.tree.map(np.subtract, lora.apply(params, a1, s2), params)
  q = lambda t: t["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"]
  np.testing.assert_allclose(q(d2), 4.0 * q(d1), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradients_reach_b_only_at_init(unrolled):
  fwd, params, images = unrolled
  adapters, spec = lora.init(params, rank=4)

  def loss(ad):
    return jnp.mean(jnp.square(fwd(lora.apply(params, ad, spec), images)))

  grads = jax.jit(jax.grad(loss))(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  flat = {lora.path_str(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert len(flat) == 2 * 2 * 4            # (a, b) x (query, value) x 4 layers
  for path, g in flat.items():
    if path.endswith("/a"):
      assert not np.any(np.asarray(g)), path  # b = 0  =>  dL/dA = s * dL/dW @ B^T = 0
    else:
      assert float(np.abs(g).max()) > 0, path
  # One adamw step on the adapters moves b; the base tree is untouched by construction.
  tx = optax.adamw(1e-2, weight_decay=0.1)
  updates, _ = tx.update(grads, tx.init(adapters), adapters)
  new = optax.apply_updates(adapters, updates)
  b0 = new["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"]["b"]
  assert float(np.abs(b0).max()) > 0
  assert not np.array_equal(fwd(lora.apply(params, new, spec), images), fwd(params, images))


def test_dropout_drops_input_rows(unrolled):
  _, params, _ = unrolled
  adapters, spec = lora.init(params, rank=4)
  adapters = _randomize_b(adapters)
  with pytest.raises(ValueError, match="rng"):
    lora.apply(params, adapters, spec, dropout_rate=0.5)
  fn = jax.jit(lambda p, a, r: lora.apply(p, a, spec, dropout_rate=0.5, rng=r))
  eff = fn(params, adapters, jax.random.PRNGKey(0))
  w0 = params["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"]
  ab = adapters["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"]
  got = eff["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"]
  kept = ~np.all(np.asarray(got == w0).reshape(96, -1), axis=1)   # rows of A (input features)
  assert 20 < kept.sum() < 76
  a = np.where(kept[:, None], np.asarray(ab["a"]) / 0.5, 0.0)
  want = w0 + spec.scale * (a @ np.asarray(ab["b"])).reshape(w0.shape)
  np.testing.assert_allclose(got, want, atol=1e-5)
  other = fn(params, adapters, jax.random.PRNGKey(1))
  assert not np.array_equal(other["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"], got)
  # b = 0: dropout cannot change anything.
  fresh, _ = lora.init(params, rank=4)
  _assert_trees_equal(fn(params, fresh, jax.random.PRNGKey(0)), params)


def test_errors(unrolled):
  _, params, _ = unrolled
  with pytest.raises(ValueError, match="match no parameter"):
    lora.init(params, targets=(r"nothing$",))
  with pytest.raises(ValueError, match="not a kernel"):
    lora.init(params, targets=(r".*/norm1/scale$",))


def test_vit_b16_lora_state_is_small():
  model = vit.VisionTransformer("B/16")
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  adapters, spec = jax.eval_shape(lambda p: lora.init(p, rank=8), abstract)
  n_full = lora.count_params(abstract)
  n_lora = lora.count_params(adapters)
  assert n_lora == 12 * 2 * (768 * 8 + 8 * 768) == 294_912
  tx = optax.adamw(1e-3, weight_decay=0.05)
  state_lora = lora.count_params(jax.eval_shape(tx.init, adapters))
  state_full = lora.count_params(jax.eval_shape(tx.init, abstract))
  ratio = n_lora / n_full
  assert ratio < 0.02, f"LoRA/full = {ratio:.4%}"
  assert state_lora / state_full < 0.02
  assert abs(state_lora / state_full - ratio) < 1e-6   # Adam: count + mu + nu for both
  assert spec.scale == 2.0
