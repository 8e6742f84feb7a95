"""Volume transforms and the volume pipeline: intensity schemes, crops, flips, spec and batches."""
import numpy as np
import pytest

from configs import common
from medfm_jax.data import pipeline, volumes
from medfm_jax.data import spec as spec_lib
from tests import helpers

RNG = np.random.default_rng(0)


def test_ct_window_and_percentile_clip_then_zscore():
  ct = RNG.normal(40, 30, (6, 6, 6, 1)).astype(np.float32)
  ct[0] = -1000.0                                             # air: background
  ct[1, 0, 0] = 3000.0                                         # metal outlier
  spec = volumes.VolumeSpec(ct_window=(-200.0, 300.0))
  out = volumes.normalize_intensity(ct, "ct", spec)
  clipped = np.clip(ct, -200, 300)
  fg = ct > -200
  np.testing.assert_allclose(out, (clipped - clipped[fg].mean()) / clipped[fg].std(), rtol=1e-4, atol=1e-5)
  pct = volumes.normalize_intensity(ct, "ct", volumes.VolumeSpec(ct_clip="percentile", percentiles=(1, 99)))
  lo, hi = np.percentile(ct[fg], (1, 99))
  assert out.max() < pct.max() + 10 and np.isclose(pct.argmax(), np.clip(ct, lo, hi).argmax())
  assert abs(float(pct[fg].mean())) < 1e-4 and abs(float(pct[fg].std()) - 1) < 1e-3


def test_mr_zscore_over_foreground_and_auto_scheme():
  mr = np.zeros((4, 4, 4, 1), np.float32)
  mr[1:3] = RNG.uniform(100, 500, (2, 4, 4, 1))
  out = volumes.normalize_intensity(mr, "mr", volumes.VolumeSpec())
  fg = mr > 0
  assert abs(out[fg].mean()) < 1e-5 and abs(out[fg].std() - 1) < 1e-4
  assert volumes.scheme_for("auto", "CT") == "ct" and volumes.scheme_for("auto", "MR") == "mr"
  assert volumes.scheme_for("mr", "CT") == "mr"


def test_foreground_biased_crops_flips_and_padding():
  vol = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14, 1)
  lab = np.zeros((10, 12, 14), np.uint8)
  lab[8, 1, 12] = 2
  hits = 0
  for seed in range(20):
    img, l = volumes.random_crop(vol, lab, (4, 4, 4), np.random.default_rng(seed), foreground_prob=1.0)
    assert img.shape == (4, 4, 4, 1) and l.shape == (4, 4, 4)
    hits += int((l == 2).any())
    # The crop is a window of the volume: its corner value locates it.
    z, y, x = np.unravel_index(int(img[0, 0, 0, 0]), (10, 12, 14))
    np.testing.assert_array_equal(img[..., 0], vol[z:z + 4, y:y + 4, x:x + 4, 0])
  assert hits == 20
  unbiased = sum(int((volumes.random_crop(vol, lab, (4, 4, 4), np.random.default_rng(s), 0.0)[1] == 2).any())
                 for s in range(20))
  assert unbiased < 10
  lab[:4] = 1   # nnU-Net's class-balanced oversampling: the one class-2 voxel gets half the crops
  small = sum(int((volumes.random_crop(vol, lab, (4, 4, 4), np.random.default_rng(s), 1.0)[1] == 2).any())
              for s in range(40))
  assert 12 <= small <= 28
  lab[:4] = 0
  img, l = volumes.random_crop(vol[:2], lab[:2], (4, 4, 4), np.random.default_rng(0))   # padded
  assert img.shape == (4, 4, 4, 1) and (img[0] == vol.min()).all() and (l[0] == 0).all()
  seen = set()
  for seed in range(8):   # image and labels flipped together; every axis flipped by some seed
    flipped, fl = volumes.random_flips(vol, lab, np.random.default_rng(seed))
    where = np.argwhere(fl == 2)[0]
    assert flipped[tuple(where)][0] == vol[8, 1, 12, 0]
    axes = tuple(a for a in range(3) if where[a] != (8, 1, 12)[a])
    np.testing.assert_array_equal(flipped, np.flip(vol, axes))
    seen.update(axes)
  assert seen == {0, 1, 2}


def test_volume_spec_errors_and_abstract_batch_matches_a_real_batch():
  c = common.base_config().data
  c.channels, c.image_size = 1, 16
  c.volume = {"size": (16, 8, 16), "labels": True, "phantom_size": 20}
  spec = spec_lib.DataSpec.from_config(c)
  batch = next(pipeline.make_train_iterator(c, 2, seed=0))
  abstract = spec.abstract_batch(2)
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
  for bad, message in (({"size": (16, 0, 16)}, "data.volume.size"), ({"intensity": "pet"}, "data.volume.intensity"),
                       ({"ct_window": (300, -200)}, "data.volume.ct_window"),
                       ({"foreground_prob": 2}, "data.volume.foreground_prob")):
    c.volume = bad
    with pytest.raises(ValueError, match=message):
      spec_lib.DataSpec.from_config(c)
  c.volume, c.tokenizer = {"size": 16}, "bytes"
  with pytest.raises(ValueError, match="data.tokenizer is 2-D only"):
    spec_lib.DataSpec.from_config(c)


def test_train_batches_are_deterministic_and_eval_pads():
  c = helpers.override(common.base_config().data, {"channels": 1, "image_size": 8})
  c.volume = {"size": 8, "phantom_size": 12}
  a = next(pipeline.make_train_iterator(c, 2, seed=3))
  b = next(pipeline.make_train_iterator(c, 2, seed=3))
  np.testing.assert_array_equal(a["image"], b["image"])
  batches = list(pipeline.make_eval_batches(c, "val", 2, 3))
  assert [list(x["mask"]) for x in batches] == [[True, True], [True, False]]
  assert (batches[1]["image"][1] == 0).all() and batches[0]["image"].shape == (2, 8, 8, 8, 1)
