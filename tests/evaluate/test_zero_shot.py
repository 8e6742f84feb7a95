"""Zero-shot classifier and retrieval evaluators: maths vs references, eval hook, protocol on a CLIP checkpoint."""
import numpy as np
import pytest

from medfm_jax import config as config_lib
from medfm_jax.data import phantoms, pipeline
from medfm_jax.evaluate import protocols, results as results_lib
from medfm_jax.metrics import retrieval, zero_shot
from medfm_jax.train import restore
from tests import helpers
from tests.objectives import test_clip


def _fake_embed(texts):
  """Deterministic pseudo-embeddings per string (unnormalised)."""
  return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) * 3 for t in texts])


def test_class_embeddings_average_normalised_prompts():
  prompts = {"a": ["x {}", "y"], "b": ["z"]}
  emb = zero_shot.class_embeddings(prompts, _fake_embed)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  e = unit(_fake_embed(["x {}", "y", "z"]))
  np.testing.assert_allclose(emb, unit(np.stack([e[:2].mean(0), e[2]])), atol=1e-12)
  images = np.stack([emb[1] * 5 + 0.01, emb[0] * 0.5])
  np.testing.assert_allclose(zero_shot.scores(images, emb)[0, 1], 100 * np.dot(unit(images[0]), emb[1]))
  m = zero_shot.zero_shot_metrics(images, np.array([1, 0]), prompts, _fake_embed)
  assert m["accuracy"] == 1.0 and m["macro_auroc"] == 1.0


def test_phantom_prompts_follow_captions():
  prompts = zero_shot.phantom_prompts("finding")
  assert list(prompts) == list(phantoms.FINDINGS)
  assert "Chest X-ray with a ring-enhancing lesion." in prompts["ring_enhancing"]
  assert list(zero_shot.phantom_prompts("modality")) == list(phantoms.MODALITIES)
  assert zero_shot.class_prompts("folder", "finding", ["pleural_effusion"])["pleural_effusion"][0] == \
      "a medical image showing pleural effusion."


def test_recall_at_k_matches_brute_force():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
  txt[:10] = img[:10] * 2                 # ten exact pairs: rank 0
  got = retrieval.recall_at_k(img, txt)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  sims = unit(img) @ unit(txt).T
  for direction, s in (("i2t", sims), ("t2i", sims.T)):
    ranks = [int(np.where(np.argsort(-row, kind="stable") == i)[0][0]) for i, row in enumerate(s)]
    for k in (1, 5, 10):
      assert got[f"{direction}_r@{k}"] == pytest.approx(np.mean(np.array(ranks) < k))
  assert got["i2t_r@1"] >= 0.2
  with pytest.raises(ValueError, match="pair up"):
    retrieval.recall_at_k(img, txt[:5])


def _clip_ckpt_config():
  """2 steps of the CLIP learning test's run (tests/objectives/test_clip.py: batch 32, 128 eval
  pairs in batches of 64), whose compiled steps it reuses, with zero-shot on both label fields."""
  return helpers.tiny_clip_config(**{**test_clip.LEARNING_RUN, "total_steps": 2, "checkpoint_every": 2,
                                     "objective.zero_shot_labels": ("finding", "modality")})


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
  from medfm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("clip_tiny"))
  config = _clip_ckpt_config()
  loop.train(config, workdir, helpers.single_device_mesh(config))
  return workdir


def reference_image_text_metrics(init_from, split, n, batch_size, labels):
  """Zero-shot accuracy / balanced accuracy / macro AUROC and recall@k recomputed in float64 from
  the checkpoint's embeddings (pairwise AUROC, brute-force ranks), with labels read from the
  source: the independent reference of the eval hook and the zero-shot protocol."""
  mesh = helpers.single_device_mesh(None)
  objective, params = protocols.load_image_text(init_from, mesh, {"eval_batch_size": batch_size})
  img, txt, y = objective.embed_split(params, mesh, split, n)
  source = pipeline.make_source(objective.config.data, split)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  img, txt = unit(img.astype(np.float64)), unit(txt.astype(np.float64))
  sims = img @ txt.T
  out = {}
  for direction, s in (("i2t", sims), ("t2i", sims.T)):
    ranks = np.array([np.sum(row > row[i]) for i, row in enumerate(s)])   # ties count for the pair
    for k in (1, 5, 10):
      out[f"{direction}_r@{k}"] = np.mean(ranks < k)
  for label in labels:
    truth = np.array([source[i][label] for i in range(n)])
    np.testing.assert_array_equal(y[label], truth)
    prompts = zero_shot.phantom_prompts(label)
    classes = np.stack([unit(unit(objective.embed_texts(params, p, mesh).astype(np.float64)).mean(0))
                        for p in prompts.values()])
    logits = 100 * img @ classes.T
    pred = logits.argmax(-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    present = [c for c in range(len(prompts)) if np.any(truth == c)]
    aurocs = [_pairwise_auroc(probs[:, c], truth == c) for c in present if not np.all(truth == c)]
    out[f"zero_shot_{label}_accuracy"] = np.mean(pred == truth)
    out[f"zero_shot_{label}_balanced_accuracy"] = np.mean([np.mean(pred[truth == c] == c) for c in present])
    out[f"zero_shot_{label}_macro_auroc"] = np.mean(aurocs)
  return out


def _pairwise_auroc(scores, positive):
  pos, neg = scores[positive], scores[~positive]
  return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))


# -n 2: one worker trains clip_ckpt once, next to the CLIP learning test whose programs it reuses.
@helpers.xdist_group_of(test_clip.test_learning_signal_ci, "clip")
@pytest.mark.slow
def test_eval_hook_writes_zero_shot_and_retrieval(clip_ckpt):
  evals = [m for m in helpers.read_metrics(clip_ckpt) if "eval/i2t_r@5" in m]
  assert [m["step"] for m in evals] == [0, 2]
  for m in evals:
    assert m["eval/i2t_r@1"] <= m["eval/i2t_r@5"] <= m["eval/i2t_r@10"]
  # The final values are the float64 reference's on the saved (step-2) parameters.
  config = _clip_ckpt_config()   # the eval split and sizes of the clip_ckpt run
  want = reference_image_text_metrics(clip_ckpt, config.data.eval_split, config.data.eval_examples,
                                      config.data.eval_batch_size, ("finding", "modality"))
  assert len(want) == 12
  for k, v in want.items():
    assert evals[1][f"eval/{k}"] == pytest.approx(v, abs=1e-6), k


# -n 2: one worker trains clip_ckpt once, next to the CLIP learning test whose programs it reuses.
@helpers.xdist_group_of(test_clip.test_learning_signal_ci, "clip")
@pytest.mark.slow
def test_zero_shot_protocol_on_clip_checkpoint(clip_ckpt, tmp_path):
  c = helpers.tiny_eval_config("zero_shot", init_from=clip_ckpt, **{"data.label": "modality",
                                                                    "data.eval_examples": 40})
  restore.adopt_architecture(c)
  config_lib.validate(c)
  results = protocols.run(c, str(tmp_path))
  m = results["metrics"]
  assert m["num_examples"] == 40 and [r["class"] for r in m["per_class"]] == list(phantoms.MODALITIES)
  assert set(results["retrieval"]) == {f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  want = reference_image_text_metrics(clip_ckpt, c.data.eval_split, 40, c.data.eval_batch_size, ("modality",))
  for k in ("accuracy", "balanced_accuracy", "macro_auroc"):
    assert m[k] == pytest.approx(want.pop(f"zero_shot_modality_{k}"), abs=1e-6), k
  assert results["retrieval"] == pytest.approx(want, abs=1e-6)
  results_lib.write(str(tmp_path), results)
