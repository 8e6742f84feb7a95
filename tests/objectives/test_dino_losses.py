"""DINO/DINOv2 loss terms vs independent float64 NumPy implementations written from METHODS.md."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medfm_jax.objectives import dino_losses as dl


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_dino_loss(student, teacher, center, ts, tt, n_global):
  """Loops over (teacher view, student view != teacher view) pairs, as DINOLoss.forward."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  q = [np_softmax((teacher[i] - center) / tt) for i in range(n_global)]
  total, n = 0.0, 0
  for i in range(n_global):
    for j in range(student.shape[0]):
      if j == i:
        continue
      total += np.mean(np.sum(-q[i] * np_log_softmax(student[j] / ts), axis=-1))
      n += 1
  probs = np.stack(q)
  entropy = np.mean(np.sum(-probs * np.log(probs), axis=-1))
  p_bar = probs.reshape(-1, probs.shape[-1]).mean(0)
  kl = np.sum(p_bar * np.log(p_bar * probs.shape[-1]))
  return total / n, entropy, kl


def np_sinkhorn(logits, temp, n_iters=3):
  """dinov2 SinkhornKnoppTeacher, float64, no stabilisation (use moderate logits)."""
  q = np.exp(logits.astype(np.float64) / temp).T   # K x B
  b, k = q.shape[1], q.shape[0]
  q /= q.sum()
  for _ in range(n_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def np_ibot(student, teacher_probs, masks, ts):
  """dinov2 forward_masked: gather masked tokens, weight 1/n_masked per image, divide by B."""
  b = masks.shape[0]
  total = 0.0
  for i in range(b):
    n_masked = max(masks[i].sum(), 1)
    for t in np.nonzero(masks[i])[0]:
      total += -np.sum(teacher_probs[i, t] * np_log_softmax(student[i, t].astype(np.float64) / ts)) / n_masked
  return total / b


def np_koleo(x, eps=1e-8):
  x = x.astype(np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  n = x.shape[0]
  out = []
  for i in range(n):
    best = max((j for j in range(n) if j != i), key=lambda j: x[i] @ x[j])
    out.append(np.log(np.linalg.norm(x[i] - x[best] + eps) + eps))
  return -np.mean(out)


@pytest.mark.parametrize("n_views,n_global", [(6, 2), (2, 2), (3, 1)])
def test_dino_loss_matches_numpy(n_views, n_global):
  rng = np.random.default_rng(0)
  b, k = 5, 32
  student = rng.normal(size=(n_views, b, k)).astype(np.float32) * 3
  teacher = rng.normal(size=(n_global, b, k)).astype(np.float32) * 3
  center = rng.normal(size=(k,)).astype(np.float32)
  loss, metrics = jax.jit(dl.dino_loss, static_argnums=(5,))(student, teacher, center, 0.1, 0.04,
                                                               n_global)
  ref, ent, kl = np_dino_loss(student, teacher, center, 0.1, 0.04, n_global)
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["teacher_entropy"], ent, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["teacher_kl_to_uniform"], kl, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["loss_over_ln_k"], ref / math.log(k), rtol=1e-5)


def test_dino_loss_no_gradient_through_teacher():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(4, 3, 8)).astype(np.float32)
  t = rng.normal(size=(2, 3, 8)).astype(np.float32)
  grad_t = jax.jit(jax.grad(lambda t: dl.dino_loss(s, t, jnp.zeros(8), 0.1, 0.04, 2)[0]))(t)
  np.testing.assert_array_equal(grad_t, 0.0)


def test_uniform_collapse_metrics():
  k = 16
  loss, metrics = jax.jit(dl.dino_loss, static_argnums=(3, 4, 5))(
      jnp.zeros((4, 3, k)), jnp.zeros((2, 3, k)), jnp.zeros(k), 0.1, 0.04, 2)
  np.testing.assert_allclose(loss, math.log(k), rtol=1e-6)
  np.testing.assert_allclose(metrics["teacher_entropy"], math.log(k), rtol=1e-6)
  np.testing.assert_allclose(metrics["teacher_kl_to_uniform"], 0.0, atol=1e-6)
  assert dl.collapse_warning(loss, k)
  assert not dl.collapse_warning(0.5 * math.log(k), k)


def test_teacher_metrics_valid_rows_equal_metrics_of_those_rows():
  rng = np.random.default_rng(9)
  probs = np_softmax(rng.normal(size=(3, 5, 16)) / 0.3).astype(np.float32)
  valid = rng.uniform(size=(3, 5)) < 0.5
  probs[~valid] = np.eye(16)[0]                    # one-hot rows that must not count
  metrics = jax.jit(dl.teacher_metrics)
  out = metrics(probs, valid)
  for key, value in metrics(probs[valid]).items():
    np.testing.assert_allclose(out[key], value, rtol=1e-5, atol=1e-6)


def test_update_center_momentum():
  rng = np.random.default_rng(2)
  center = rng.normal(size=(1, 16)).astype(np.float32)
  teacher = rng.normal(size=(2, 8, 16)).astype(np.float32)
  new = jax.jit(dl.update_center)(center, teacher, 0.9)
  expected = 0.9 * center.astype(np.float64) + 0.1 * teacher.reshape(-1, 16).mean(0)
  assert new.shape == center.shape
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dl.update_center(center, teacher, 1.0), center)


def test_update_center_sharded_is_global_mean():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(3)
  teacher = rng.normal(size=(2, 16, 32)).astype(np.float32) + np.arange(16)[None, :, None]
  center = np.zeros(32, np.float32)
  sharded = jax.device_put(teacher, NamedSharding(mesh, P(None, "data", None)))
  assert len(sharded.sharding.device_set) == 8
  out = jax.jit(dl.update_center, static_argnums=2)(jnp.asarray(center), sharded, 0.9)
  np.testing.assert_allclose(out, dl.update_center(center, teacher, 0.9), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, 0.1 * teacher.reshape(-1, 32).mean(0), rtol=1e-5, atol=1e-5)


def test_sinkhorn_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(12, 20)).astype(np.float32)
  for temp in (0.1, 0.04):
    out = jax.jit(dl.sinkhorn_knopp)(logits, temp)
    np.testing.assert_allclose(out, np_sinkhorn(logits, temp), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_leading_axes_pooled():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 6, 10)).astype(np.float32)
  out = jax.jit(dl.sinkhorn_knopp)(logits, 0.07)
  assert out.shape == logits.shape
  np.testing.assert_allclose(out.reshape(12, 10), np_sinkhorn(logits.reshape(12, 10), 0.07),
                             rtol=1e-4, atol=1e-6)


def test_sinkhorn_safe_with_large_logits():
  rng = np.random.default_rng(6)
  logits = rng.uniform(-50, 50, size=(32, 64)).astype(np.float32)
  sk = jax.jit(dl.sinkhorn_knopp)
  out = np.asarray(sk(logits, 0.04))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  # The first step normalises each prototype, so a per-prototype offset changes nothing.
  offset = rng.uniform(-20, 20, size=(1, 64)).astype(np.float32)
  shifted = np.asarray(sk(logits + offset, 0.04))
  np.testing.assert_allclose(shifted, out, atol=2e-3)


def test_sinkhorn_valid_rows_equal_sinkhorn_of_those_rows():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(3, 5, 16)).astype(np.float32)
  valid = rng.uniform(size=(3, 5)) < 0.5
  sinkhorn = jax.jit(dl.sinkhorn_knopp)   # one program for both masks (eager: one per op)
  out = np.asarray(sinkhorn(logits, 0.04, valid=valid))
  np.testing.assert_allclose(out[valid], np_sinkhorn(logits[valid], 0.04), rtol=1e-4, atol=1e-6)
  assert np.all(out[~valid] == 0)
  none = np.asarray(sinkhorn(logits, 0.04, valid=np.zeros((3, 5), bool)))
  assert np.all(none == 0)


def test_weighted_center_is_mean_of_weighted_rows():
  rng = np.random.default_rng(8)
  center = rng.normal(size=(16,)).astype(np.float32)
  teacher = rng.normal(size=(4, 6, 16)).astype(np.float32)
  w = rng.uniform(size=(4, 6)) < 0.3
  out = dl.update_center(center, teacher, 0.9, weights=w)
  np.testing.assert_allclose(out, 0.9 * center + 0.1 * teacher[w].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dl.update_center(center, teacher, 0.9, weights=np.zeros((4, 6))),
                             center, rtol=1e-6)


def test_ibot_matches_numpy():
  rng = np.random.default_rng(7)
  b, n, k = 4, 9, 16
  student = rng.normal(size=(b, n, k)).astype(np.float32) * 2
  teacher = np_softmax(rng.normal(size=(b, n, k)) / 0.1).astype(np.float32)
  masks = rng.uniform(size=(b, n)) < 0.4
  masks[1] = False                                 # an unmasked image counts in the denominator
  masks[2, :3] = True
  loss = jax.jit(dl.ibot_patch_loss)(student, teacher, masks, 0.1)
  np.testing.assert_allclose(loss, np_ibot(student, teacher, masks, 0.1), rtol=1e-5, atol=1e-6)


def test_ibot_no_mask_is_zero():
  rng = np.random.default_rng(8)
  s = rng.normal(size=(2, 5, 8)).astype(np.float32)
  t = np_softmax(rng.normal(size=(2, 5, 8))).astype(np.float32)
  masks = np.zeros((2, 5), bool)
  loss, grad = jax.jit(jax.value_and_grad(dl.ibot_patch_loss))(s, t, masks, 0.1)
  assert float(loss) == 0.0
  assert np.all(np.isfinite(grad))


def test_koleo_matches_numpy():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(10, 6)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(dl.koleo_loss)(x), np_koleo(x), rtol=1e-5, atol=1e-6)
  # Duplicate direction: the distance is at float32 round-off (~eps), so only check it stays
  # finite with a finite gradient and that the loss is large (each log term >= log(2e-8)).
  x[3] = x[7] * 2.0
  loss, grad = jax.jit(jax.value_and_grad(dl.koleo_loss))(x)
  assert np.isfinite(loss) and float(loss) > float(jax.jit(dl.koleo_loss)(np.delete(x, 3, axis=0))) + 1.0
  assert np.all(np.isfinite(grad))


def test_schedules():
  temp = lambda s: float(dl.teacher_temp_schedule(s, 10, 0.04, 0.07))
  assert temp(0) == pytest.approx(0.04)
  assert temp(5) == pytest.approx(0.055)
  assert temp(10) == pytest.approx(0.07) and temp(100) == pytest.approx(0.07)
  assert float(dl.teacher_temp_schedule(3, 0)) == pytest.approx(0.07)
  cos = lambda s: float(dl.cosine_schedule(s, 100, 0.996, 1.0))
  assert cos(0) == pytest.approx(0.996)
  assert cos(50) == pytest.approx(0.998)
  assert cos(100) == pytest.approx(1.0) and cos(200) == pytest.approx(1.0)
  wd = jax.jit(dl.cosine_schedule, static_argnums=(1, 2, 3))(jnp.int32(25), 100, 0.04, 0.4)
  np.testing.assert_allclose(wd, 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)
