"""Dice and HD95 on shapes whose values are known in closed form (and against MONAI's HD95)."""
import numpy as np
import pytest

from medfm_jax.metrics import segmentation


def _box(shape, lo, hi, cls=1):
  m = np.zeros(shape, np.int32)
  m[tuple(slice(a, b) for a, b in zip(lo, hi))] = cls
  return m


def test_dice_of_shifted_boxes_and_empty_classes():
  a, b = _box((10, 10, 10), (2, 2, 2), (6, 6, 6)), _box((10, 10, 10), (3, 2, 2), (7, 6, 6))
  assert segmentation.dice(a, b, 1) == pytest.approx(2 * 48 / 128)
  assert segmentation.dice(a, a, 1) == 1.0 and np.isnan(segmentation.dice(a, b, 2))
  assert segmentation.dice(a, np.zeros_like(a), 1) == 0.0


def test_hd95_of_a_shifted_box_is_the_shift_in_mm():
  a, b = _box((12, 12, 12), (2, 2, 2), (8, 8, 8)), _box((12, 12, 12), (4, 2, 2), (10, 8, 8))
  assert segmentation.hd95(a, b, 1, spacing=(1.5, 1.0, 1.0)) == pytest.approx(2 * 1.5)
  assert segmentation.hd95(a, a, 1) == 0.0
  assert segmentation.hd95(a, np.zeros_like(a), 1) == float("inf")
  out = segmentation.per_structure(a, b, ("background", "organ", "lesion"))
  assert set(out) == {"organ", "lesion"} and np.isnan(out["lesion"]["dice"])


def test_hd95_matches_monai():
  monai_metrics = pytest.importorskip("monai.metrics")   # the 'parity' extra
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  a = (rng.random((14, 13, 12)) < 0.3).astype(np.int32)
  b = (rng.random((14, 13, 12)) < 0.3).astype(np.int32)
  onehot = lambda m: torch.from_numpy(np.stack([m == 0, m == 1])[None].astype(np.float32))
  ref = monai_metrics.compute_hausdorff_distance(onehot(a), onehot(b), include_background=False,
                                                 percentile=95, spacing=(1.0, 2.0, 0.5))
  assert segmentation.hd95(a, b, 1, (1.0, 2.0, 0.5)) == pytest.approx(float(ref[0, 0]), rel=1e-5)
