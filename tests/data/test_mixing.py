"""Mixed paired / image-only / text-only batches (data/mixing.py and the pipeline hook)."""
import json

import numpy as np
import pytest

from medfm_jax.data import mixing, pipeline
from tests import helpers
from tests.data.test_pipeline import _cfg, _source

MIX = {"paired": 0.5, "image": 0.25, "text": 0.25}


def _mix_cfg(**kw):
  base = dict(tokenizer="bytes", context_length=24, mlm={"probability": 0.15}, mix=MIX,
              patch_masks={"patch_size": 8, "probability": 1.0, "ratio": (0.25, 0.5)})
  base.update(kw)
  return _cfg(**base)


@pytest.mark.parametrize("ratios,n,expect", [((0.5, 0.25, 0.25), 8, (4, 2, 2)),
                                             ((0.5, 0.25, 0.25), 6, (3, 2, 1)),
                                             ((1 / 3, 1 / 3, 1 / 3), 10, (4, 3, 3)),
                                             ((0.7, 0.0, 0.3), 5, (4, 0, 1))])
def test_slot_counts_largest_remainder(ratios, n, expect):
  assert mixing.slot_counts(ratios, n) == expect


def test_interleave_exact_counts_spread_evenly():
  counts = mixing.slot_counts((0.5, 0.3, 0.2), 40)
  pattern = np.array(mixing.interleave(counts))
  assert tuple(np.bincount(pattern, minlength=3)) == counts == (20, 12, 8)
  for k, c in enumerate(counts):            # every prefix is within one of its quota
    prefix = np.cumsum(pattern == k)
    assert np.all(np.abs(prefix - c * np.arange(1, 41) / 40) < 1)


@pytest.mark.parametrize("mix,match", [({"paired": 0.5, "image": 0.4}, "sum to 1"),
                                       ({"paired": 1.2, "text": -0.2}, ">= 0"),
                                       ({"paired": 0.5, "audio": 0.5}, "unknown kinds"),
                                       ("paired", "must be a dict")])
def test_bad_mix(mix, match):
  with pytest.raises(ValueError, match=match):
    mixing.parse_ratios(mix)


def test_batches_have_exact_kinds_and_blank_the_missing_modality():
  it = pipeline.make_train_iterator(_mix_cfg(), 8, seed=0, source=_source())
  for b in helpers.take(it, 3):
    has_i, has_t = b["has_image"], b["has_text"]
    assert b["image"].shape == (8, 32, 32, 1) and b["tokens"].shape == (8, 24)
    assert (has_i & has_t).sum() == 4 and (has_i & ~has_t).sum() == 2 and (~has_i & has_t).sum() == 2
    assert not np.any(b["image"][~has_i]) and not np.any(b["patch_mask"][~has_i])
    assert np.all(b["tokens"][~has_t] == 0) and np.all(b["mlm_tokens"][~has_t] == 0)
    assert np.all(b["mlm_labels"][~has_t] == -1)
    assert np.all(b["image"][has_i].reshape(int(has_i.sum()), -1).std(1) > 0)
    assert np.all(b["patch_mask"][has_i].any(1)) and np.all((b["mlm_labels"][has_t] >= 0).any(1))
    assert np.all(b["tokens"][has_t][:, 0] == 257)


def test_without_mix_no_flags_and_eval_rows_are_paired():
  assert "has_image" not in next(pipeline.make_train_iterator(
      _mix_cfg(mix=None), 8, seed=0, source=_source()))
  batches = list(pipeline.make_eval_batches(_mix_cfg(), "val", 8, 12, source=_source(16)))
  flags = np.concatenate([np.stack([b["has_image"], b["has_text"]], 1) for b in batches])
  np.testing.assert_array_equal(flags, np.repeat([[True, True], [False, False]], [12, 4], axis=0))


def test_mixed_stream_resumes_and_splits_over_processes():
  helpers.assert_restore_reproduces(
      lambda: pipeline.make_train_iterator(_mix_cfg(), 8, seed=3, source=_source(20)), 3, 2)
  helpers.assert_process_rows(
      lambda p, n: pipeline.make_train_iterator(_mix_cfg(), 8, seed=3, process_index=p,
                                                process_count=n, source=_source()), 8)


@pytest.mark.slow
def test_workers_match_in_process_and_resume():
  in_process = helpers.take(pipeline.make_train_iterator(_mix_cfg(), 8, seed=5, source=_source()), 3)
  it = pipeline.make_train_iterator(_mix_cfg(num_workers=2), 8, seed=5, source=_source())
  try:
    first = helpers.take(it, 1)
    state = json.loads(json.dumps(it.get_state()))
    rest = helpers.take(it, 2)
  finally:
    it.close()
  helpers.assert_batches_equal(first + rest, in_process)
  fresh = pipeline.make_train_iterator(_mix_cfg(num_workers=2), 8, seed=5, source=_source())
  try:
    fresh.set_state(state)
    helpers.assert_batches_equal(helpers.take(fresh, 2), rest)
  finally:
    fresh.close()
