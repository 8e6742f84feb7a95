"""FLAVA loss terms against NumPy references; empty selections give 0 with finite zero gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import mae as mae_model
from medfm_jax.objectives import flava_losses as fl


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ce_reference(logits, labels, valid):
  """Mean CE over valid entries; labels at invalid entries are never read."""
  lp = _log_softmax(logits.astype(np.float64))
  vals = [-lp[idx][labels[idx]] for idx in zip(*np.nonzero(valid))]
  return float(np.mean(vals)) if vals else 0.0


def _random_labels(rng, shape, vocab, p_valid):
  valid = rng.uniform(size=shape) < p_valid
  labels = rng.integers(0, vocab, shape)
  junk = rng.choice([-1, -100, vocab, 10 ** 6], size=shape)       # out of range where ignored
  return np.where(valid, labels, junk).astype(np.int32), valid


def test_masked_cross_entropy_matches_reference_and_ignores_junk_labels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  labels, valid = _random_labels(rng, (3, 7), 11, 0.4)
  total, count = jax.jit(fl.masked_cross_entropy)(logits, labels, valid)
  assert count == valid.sum()
  np.testing.assert_allclose(total / count, _ce_reference(logits, labels, valid), rtol=1e-5)
  # mlm_loss: valid defaults to labels >= 0 (-1 = not predicted)
  mlm_labels = np.where(valid, labels, -1)
  np.testing.assert_allclose(jax.jit(fl.mlm_loss)(logits, mlm_labels),
                             _ce_reference(logits, labels, valid), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(fl.mim_codebook_loss)(logits, labels, valid),
                             _ce_reference(logits, labels, valid), rtol=1e-5)


def _pixel_reference(pred, target, mask, norm_pix):
  t = target.astype(np.float64)
  if norm_pix:
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  per = ((pred - t) ** 2).mean(-1)
  return per[mask].mean() if mask.any() else 0.0


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_pixel_loss_matches_reference_and_mae(norm_pix):
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  target = np.asarray(jax.jit(mae_model.vit.patchify, static_argnums=1)(images, 4))    # [2, 4, 48]
  pred = rng.normal(size=target.shape).astype(np.float32)
  mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
  got = jax.jit(fl.mim_pixel_loss, static_argnums=3)(pred, target, mask, norm_pix)
  np.testing.assert_allclose(got, _pixel_reference(pred, target, mask, norm_pix), rtol=1e-5)
  mae_loss = jax.jit(mae_model.mae_loss, static_argnums=(3, 4))
  np.testing.assert_allclose(got, mae_loss(images, pred, mask, 4, norm_pix), rtol=1e-5)


def test_itm_loss_and_accuracy_match_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(9, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 9).astype(np.int32)
  valid = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0], bool)
  np.testing.assert_allclose(jax.jit(fl.itm_loss)(logits, labels, valid),
                             _ce_reference(logits, labels, valid), rtol=1e-5)
  acc = (logits.argmax(-1) == labels)[valid].mean()
  np.testing.assert_allclose(jax.jit(fl.masked_accuracy)(logits, labels, valid), acc, rtol=1e-6)


def _all_terms(logits_text, logits_itm, pred, target):
  """Every loss term on selections that are all empty: MLM labels -1, no masked patch, no ITM row."""
  none_l = jnp.zeros(logits_text.shape[:-1], bool)
  none_n = jnp.zeros(pred.shape[:-1], bool)
  return (fl.mlm_loss(logits_text, -jnp.ones(logits_text.shape[:-1], jnp.int32))
          + fl.mim_codebook_loss(logits_text, jnp.full(none_l.shape, -1), none_l)
          + fl.mim_pixel_loss(pred, target, none_n)
          + fl.itm_loss(logits_itm, jnp.full(logits_itm.shape[:1], -1), jnp.zeros(logits_itm.shape[:1], bool)))


def test_empty_selections_give_zero_loss_and_finite_zero_gradients():
  rng = np.random.default_rng(3)
  args = (rng.normal(size=(2, 5, 13)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32),
          rng.normal(size=(2, 4, 12)).astype(np.float32),
          np.ones((2, 4, 12), np.float32))              # constant patches: variance 0
  value, grads = jax.jit(jax.value_and_grad(_all_terms, argnums=(0, 1, 2)))(*args)
  assert value == 0.0
  for g in grads:
    assert np.all(np.isfinite(g)) and not np.any(g)


def test_hard_negatives_follow_the_restricted_softmax():
  sim = np.array([[2.0, 0.0, 1.0, -1.0, 3.0],
                  [0.5, 4.0, 0.0, 1.5, 9.0],
                  [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
  valid_cols = np.array([1, 1, 1, 1, 0], bool)                  # column 4 is unpaired
  self_cols = np.array([0, 1, 2], np.int32)
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  idx, has = jax.jit(jax.vmap(fl.sample_hard_negatives, in_axes=(None, None, None, 0)))(
      sim, valid_cols, self_cols, keys)
  assert np.all(has)
  for r in range(3):
    allowed = valid_cols & (np.arange(5) != r)
    p = np.where(allowed, np.exp(sim[r] - sim[r].max()), 0.0)
    p /= p.sum()
    freq = np.bincount(np.asarray(idx[:, r]), minlength=5) / n
    assert freq[~allowed].sum() == 0                            # never itself, never unpaired
    # multinomial sd <= sqrt(0.25 / n) = 0.0035, so 0.015 is > 4 sd; rows 0 and 1 are far
    # (> 0.2) from uniform over their candidates, so a sampler ignoring sim would fail
    np.testing.assert_allclose(freq, p, atol=0.015)
    if r < 2:
      assert np.abs(p - allowed / allowed.sum()).max() > 0.2


def test_rows_without_negative_return_themselves_and_feed_a_finite_itm_loss():
  sim = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0]], np.float32)
  valid_cols = np.array([False, True, False])        # only row 1's own column is paired
  idx, has = jax.jit(fl.sample_hard_negatives)(sim, valid_cols, np.arange(3, dtype=np.int32), jax.random.key(1))
  np.testing.assert_array_equal(has, [True, False, True])
  np.testing.assert_array_equal(idx, [1, 1, 1])

  def loss(logits):
    return fl.itm_loss(logits, jnp.zeros(3, jnp.int32), has & jnp.array([False, True, False]))

  value, grad = jax.jit(jax.value_and_grad(loss))(np.ones((3, 2), np.float32))   # one program, not one per op
  assert value == 0.0 and np.all(np.isfinite(grad)) and not np.any(grad)


def _masked_contrastive(kind, mesh, img, txt, valid, s=2.0, b=-1.0):
  from medfm_jax.objectives import clip_losses  # pylint: disable=g-import-not-at-top
  from medfm_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  fn = lambda i, t: clip_losses.contrastive_loss(i, t, s, b, kind, valid=valid)
  with mesh_lib.use_mesh(mesh):
    sh = mesh_lib.batch_sharding(mesh, 2)
    v, g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(jax.device_put(img, sh), jax.device_put(txt, sh))
  return float(v), [np.asarray(x) for x in g]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_contrastive_valid_rows_are_the_loss_of_the_paired_rows_alone(kind):
  from medfm_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from tests.objectives.test_clip_losses import _reference  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  img, txt = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
  valid = rng.uniform(size=16) < 0.5
  one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  v1, g1 = _masked_contrastive(kind, one, img, txt, valid)
  v8, g8 = _masked_contrastive(kind, eight, img, txt, valid)
  np.testing.assert_allclose(v1, _reference(img[valid], txt[valid], 2.0, -1.0, kind), rtol=1e-5)
  assert abs(v1 - v8) <= 1e-5
  for a, c in zip(g1, g8, strict=True):
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert not np.any(a[~valid]) and np.all(np.any(a[valid], axis=1))   # unpaired rows: no gradient
  v0, g0 = _masked_contrastive(kind, eight, img, txt, np.zeros(16, bool))
  assert v0 == 0.0 and all(np.all(np.isfinite(g)) and not np.any(g) for g in g0)


def test_same_sequences_and_excluded_negatives():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 5, (12, 6)).astype(np.int32)
  tokens[3] = tokens[7] = tokens[0]
  tokens[5, :-1] = tokens[0, :-1]                                   # differs only in the last token
  same = np.asarray(jax.jit(fl.same_sequences)(tokens))
  np.testing.assert_array_equal(same, (tokens[:, None] == tokens[None]).all(-1))
  sim = np.zeros((12, 12), np.float32)
  idx, has = jax.jit(fl.sample_hard_negatives)(sim, np.ones(12, bool), np.arange(12, dtype=np.int32),
                                               jax.random.PRNGKey(0), same)
  assert not np.any(same[np.arange(12), np.asarray(idx)] & np.asarray(has))
