"""CLIP / SigLIP losses over the global batch: NumPy reference, 1 vs 8 devices, per-device blocks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.objectives import clip_losses
from medfm_jax.parallel import mesh as mesh_lib

B, E = 32, 16


def _reference(img, txt, s, b, kind):
  i = img / np.linalg.norm(img, axis=1, keepdims=True)
  t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = np.exp(np.clip(s, 0, np.log(100))) * i @ t.T
  if kind == "clip":
    log_softmax = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))
    return -0.5 * (np.diag(log_softmax(logits)).mean() + np.diag(log_softmax(logits.T)).mean())
  labels = 2 * np.eye(len(i)) - 1
  return np.log1p(np.exp(-labels * (logits + b))).sum() / len(i)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, E)).astype(np.float32), rng.normal(size=(B, E)).astype(np.float32)


def _value_and_grads(kind, mesh, s, b):
  img, txt = _inputs()
  fn = functools.partial(clip_losses.contrastive_loss, kind=kind)
  with mesh_lib.use_mesh(mesh):
    sh = mesh_lib.batch_sharding(mesh, 2)
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    v, g = step(jax.device_put(img, sh), jax.device_put(txt, sh), jnp.float32(s), jnp.float32(b))
  return float(v), [np.asarray(x) for x in g]


@pytest.mark.parametrize("kind, s, b", [("clip", np.log(1 / 0.07), 0.0), ("siglip", np.log(10.0), -10.0),
                                        ("clip", 5.0, 0.0)])
def test_loss_matches_reference_and_is_mesh_independent(kind, s, b):
  one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  v1, g1 = _value_and_grads(kind, one, s, b)
  v8, g8 = _value_and_grads(kind, eight, s, b)
  np.testing.assert_allclose(v1, _reference(*_inputs(), s, b, kind), rtol=1e-5)
  assert abs(v1 - v8) <= 1e-5
  for a, c in zip(g1, g8, strict=True):
    np.testing.assert_allclose(a, c, atol=1e-5)
  if s > np.log(100):          # clamped: the scale gets no gradient
    assert g1[2] == 0.0
  else:
    assert g1[2] != 0.0


def test_logit_scale_clamped_to_0_ln100():
  """scale = exp(clip(s, 0, ln 100)): 1 <= scale <= 100, no gradient to s outside [0, ln 100]; the
  loss sees the clamped scale."""
  s = jnp.array([-1.0, 0.5, 4.0, 5.0], jnp.float32)
  np.testing.assert_allclose(clip_losses.clamp_logit_scale(s), [1.0, np.exp(0.5), np.exp(4.0), 100.0],
                             rtol=1e-6)
  grads = jax.vmap(jax.grad(clip_losses.clamp_logit_scale))(s)
  np.testing.assert_allclose(grads, [0.0, np.exp(0.5), np.exp(4.0), 0.0], rtol=1e-6)
  img, txt = _inputs()
  for kind in clip_losses.LOSSES:
    jitted = jax.jit(lambda s, kind=kind: clip_losses.contrastive_loss(img, txt, s, -1.0, kind))   # one program
    loss = lambda s, jitted=jitted: float(jitted(np.float32(s)))
    assert loss(-3.0) == loss(0.0) != loss(0.5)
    assert loss(9.0) == loss(np.log(100.0)) != loss(4.0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_device_materialises_the_global_logit_matrix(kind):
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  img, txt = _inputs()
  fn = jax.grad(lambda i, t: clip_losses.contrastive_loss(i, t, 1.0, -1.0, kind), argnums=(0, 1))
  with mesh_lib.use_mesh(mesh):
    sh = mesh_lib.batch_sharding(mesh, 2)
    hlo = jax.jit(fn).lower(jax.device_put(img, sh), jax.device_put(txt, sh)).compile().as_text()
  assert f"f32[{B // 8},{B}]" in hlo          # the per-device block of logits
  assert f"f32[{B},{B}]" not in hlo            # never the global matrix


def test_unknown_loss():
  with pytest.raises(ValueError, match="objective.loss"):
    clip_losses.contrastive_loss(jnp.ones((2, 2)), jnp.ones((2, 2)), 1.0, kind="triplet")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_per_device_memory_shrinks_with_the_mesh(kind):
  one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  m1 = clip_losses.memory_analysis(kind, 512, 32, one)
  m8 = clip_losses.memory_analysis(kind, 512, 32, eight)
  assert m8["temp"] < m1["temp"] / 4            # blocks of [B/8, B], not [B, B]
  assert m8["argument"] < m1["argument"] / 7      # each device holds only its rows
