"""Supervised objective: per-scheme gradients (frozen leaves get exactly zero, through
stop_gradient), LoRA/adapters start equal to the base classifier, export merges LoRA."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from medfm_jax import objectives
from medfm_jax.parallel import programs
from medfm_jax.peft.lora import path_str
from tests import helpers


def _objective(scheme, **kw):
  c = helpers.tiny_eval_config("finetune", scheme, **dict({"model.depth": 2}, **kw))
  return objectives.build(c)


@functools.lru_cache(maxsize=None)
def _shared(scheme):
  """(objective, params, jitted logits) per scheme, shared across tests (one compile each)."""
  obj = _objective(scheme)
  return obj, _init(obj), jax.jit(obj.logits)


def _batch():
  """Numpy (each jax.random shape and eager jnp op compiles a program of its own)."""
  images = np.random.default_rng(3).standard_normal((8, 16, 16, 1)).astype(np.float32)
  return {"image": images, "finding": np.arange(8, dtype=np.int32) % 6, "modality": np.arange(8, dtype=np.int32) % 4,
          "mask": np.ones(8, bool)}


def _init(obj):
  return programs.jit_once(lambda r, b: nn.unbox(obj.init(r, b)[0]))(jax.random.PRNGKey(0), _batch())


@pytest.mark.parametrize("scheme,new_keys", [("lora", {"lora"}), ("adapter", {"adapter_attn", "adapter_mlp"}),
                                             ("prompt", {"prompts"})])
@pytest.mark.slow
def test_only_scheme_params_and_head_get_gradients(scheme, new_keys):
  obj, params, _ = _shared(scheme)
  loss_fn = lambda p: obj.loss(p, {}, _batch(), jax.random.PRNGKey(1), 0)[0]
  grads = jax.jit(jax.grad(loss_fn))(params)
  mask = obj.trainable(params)
  assert jax.tree.structure(grads) == jax.tree.structure(mask)
  for (path, g), t in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(mask), strict=True):
    name = path_str(path)
    assert t == (name.startswith("head/") or bool(new_keys & set(name.split("/")))), name
    if not t:
      assert not np.any(np.asarray(g)), name
  head = np.asarray(grads["head"]["linear"]["kernel"])
  assert np.abs(head).max() > 0


@pytest.mark.parametrize("scheme", ["lora", "adapter"])
@pytest.mark.slow
def test_peft_classifier_starts_as_base_classifier(scheme):
  _, p_base, base_logits = _shared("full")
  _, p_peft, logits = _shared(scheme)
  # Same seed, same base init: copy base leaves over to be independent of init order.
  copied = jax.tree_util.tree_map_with_path(
      lambda p, v: _get(p_base, path_str(p)) if _has(p_base, path_str(p)) else v, p_peft)
  images = _batch()["image"]
  np.testing.assert_array_equal(logits(copied, images), base_logits(p_base, images))


def _has(tree, path):
  try:
    _get(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.mark.slow
def test_lora_export_matches_adapted_forward():
  obj, params, logits = _shared("lora")
  # Non-zero B so that the adapters change the function.
  rng = np.random.default_rng(7)
  params["lora"] = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32),
                                params["lora"])
  images = _batch()["image"]
  adapted = logits(params, images)
  plain_logits = _shared("full")[2]
  exported = obj.export(params)
  assert set(exported) == {"backbone", "head"}
  np.testing.assert_allclose(plain_logits(exported, images), adapted, atol=1e-5)
  assert not np.allclose(plain_logits({"backbone": params["backbone"], "head": params["head"]}, images),
                         adapted, atol=1e-4)


@pytest.mark.slow
def test_eval_metrics_count_valid_rows():
  obj, params, logits = _shared("full")
  labels = np.arange(8, dtype=np.int32) % 6
  labels[0] = -1                                                                 # row 0 unlabelled
  batch = dict(_batch(), mask=np.arange(8) < 5, finding=labels)
  out = jax.jit(obj.eval_metrics)(params, {}, batch, jax.random.PRNGKey(0))
  assert float(out["accuracy"][1]) == 4.0 and float(out["loss"][1]) == 4.0
  pred = np.asarray(logits(params, batch["image"])).argmax(-1)[1:5]
  acc = float(np.mean(pred == np.arange(1, 5) % 6))
  assert float(out["accuracy"][0]) / 4 == pytest.approx(acc)
  loss_fn = jax.jit(lambda p, b: obj.loss(p, {}, b, jax.random.PRNGKey(0), 0)[0])
  loss = loss_fn(params, batch)
  full_rows = dict(batch, image=batch["image"][1:], finding=batch["finding"][1:])
  assert float(loss) == pytest.approx(float(loss_fn(params, full_rows)), rel=1e-5)


def test_loss_is_label_smoothed_cross_entropy_of_labelled_rows():
  """-sum_k q_k log softmax(z)_k with q = (1 - eps) onehot + eps / K, averaged over the labelled
  rows (float64 reference; the tiny classifier has no dropout, so the train forward is the eval one)."""
  _, params, logits = _shared("full")
  obj = _objective("full", **{"objective.label_smoothing": 0.2})
  batch = _batch()
  batch["finding"][2] = -1                                                    # row 2 unlabelled
  loss, _ = jax.jit(obj.loss)(params, {}, batch, jax.random.PRNGKey(0), 0)
  z = np.asarray(logits(params, batch["image"]), np.float64)
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  labels = np.asarray(batch["finding"])
  k, rows = z.shape[1], labels >= 0
  assert k == obj.num_classes == 6
  q = 0.8 * np.eye(k)[labels[rows]] + 0.2 / k
  np.testing.assert_allclose(float(loss), -np.mean(np.sum(q * log_p[rows], axis=-1)), rtol=1e-5)


def test_unknown_scheme_and_label():
  with pytest.raises(ValueError, match="objective.scheme='bogus'"):
    _objective("full", **{"objective.scheme": "bogus"})
  with pytest.raises(ValueError, match="data.label='age'"):
    _objective("full", **{"data.label": "age"})
