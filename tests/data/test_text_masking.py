"""BERT-style MLM masking (data/text_masking.py) and its pipeline hook (mlm_tokens/labels, patch_mask)."""
import numpy as np
import pytest

from medfm_jax.data import pipeline, text_masking, tokenizers
from tests import helpers
from tests.data.test_pipeline import _cfg, _source

BYTES = tokenizers.ByteTokenizer()
SPEC = text_masking.MLMSpec.from_config({"probability": 0.15}, BYTES)


def _texts(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ["chest", "x-ray", "no", "focal", "opacity", "brain", "mri", "lesion", "t2"]
  return [" ".join(rng.choice(words, size=rng.integers(1, 8))) for _ in range(n)]


def test_byte_tokenizer_mask_id_and_vocab():
  assert BYTES.mask_id == 259 and BYTES.vocab_size == 259       # CLIP vocab unchanged
  assert tokenizers.mlm_vocab_size(BYTES) == 260
  assert SPEC.special_ids == (0, 257, 258, 259)


def test_mask_tokens_rule_and_statistics():
  toks = tokenizers.tokenize(BYTES, _texts(3000), 40)
  rng = np.random.default_rng(0)
  chosen_total, kinds = 0, np.zeros(3)
  for t in toks:
    masked, labels = text_masking.mask_tokens(t, rng, SPEC)
    maskable = ~np.isin(t, SPEC.special_ids)
    chosen = labels >= 0
    assert chosen.sum() == max(1, round(0.15 * maskable.sum()))
    assert not np.any(chosen & ~maskable)                         # specials never predicted
    np.testing.assert_array_equal(labels[chosen], t[chosen])
    np.testing.assert_array_equal(masked[~chosen], t[~chosen])    # everything else untouched
    m = masked[chosen]
    kinds += [(m == 259).sum(), ((m != 259) & (m != t[chosen])).sum(), (m == t[chosen]).sum()]
    assert np.all((m == 259) | ((m >= 1) & (m <= 256)))          # random ids are bytes
    chosen_total += chosen.sum()
  # ~20k predictions: sd of each fraction < 0.004; the tolerance 0.02 (> 5 sd) still separates
  # 0.8/0.1/0.1 from e.g. 0.9/0.1/0 or 0.8/0.2/0. (A random byte equals the original w.p. 1/256,
  # counted as "unchanged": expected 0.1 * 255/256 random, 0.1 + 0.1/256 unchanged.)
  np.testing.assert_allclose(kinds / chosen_total, [0.8, 0.1, 0.1], atol=0.02)


def test_random_ids_uniform_over_non_special_vocab():
  spec = text_masking.MLMSpec(mask_id=5, vocab_size=7, special_ids=(0, 2, 5, 9))
  ids = spec.random_ids(np.random.default_rng(0), 40000)
  freq = np.bincount(ids, minlength=7) / len(ids)
  np.testing.assert_allclose(freq, [0, 0.25, 0, 0.25, 0.25, 0, 0.25], atol=0.01)


def test_nothing_maskable_and_deterministic():
  empty = tokenizers.tokenize(BYTES, [""], 8)[0]                   # bos eot pad...
  masked, labels = text_masking.mask_tokens(empty, np.random.default_rng(0), SPEC)
  np.testing.assert_array_equal(masked, empty)
  assert np.all(labels == -1)
  t = tokenizers.tokenize(BYTES, ["brain mri t2 lesion"], 24)[0]
  a = text_masking.mask_tokens(t, np.random.default_rng(7), SPEC)
  b = text_masking.mask_tokens(t, np.random.default_rng(7), SPEC)
  np.testing.assert_array_equal(a, b)


def test_hf_mask_token_and_bad_specs(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  for specials, expect in ((["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], 4), (["[PAD]", "[UNK]"], None)):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(50), trainers.WordLevelTrainer(special_tokens=specials))
    path = str(tmp_path / f"tok{len(specials)}.json")
    tok.save(path)
    hf = tokenizers.load("hf", path)
    assert hf.mask_id == expect
    assert set(range(len(specials))) <= set(hf.special_ids)
  with pytest.raises(ValueError, match="data.mlm is set but the tokenizer has no mask token"):
    text_masking.MLMSpec.from_config({}, hf)
  with pytest.raises(ValueError, match="data.mlm.probability"):
    text_masking.MLMSpec.from_config({"probability": 1.5}, BYTES)
  with pytest.raises(ValueError, match="data.mlm.mask_frac=0.8, data.mlm.random_frac=0.3"):
    text_masking.MLMSpec.from_config({"random_frac": 0.3}, BYTES)


def _flava_cfg(**kw):
  return _cfg(tokenizer="bytes", context_length=24, mlm={"probability": 0.15},
              patch_masks={"patch_size": 8, "probability": 1.0, "ratio": (0.25, 0.5)}, **kw)


def test_pipeline_adds_mlm_and_patch_mask_without_changing_the_rest():
  plain = next(pipeline.make_train_iterator(_cfg(tokenizer="bytes", context_length=24), 8, seed=1,
                                            source=_source()))
  b = next(pipeline.make_train_iterator(_flava_cfg(), 8, seed=1, source=_source()))
  assert set(b) == set(plain) | {"mlm_tokens", "mlm_labels", "patch_mask"}
  for k in plain:                                 # extras are drawn after the augmentations
    np.testing.assert_array_equal(b[k], plain[k])
  assert b["mlm_tokens"].dtype == b["mlm_labels"].dtype == np.int32
  assert b["patch_mask"].shape == (8, 16) and b["patch_mask"].dtype == bool
  assert np.all(b["patch_mask"].sum(1) >= 1) and np.all(b["patch_mask"].sum(1) <= 8)
  predicted = b["mlm_labels"] >= 0
  assert np.all(predicted.sum(1) >= 1)
  np.testing.assert_array_equal(b["mlm_labels"][predicted], b["tokens"][predicted])
  np.testing.assert_array_equal(b["mlm_tokens"][~predicted], b["tokens"][~predicted])


def test_pipeline_masks_resume_and_eval_is_deterministic():
  helpers.assert_restore_reproduces(
      lambda: pipeline.make_train_iterator(_flava_cfg(), 8, seed=2, source=_source(20)), 3, 2)
  evals = [list(pipeline.make_eval_batches(_flava_cfg(), "val", 8, 12, source=_source(16)))
           for _ in range(2)]
  helpers.assert_batches_equal(*evals)
  last = evals[0][-1]                                             # rows 4..7 are padding
  assert not last["patch_mask"][4:].any() and np.all(last["mlm_labels"][4:] == -1)
  assert last["patch_mask"][:4].any(axis=1).all() and (last["mlm_labels"][:4] >= 0).any(axis=1).all()


@pytest.mark.parametrize("overrides,match", [
    ({"data.mlm": {"probability": -0.1}}, "data.mlm.probability"),
    ({"data.mlm": {"probability": 0.15}}, "model.text.vocab_size=259: data.mlm needs 260"),
    ({"data.mlm": {}, "model.text.vocab_size": 260, "data.tokenizer": ""}, "data.mlm needs a data.tokenizer"),
    ({"data.patch_masks": {"patch_size": 8, "probability": 1.0, "ratio": (0.2, 0.4)}},
     "data.patch_masks.patch_size=8: must equal the model's patch size 4"),
    ({"data.mix": {"paired": 0.5}}, "data.mix=.*sum to 1"),
    ({"data.mlm": {"probability": 0.15}, "model.text.vocab_size": 260,
      "data.mix": {"paired": 0.5, "text": 0.5},
      "data.patch_masks": {"patch_size": 4, "probability": 1.0, "ratio": (0.2, 0.4)}}, None)])
def test_config_validation_of_the_masked_inputs(overrides, match):
  from medfm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = helpers.tiny_clip_config(allow_new=("data.mlm", "data.mix", "data.patch_masks"), **overrides)
  if match is None:
    config_lib.validate(c, num_devices=1)
  else:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(c, num_devices=1)
