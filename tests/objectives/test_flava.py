"""FLAVA objective in the shared trainer: which rows feed which loss, hard negatives, NaN-free empty
selections, 1 vs 8 devices, codebook targets, config errors, restore and the CI learning signal."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax import objectives
from medfm_jax.data import pipeline
from medfm_jax.evaluate import protocols
from medfm_jax.objectives import flava as flava_objective
from medfm_jax.parallel import programs
from medfm_jax.train import checkpoint, loop, restore
from tests import helpers

pytestmark = pytest.mark.xdist_group("flava")   # module fixtures compile multi-device steps once


@pytest.fixture(scope="module")
def setup():
  """(objective, params, a real mixed train batch, jitted (loss, metrics), grads) shared by the tests."""
  config = helpers.tiny_flava_config()
  objective = objectives.build(config)
  it = pipeline.make_train_iterator(config.data, config.batch_size, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  params = nn.unbox(programs.jit_once(lambda: objective.init(jax.random.PRNGKey(0), batch)[0])())   # one compile

  @jax.jit
  def run(params, batch):
    def f(p):
      loss, (metrics, _) = objective.loss(p, {}, batch, jax.random.PRNGKey(1), 0)
      return loss, metrics
    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss, metrics, grads
  return objective, params, batch, run


def _norm(tree):
  """Squared L2 norm of ``tree`` (in numpy: an eager jnp op per leaf shape would compile each)."""
  return float(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_mixed_batch_feeds_every_term(setup):
  objective, params, batch, run = setup
  assert int(batch["has_image"].sum()) == 12 and int(batch["has_text"].sum()) == 12   # 8 paired + 4 + 4
  loss, metrics, grads = run(params, batch)
  terms = {t: float(metrics[f"{t}_loss"]) for t in flava_objective.TERMS}
  assert all(v > 0 for v in terms.values()), terms
  np.testing.assert_allclose(float(loss), sum(terms.values()), rtol=1e-5)
  for head in ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head", "itm_head"):
    assert _norm(grads[head]) > 0, head
  # A zero-initialised fusion cls token made this ~7e5 (LayerNorm eps 1e-12 on an all-zero row).
  assert np.sqrt(_norm(grads["multimodal"])) < 100


def test_rows_feed_only_their_losses(setup):
  """All rows paired: the unimodal MIM/MLM terms see nothing (exactly 0, zero gradient to their
  heads); no row paired: contrastive, ITM and MMM are 0 and their heads get no gradient."""
  _, params, batch, run = setup
  ones, zeros = jnp.ones_like(batch["has_image"]), jnp.zeros_like(batch["has_image"])
  _, metrics, grads = run(params, dict(batch, has_image=ones, has_text=ones))
  assert float(metrics["mim_loss"]) == 0 and float(metrics["mlm_loss"]) == 0
  assert _norm(grads["mim_head"]) == 0 and _norm(grads["mlm_head"]) == 0
  assert float(metrics["contrastive_loss"]) > 0 and float(metrics["itm_loss"]) > 0
  _, metrics, grads = run(params, dict(batch, has_image=ones, has_text=zeros))
  for t in ("contrastive", "itm", "mmm_image", "mmm_text", "mlm"):
    assert float(metrics[f"{t}_loss"]) == 0, t
  for head in ("itm_head", "mmm_image_head", "mmm_text_head", "text_projection"):
    assert _norm(grads[head]) == 0, head
  assert float(metrics["mim_loss"]) > 0


def test_no_masked_token_and_no_negative_give_finite_zero_terms(setup):
  """No masked patch or token, and a single paired row (no negative for ITM): every loss, metric and
  gradient is finite; the masked-modelling terms are exactly 0."""
  _, params, batch, run = setup
  paired = jnp.zeros_like(batch["has_image"]).at[0].set(True)
  empty = dict(batch, patch_mask=jnp.zeros_like(batch["patch_mask"]),
               mlm_labels=jnp.full_like(batch["mlm_labels"], -1), mlm_tokens=batch["tokens"],
               has_image=paired, has_text=paired)
  loss, metrics, grads = run(params, empty)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  for t in ("mim", "mlm", "mmm_image", "mmm_text"):
    assert float(metrics[f"{t}_loss"]) == 0, t
  assert float(metrics["itm_negative_fraction"]) == 0              # the lone pair stays positive


@pytest.mark.parametrize("kind", ["hard", "random"])
def test_itm_partners_are_other_paired_rows(setup, kind):
  """Negatives: only paired rows turn negative (about itm_negative_fraction of them), exactly one
  side is swapped, partners are other paired rows without the same caption; 'hard' partners are
  more similar than average, 'random' ones are not."""
  _, _, batch, _ = setup
  objective = objectives.build(helpers.tiny_flava_config(**{"objective.itm_negatives": kind}))
  b = batch["image"].shape[0]
  paired = np.asarray(batch["has_image"] & batch["has_text"])
  emb = jax.random.normal(jax.random.PRNGKey(3), (b, 8))
  sim = np.asarray(emb @ emb.T)
  tokens = batch["tokens"].at[1].set(batch["tokens"][0])           # rows 0 and 1: the same caption
  rows = np.arange(b)
  negatives = candidates = 0
  chosen_sim, mean_sim = [], []
  for seed in range(40):
    img_rows, txt_rows, labels = map(np.asarray, objective._itm_partners(
        emb, emb, 10.0, jnp.asarray(paired), tokens, jax.random.PRNGKey(seed)))
    neg = labels == 0
    assert not np.any(neg & ~paired)
    assert np.all((img_rows != rows) ^ (txt_rows != rows) == neg)
    partner = np.where(img_rows != rows, img_rows, txt_rows)
    assert np.all(paired[partner[neg]]) and np.all(partner[neg] != rows[neg])
    assert not np.any(neg & (((rows == 0) & (partner == 1)) | ((rows == 1) & (partner == 0))))
    negatives, candidates = negatives + neg.sum(), candidates + paired.sum()
    for i in rows[neg]:
      others = paired & (rows != i) & ~((i < 2) & (rows < 2))
      chosen_sim.append(sim[i, partner[i]])
      mean_sim.append(sim[i, others].mean())
  assert 0.35 < negatives / candidates < 0.65                      # itm_negative_fraction = 0.5
  gap = np.mean(chosen_sim) - np.mean(mean_sim)
  assert gap > 2 if kind == "hard" else abs(gap) < 1.5, gap


@pytest.fixture(scope="module")
def device_runners():
  """The FLAVA step (all five losses, SGD) compiled on a 2x4 data x fsdp mesh, and its 1-device
  reference run."""
  config = helpers.tiny_flava_config(**helpers.sgd_overrides())
  return helpers.sharded_and_reference_runs(config, {"data": 2, "fsdp": 4, "tensor": 1})


@pytest.mark.slow
def test_train_steps_equal_on_1_and_8_devices(device_runners):
  eight, reference = device_runners
  helpers.assert_same_training(eight.run(), reference, loss_atol=2e-5)


@pytest.mark.slow
def test_device_equality_check_sees_gradient_scale(device_runners):
  helpers.assert_check_sees_gradient_scale(*device_runners, loss_atol=2e-5)


@pytest.mark.slow
def test_codebook_target(tmp_path):
  """mim_target='codebook': MIM heads predict the ids of a VQ codebook file (cross-entropy ~ ln K
  at init); a codebook with another patch size is refused by name."""
  from medfm_jax.models import codebook
  rng = np.random.default_rng(0)
  path = str(tmp_path / "codebook.npz")
  codebook.save_codebook(path, codebook.Codebook(rng.normal(size=(12, 16)).astype(np.float32), 4, 1, True))
  config = helpers.tiny_flava_config(**{"objective.mim_target": "codebook", "objective.codebook_path": path})
  objective = objectives.build(config)
  assert objective.model.image_vocab == 12
  it = pipeline.make_train_iterator(config.data, config.batch_size, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  params = programs.jit_once(lambda: nn.unbox(objective.init(jax.random.PRNGKey(0), batch)[0]))()
  _, (metrics, _) = jax.jit(lambda p: objective.loss(p, {}, batch, jax.random.PRNGKey(1), 0))(params)
  assert abs(float(metrics["mim_loss"]) - np.log(12)) < 1.0
  codebook.save_codebook(path, codebook.Codebook(rng.normal(size=(12, 64)).astype(np.float32), 8, 1, True))
  with pytest.raises(ValueError, match="objective.codebook_path.*patch size"):
    objectives.build(helpers.tiny_flava_config(**{"objective.mim_target": "codebook",
                                                  "objective.codebook_path": path}))


@pytest.mark.parametrize("overrides, field", [
    ({"data.mlm": None}, "data.mlm"),
    ({"data.patch_masks": None}, "data.patch_masks"),
    ({"objective.weights.clip": 1.0}, "objective.weights"),
    ({"objective.mim_target": "codebook"}, "objective.codebook_path"),
    ({"objective.itm_negative_fraction": 2.0}, "objective.itm_negative_fraction"),
    ({"data.tokenizer": ""}, "data.tokenizer"),
])
def test_each_bad_flava_field_is_named(overrides, field):
  with pytest.raises(ValueError) as e:
    objectives.build(helpers.tiny_flava_config(**overrides))
  assert field in str(e.value) and "\n" not in str(e.value)


def test_full_config_has_the_paper_model():
  """configs/flava.py:full with the paper's 8192-code MIM target builds (abstractly, no memory)
  exactly HF ``FlavaForPreTraining(FlavaConfig())``'s 302,085,751 parameters outside its codebook,
  poolers and token-type table (counted on torch's meta device), less the image cls position (768),
  which we fold into the cls token."""
  from configs import flava
  from medfm_jax.data import tokenizers
  from medfm_jax.models import flava as flava_model
  config = flava.get_config("full,objective.mim_target=codebook,objective.codebook_size=8192")
  model = flava_model.build_flava(config, tokenizers.CaptionTokenizer("bytes", "", 512))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                             jnp.zeros((1, 512), jnp.int32), jnp.zeros((1, 196), bool)))
  params = nn.unbox(shapes)["params"]
  assert len(params["multimodal"]["encoder"]) == 6 and len(params["text"]["encoder"]) == 12
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 302_085_751 - 768


# The learning scenario's overrides of helpers.tiny_flava_config. The FLAVA run from an HF model
# (tests/train/test_init_from_hf.py) uses them too, so it reuses this run's compiled programs.
LEARNING_RUN = {"total_steps": 60, "batch_size": 64, "warmup_steps": 5, "lr": 2e-3, "eval_every": 1000,
                "checkpoint_every": 60, "data.eval_examples": 128, "data.eval_batch_size": 64,
                "objective.zero_shot_labels": ("modality",)}


def flava_learning_run(workdir, seed=0):
  """60 steps of the test-sized FLAVA (batch 64) and the zero-shot protocol on its checkpoint (the
  scenario of the next test, re-measured per seed by ``tools/seed_spread.py``): (config, eval
  metrics at steps 0 and 60, zero-shot protocol results)."""
  config = helpers.tiny_flava_config(**LEARNING_RUN, seed=seed)
  loop.train(config, workdir, helpers.single_device_mesh(config))
  first, last = [m for m in helpers.read_metrics(workdir) if "eval/i2t_r@5" in m]
  # The protocol on the hook's split and examples: it must reproduce the hook's final numbers.
  d = config.data
  results = protocols.run(helpers.tiny_eval_config("zero_shot", init_from=workdir, **{
      "data.label": "modality", "data.eval_split": d.eval_split, "data.eval_examples": d.eval_examples,
      "data.eval_batch_size": d.eval_batch_size}), os.path.join(workdir, "eval"))
  return config, first, last, results


@helpers.own_xdist_group   # uses no module fixture
@pytest.mark.slow
def test_learning_signal_ci_and_restore(tmp_path):
  """60 steps of the test-sized FLAVA (batch 64): zero-shot modality accuracy and the
  masked-modelling losses improve on their random-init values; the checkpoint serves the zero-shot
  protocol with the hook's numbers and its image encoder restores (full tiny run: README)."""
  config, first, last, results = flava_learning_run(str(tmp_path))
  # Measured with tools/seed_spread.py --scenarios flava, steps 0 -> 60, seeds 0/1/2/3/4/5:
  # zero-shot modality accuracy (128 images, chance 0.25) 0.27 / 0.31 / 0.16 / 0.22 / 0.27 / 0.28 ->
  # 0.75 / 0.81 / 0.80 / 0.78 / 0.70 / 0.73.
  zs = "eval/zero_shot_modality_accuracy"
  assert first[zs] < 0.5 < last[zs], (first[zs], last[zs])
  # MLM (260 byte ids: ln 260 = 5.56) 5.70 / 5.65 / 5.64 / 5.56 / 5.53 / 5.75 ->
  # 3.15 / 3.22 / 3.23 / 3.29 / 3.23 / 3.29 (gains 2.27 to 2.55); MIM (normalised pixels) 1.93 /
  # 2.26 / 2.51 / 2.28 / 2.66 / 2.31 -> 0.88 / 0.90 / 0.88 / 0.94 / 0.87 / 0.86 (gains 1.04 to 1.79;
  # predicting 0 scores 15/16, which 60 steps do not beat on every seed).
  assert last["eval/mlm_loss"] < first["eval/mlm_loss"] - 1.5, (first["eval/mlm_loss"], last["eval/mlm_loss"])
  assert last["eval/mim_loss"] < first["eval/mim_loss"] - 0.5, (first["eval/mim_loss"], last["eval/mim_loss"])
  # Not asserted: ITM, which 60 steps do not learn. Ranking accuracy (chance 0.5, 126 pairs)
  # 0.48 / 0.48 / 0.49 / 0.55 / 0.54 / 0.50 -> 0.60 / 0.52 / 0.60 / 0.54 / 0.49 / 0.58, and on seeds
  # 0 / 1 / 2 with weights.itm=3: 0.65 / 0.45 / 0.65. The tiny recipe learns it by step 300
  # (configs/flava.py: 0.50 -> 0.82).
  # The zero-shot protocol on the checkpoint reproduces the hook's final numbers (on seeds 0-5).
  for k in ("accuracy", "balanced_accuracy", "macro_auroc"):
    assert results["metrics"][k] == pytest.approx(last[f"eval/zero_shot_modality_{k}"], abs=1e-6), k
  assert results["retrieval"] == pytest.approx({k: last[f"eval/{k}"] for k in results["retrieval"]}, abs=1e-6)
  image = objectives.build(config).model.image.clone(mask_token=False)   # as a classifier backbone
  restored = restore.pretrained_encoder(image, config.data, str(tmp_path))
  trained = checkpoint.restore_subtree(str(tmp_path), ("params", "image"))
  np.testing.assert_array_equal(restored["cls_token"], trained["cls_token"])
