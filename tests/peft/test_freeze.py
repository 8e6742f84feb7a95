import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medfm_jax.models import vit
from medfm_jax.peft import freeze
from medfm_jax.peft.lora import path_str
from medfm_jax.train import optim
from tests.helpers import random_params

D = 0.65


def _abstract(scan: bool):
  model = vit.VisionTransformer("Mu/4", image_size=16, scan=scan)
  p = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))
  p["params"]["head"] = {"kernel": jax.ShapeDtypeStruct((96, 5), jnp.float32),
                         "bias": jax.ShapeDtypeStruct((5,), jnp.float32)}
  return p


@pytest.fixture(scope="module")
def params():
  """Numpy params (helpers.random_params: an init would compile a program, and run eagerly, one
  per op and random shape)."""
  return random_params(_abstract(False))


@pytest.fixture(scope="module")
def scanned():
  return _abstract(True)


def _flat(tree):
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_masks(params):
  assert all(jax.tree.leaves(freeze.full(params)))
  lp = _flat(freeze.linear_probe(params))
  assert {k for k, v in lp.items() if v} == {"params/head/kernel", "params/head/bias"}
  with pytest.raises(ValueError, match="nothing would train"):
    freeze.linear_probe(params, head_key="classifier")

  m = _flat(freeze.last_n_blocks(params, 2))
  assert jax.tree.structure(freeze.last_n_blocks(params, 2)) == jax.tree.structure(params)
  for k, v in m.items():
    if "/layer_2/" in k or "/layer_3/" in k or k.startswith(("params/norm/", "params/head/")):
      assert v, k
    else:
      assert not v, k
  assert m["params/encoder/layer_3/attn/query/kernel"] and not m["params/encoder/layer_1/mlp/fc1/kernel"]
  assert not m["params/patch_embed/proj/kernel"] and not m["params/cls_token"]
  m0 = _flat(freeze.last_n_blocks(params, 0))
  assert {k for k, v in m0.items() if v} == {"params/head/kernel", "params/head/bias",
                                              "params/norm/scale", "params/norm/bias"}


def test_scanned_masks(scanned):
  with pytest.raises(ValueError, match="scanned stack of 4 layers"):
    freeze.last_n_blocks(scanned, 2)
  m4 = _flat(freeze.last_n_blocks(scanned, 4))
  m0 = _flat(freeze.last_n_blocks(scanned, 0))
  key = "params/encoder/layers/block/attn/query/kernel"
  assert m4[key] and not m0[key] and m0["params/head/kernel"] and not m4["params/cls_token"]


def test_layerwise_lr_decay_values(params, scanned):
  m = _flat(freeze.layerwise_lr_decay(params, D, num_layers=4))
  assert m["params/patch_embed/proj/kernel"] == pytest.approx(D ** 5)
  assert m["params/cls_token"] == pytest.approx(D ** 5)
  assert m["params/encoder/layer_0/attn/query/kernel"] == pytest.approx(D ** 4)
  assert m["params/encoder/layer_1/mlp/fc2/bias"] == pytest.approx(D ** 3)
  assert m["params/encoder/layer_3/norm1/scale"] == pytest.approx(D)
  assert m["params/norm/scale"] == 1.0 and m["params/head/kernel"] == 1.0
  s = _flat(freeze.layerwise_lr_decay(scanned, D, num_layers=4))
  q = s["params/encoder/layers/block/attn/query/kernel"]
  assert q.shape == (4, 1, 1, 1)
  np.testing.assert_allclose(q.ravel(), [D ** 4, D ** 3, D ** 2, D], rtol=1e-6)
  assert s["params/encoder/layers/block/mlp/fc1/bias"].shape == (4, 1)
  assert s["params/cls_token"] == pytest.approx(D ** 5) and s["params/head/bias"] == 1.0
  with pytest.raises(ValueError):
    freeze.layerwise_lr_decay(params, D, num_layers=3)


def _grads(params, step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


def test_scale_by_tree_after_adamw(params):
  mult = freeze.layerwise_lr_decay(params, D, num_layers=4)
  base = optax.adamw(1e-2, weight_decay=0.1)
  scaled = optax.chain(optax.adamw(1e-2, weight_decay=0.1), freeze.scale_by_tree(mult))
  g = _grads(params, 0)
  u0, _ = jax.jit(base.update)(g, base.init(params), params)
  u1, _ = jax.jit(scaled.update)(g, scaled.init(params), params)
  u0, u1, mult = map(_flat, (u0, u1, mult))
  for k in u0:
    np.testing.assert_allclose(u1[k], np.asarray(u0[k]) * np.asarray(mult[k]), rtol=1e-6)


def _config():
  c = ml_collections.ConfigDict()
  c.seed, c.total_steps, c.batch_size = 0, 10, 8
  c.lr, c.lr_scaling, c.min_lr, c.warmup_steps = 1e-2, "none", 0.0, 0
  c.weight_decay, c.grad_clip, c.grad_accum_steps = 0.1, 1.0, 1
  c.optim = ml_collections.ConfigDict({"b1": 0.9, "b2": 0.95, "eps": 1e-8})
  return c


def _run(tx, params, steps=3):
  @jax.jit
  def step_fn(p, state, grads):
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  p, state = params, tx.init(params)
  for step in range(steps):
    p, state = step_fn(p, state, _grads(p, step))
  return p, state


@pytest.mark.parametrize("n", [0, 1])
def test_frozen_params_bit_identical_with_make_optimizer(params, n):
  trainable = functools.partial(freeze.last_n_blocks, n=n)
  mask = _flat(trainable(params))
  new, state = _run(optim.make_optimizer(_config(), trainable=trainable), params)
  old, new = _flat(params), _flat(new)
  for k, v in mask.items():
    if v:
      assert not np.array_equal(new[k], old[k]), k
    else:
      assert np.array_equal(new[k], old[k]) and new[k].dtype == old[k].dtype, k
  # Adam moments (mu, nu) exist for trainable leaves only; scalars are step counts.
  n_train = sum(old[k].size for k, v in mask.items() if v)
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * n_train


def test_scale_by_tree_inside_multi_transform(params):
  mask = freeze.last_n_blocks(params, 1)
  mult = freeze.layerwise_lr_decay(params, D, num_layers=4)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  inner = optax.adamw(1e-2, weight_decay=0.1)
  lazy = freeze.scale_by_tree(lambda p: freeze.layerwise_lr_decay(p, D, num_layers=4))
  tx = optax.multi_transform({"train": optax.chain(inner, lazy),
                              "frozen": optax.set_to_zero()}, labels)
  ref = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
  new, _ = _run(tx, params, steps=1)
  want, _ = _run(ref, params, steps=1)
  old, new, want, fm, fmult = map(_flat, (params, new, want, mask, mult))
  for k in old:
    if fm[k]:
      # new and want are float32 params: each is old + update rounded to the param's float32 ulp
      # (about 1e-7 for the norm scales near 1, 2% of their ~6e-3 update).
      ulp = float(np.spacing(np.abs(old[k]).astype(np.float32)).max())
      np.testing.assert_allclose(np.asarray(new[k]) - old[k], (np.asarray(want[k]) - old[k]) * np.asarray(fmult[k]),
                                 rtol=1e-5, atol=1e-8 + ulp, err_msg=k)
    else:
      assert np.array_equal(new[k], old[k])
