"""Tests for the numpy per-record transforms."""
import numpy as np
import pytest
from PIL import Image

from medfm_jax.data import transforms


def _image(h=64, w=64, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_random_resized_crop_size_and_dtype(channels):
  rng = np.random.default_rng(0)
  for out in (16, 32, 50):
    crop = transforms.random_resized_crop(_image(64, 48, channels), rng, out)
    assert crop.shape == (out, out, channels) and crop.dtype == np.uint8
  crop = transforms.random_resized_crop(_image(c=channels).astype(np.float32), rng, 20)
  assert crop.dtype == np.float32


def test_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(1)
  areas, ratios = [], []
  for _ in range(500):
    top, left, h, w = transforms.crop_box(100, 80, rng, scale=(0.3, 0.5), ratio=(0.75, 4 / 3))
    assert 0 <= top <= 100 - h and 0 <= left <= 80 - w
    areas.append(h * w / 8000)
    ratios.append(w / h)
  assert 0.29 <= min(areas) and max(areas) <= 0.51
  assert 0.73 <= min(ratios) and max(ratios) <= 1.36
  assert max(areas) - min(areas) > 0.15  # the range is actually explored


def test_crop_box_falls_back_to_center():
  # An aspect range the 100x10 image cannot hold: centre crop, clamped ratio.
  top, left, h, w = transforms.crop_box(100, 10, np.random.default_rng(0), scale=(0.9, 1.0),
                                        ratio=(1.0, 1.0))
  assert (h, w) == (10, 10) and (top, left) == (45, 0)


def test_full_crop_at_same_size_is_identity_and_resize_matches_pil():
  img = _image()
  same = transforms.random_resized_crop(img, np.random.default_rng(0), 64, scale=(1, 1),
                                        ratio=(1, 1))
  np.testing.assert_array_equal(same, img)
  for out in (24, 100):
    ours = transforms.center_resize(img, out).astype(int)
    pil = np.asarray(Image.fromarray(img).resize((out, out), Image.BILINEAR)).astype(int)
    assert np.abs(ours - pil).max() <= 1


def test_center_resize_takes_central_square():
  img = np.full((40, 60, 1), 100, np.uint8)
  img[:, :10] = 0
  img[:, -10:] = 200
  out = transforms.center_resize(img, 20)
  assert out.shape == (20, 20, 1) and (out == 100).all()
  np.testing.assert_array_equal(transforms.center_resize(img[:, 10:50], 40), img[:, 10:50])


def test_random_flip():
  img = _image(8, 8, 1)
  np.testing.assert_array_equal(transforms.random_flip(img, np.random.default_rng(0), p=1.0),
                                img[:, ::-1])
  np.testing.assert_array_equal(transforms.random_flip(img, np.random.default_rng(0), p=0.0), img)
  rng = np.random.default_rng(0)
  flipped = [np.array_equal(transforms.random_flip(img, rng), img[:, ::-1]) for _ in range(100)]
  assert 30 < sum(flipped) < 70


def test_normalize_math_and_broadcasting():
  img = np.array([[[0, 255, 51]]], np.uint8)  # [1, 1, 3]
  out = transforms.normalize(img, (0.5,), (0.25,))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [-2.0, 2.0, (0.2 - 0.5) / 0.25], rtol=1e-6)
  out = transforms.normalize(img, (0.0, 1.0, 0.2), (1.0, 0.5, 0.1))
  np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="data.mean"):
    transforms.normalize(img, (0.1, 0.2), (1.0,))
