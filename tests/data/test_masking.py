"""iBOT block masks: counts, determinism, rectangles, probability, and the multi-crop pipeline."""
import ml_collections
import numpy as np
import pytest

from medfm_jax.data import masking, pipeline
from tests import helpers


def test_block_mask_count_bounded_and_deterministic():
  for seed in range(50):
    target = int(np.random.default_rng(seed).integers(6, 33))
    m = masking.block_mask(np.random.default_rng(seed), 8, target)
    assert m.shape == (64,) and m.dtype == bool
    assert m.sum() <= target                                    # never more than asked
    assert m.sum() >= min(target, 4) or target < 4              # at least one block placed
    np.testing.assert_array_equal(m, masking.block_mask(np.random.default_rng(seed), 8, target))
  # Big targets are reached closely on average (blocks fill the budget).
  got = [masking.block_mask(np.random.default_rng(s), 16, 100).sum() for s in range(30)]
  assert np.mean(got) > 85


def test_one_block_is_a_filled_rectangle_within_budget():
  for seed in range(20):
    mask = np.zeros((8, 8), bool)
    added = masking._add_block(mask, np.random.default_rng(seed), 20, 4, (np.log(0.3), -np.log(0.3)))  # pylint: disable=protected-access
    rows, cols = np.nonzero(mask)
    assert 0 < added == mask.sum() <= 20
    assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_view_masks_probability_and_ratio():
  spec = masking.PatchMaskSpec(grid=8, probability=0.5, ratio=(0.1, 0.5))
  rng = np.random.default_rng(0)
  masks = np.concatenate([masking.view_masks(rng, spec, 2) for _ in range(400)])
  masked = masks.any(axis=1)
  assert 0.44 < masked.mean() < 0.56
  frac = masks[masked].mean(axis=1)
  assert frac.max() <= 0.5 and frac.min() >= 4 / 64


@pytest.mark.parametrize("bad, match", [(dict(patch_size=5), "patch_size"),
                                        (dict(ratio=(0.6, 0.2)), "ratio"),
                                        (dict(probability=1.5), "probability")])
def test_spec_rejects_bad_config(bad, match):
  cfg = ml_collections.ConfigDict(dict(patch_size=4, probability=0.5, ratio=(0.1, 0.5)))
  cfg.update(bad)
  with pytest.raises(ValueError, match=match):
    masking.PatchMaskSpec.from_config(cfg, 32)


def test_multicrop_batches_carry_global_masks():
  data = helpers.tiny_dino_config().data
  data.patch_masks = ml_collections.ConfigDict(dict(patch_size=4, probability=0.5, ratio=(0.1, 0.5)))
  batch = next(iter(pipeline.make_train_iterator(data, 8, seed=0)))
  assert batch["global_masks"].shape == (8, 2, 16) and batch["global_masks"].dtype == bool
  again = next(iter(pipeline.make_train_iterator(data, 8, seed=0)))
  np.testing.assert_array_equal(batch["global_masks"], again["global_masks"])
