"""Tests for the DINO multi-crop augmentations and their pipeline mode."""
import logging
import os
import sys

import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402
from medfm_jax.data import pipeline, transforms  # noqa: E402
from medfm_jax.data import spec as data_spec  # noqa: E402
from medfm_jax.data.phantoms import LESION_LABELS, PhantomSource  # noqa: E402
from tests import helpers  # noqa: E402

SPEC = transforms.MultiCropSpec(global_size=32, local_size=16, num_local=3)


def _image(h=48, w=48, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _grad_energy(x):
  x = x.astype(np.float64)
  return np.abs(np.diff(x, axis=0)).sum() + np.abs(np.diff(x, axis=1)).sum()


# ----------------------------------------------------------------------------
# Spec and crops.


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_local", [0, 3])
def test_multicrop_shapes_and_dtypes(channels, num_local):
  img = PhantomSource("train", image_size=48, channels=channels, num_examples=4)[0]["image"]
  spec = transforms.MultiCropSpec(num_global=3, global_size=32, local_size=16,
                                  num_local=num_local)
  out = transforms.multicrop(img, _rng(), spec)
  assert set(out) == {"global", "local"}
  assert out["global"].shape == (3, 32, 32, channels) and out["global"].dtype == np.uint8
  assert out["local"].shape == (num_local, 16, 16, channels) and out["local"].dtype == np.uint8


def test_view_policies():
  views = transforms.MultiCropSpec(num_global=3, num_local=2).views()
  assert [(v.size, v.blur_p, v.solarize_p) for v in views] == [
      (224, 1.0, 0.0), (224, 0.1, 0.2), (224, 0.1, 0.2), (96, 0.5, 0.0), (96, 0.5, 0.0)]
  assert views[0].scale == (0.4, 1.0) and views[-1].scale == (0.05, 0.4)


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_box_area_within_global_and_local_scales(scale):
  rng, areas = _rng(1), []
  for _ in range(300):
    top, left, h, w = transforms.crop_box(64, 64, rng, scale, (3 / 4, 4 / 3))
    assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
    areas.append(h * w / 64 ** 2)
  tol = 2 * 64 / 64 ** 2 * 8  # rounding h and w to integers
  assert scale[0] - tol <= min(areas) and max(areas) <= scale[1] + tol
  assert max(areas) - min(areas) > 0.5 * (scale[1] - scale[0])


def test_multicrop_is_the_documented_view_sequence():
  img, spec = _image(), SPEC
  out = transforms.multicrop(img, _rng(7), spec, flip=True)
  rng = _rng(7)
  expected = [transforms.augment_view(img, rng, v, spec.ratio, True, spec.global_size / 224)
              for v in spec.views()]
  np.testing.assert_array_equal(out["global"], np.stack(expected[:2]))
  np.testing.assert_array_equal(out["local"], np.stack(expected[2:]))


def test_global_view_one_is_always_blurred():
  img = _image(64, 64, 1)
  policy = SPEC.views()[0]
  unblurred = transforms.ViewPolicy(policy.size, policy.scale, 0.0, 0.0)
  smaller = 0
  for seed in range(20):
    a = transforms.augment_view(img, _rng(seed), policy, sigma_scale=1.0)
    b = transforms.augment_view(img, _rng(seed), unblurred, sigma_scale=1.0)
    assert _grad_energy(a) <= _grad_energy(b)
    smaller += _grad_energy(a) < 0.95 * _grad_energy(b)
  assert smaller >= 15  # sigma ~ U[0.1, 2]: all but the smallest sigmas smooth visibly


@pytest.mark.parametrize("kw,field", [
    (dict(global_size=0), "global_size"), (dict(local_size=-1), "local_size"),
    (dict(num_global=0), "num_global"), (dict(num_local=-1), "num_local"),
    (dict(global_scale=(0.0, 1.0)), "global_scale"), (dict(local_scale=(0.5, 0.4)), "local_scale"),
    (dict(local_scale=(0.1, 1.5)), "local_scale"), (dict(ratio=(2.0, 1.0)), "ratio"),
    (dict(num_local=2.5), "num_local"), (dict(global_scale=0.4), "global_scale")])
def test_spec_validation(kw, field):
  with pytest.raises(ValueError, match=f"data.multicrop.{field}"):
    transforms.MultiCropSpec(**kw)
  with pytest.raises(ValueError, match="data.multicrop.bogus"):
    transforms.MultiCropSpec.from_config({"bogus": 1})


# ----------------------------------------------------------------------------
# Photometric ops.


def test_color_jitter_on_one_channel_is_brightness_contrast_only():
  const = np.full((8, 8, 1), 100, np.uint8)
  values = set()
  for seed in range(20):
    out = transforms.color_jitter(const, _rng(seed), p=1.0)
    assert out.shape == const.shape and out.dtype == np.uint8
    assert (out == out.flat[0]).all()  # no per-pixel (hue/saturation-like) change
    values.add(int(out.flat[0]))
  assert len(values) > 3  # brightness does act
  # A monotone (affine, clamped) map of the pixel values: order is preserved.
  img = _image(16, 16, 1)
  order = np.argsort(img.ravel(), kind="stable")
  for seed in range(10):
    out = transforms.color_jitter(img, _rng(seed), p=1.0).ravel()
    assert (np.diff(out[order].astype(int)) >= 0).all()
  np.testing.assert_array_equal(transforms.color_jitter(img, _rng(0), p=0.0), img)


def test_random_grayscale():
  img1 = _image(8, 8, 1)
  assert transforms.random_grayscale(img1, _rng(), p=1.0) is img1  # no-op on 1 channel
  img = _image(8, 8, 3)
  gray = transforms.random_grayscale(img, _rng(), p=1.0)
  assert gray.shape == img.shape and gray.dtype == np.uint8
  assert (gray == gray[..., :1]).all()
  np.testing.assert_allclose(gray[..., 0], img @ np.array([0.2989, 0.587, 0.114]), atol=0.51)
  assert transforms.random_grayscale(img, _rng(), p=0.0) is img


def test_rgb_color_jitter_changes_channel_relations():
  rng = _rng(3)
  img = np.clip(rng.normal(128, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
  luma = lambda x: x.astype(np.float64) @ [0.2989, 0.587, 0.114]  # noqa: E731
  chroma = lambda x: x.astype(np.float64) - luma(x)[..., None]  # noqa: E731
  # Hue only: luminance kept (YIQ rotation), chroma rotated.
  hue = transforms.color_jitter(img, _rng(1), brightness=0, contrast=0, saturation=0,
                                hue=0.1, p=1.0)
  assert np.abs(luma(hue) - luma(img)).max() < 2.0
  assert np.abs(chroma(hue) - chroma(img)).mean() > 2.0
  # Saturation only: luminance kept, chroma scaled by one factor.
  for seed in range(5):
    sat = transforms.color_jitter(img, _rng(seed), brightness=0, contrast=0, saturation=0.5,
                                  hue=0, p=1.0)
    assert np.abs(luma(sat) - luma(img)).max() < 1.5
    f = (chroma(sat) * chroma(img)).sum() / (chroma(img) ** 2).sum()
    assert 0.5 - 0.02 <= f <= 1.5 + 0.02
    np.testing.assert_allclose(chroma(sat), f * chroma(img), atol=1.5)
  # A gray RGB image stays gray under the full jitter.
  gray = np.repeat(_image(16, 16, 1), 3, axis=-1)
  out = transforms.color_jitter(gray, _rng(0), p=1.0)
  assert np.abs(out.astype(int) - out[..., :1]).max() <= 1


def test_solarize():
  img = np.array([0, 100, 127, 128, 200, 255], np.uint8).reshape(1, 6, 1)
  np.testing.assert_array_equal(transforms.solarize(img, _rng(), p=1.0).ravel(),
                                [0, 100, 127, 127, 55, 0])
  np.testing.assert_array_equal(transforms.solarize(img, _rng(), p=1.0, threshold=200).ravel(),
                                [0, 100, 127, 128, 55, 0])
  assert transforms.solarize(img, _rng(), p=0.0) is img


def test_gaussian_blur():
  const = np.full((20, 30, 3), 77, np.uint8)
  out = transforms.gaussian_blur(const, _rng(), p=1.0, sigma=(2.0, 2.0), sigma_scale=1.0)
  assert out.shape == const.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, const)  # edges replicate: a constant stays constant
  noise = np.clip(_rng(1).normal(128, 40, (112, 112, 1)), 0, 255).astype(np.uint8)
  blurred = transforms.gaussian_blur(noise, _rng(), p=1.0, sigma=(1.5, 1.5), sigma_scale=1.0)
  assert abs(blurred.mean() - noise.mean()) < 1.0
  assert blurred.std() < 0.5 * noise.std()
  # Default sigma scale is min(H, W) / 224 (here 0.5): a weaker blur.
  weak = transforms.gaussian_blur(noise, _rng(), p=1.0, sigma=(1.5, 1.5))
  assert blurred.std() < weak.std() < noise.std()
  assert transforms.gaussian_blur(noise, _rng(), p=0.0) is noise


# ----------------------------------------------------------------------------
# Pipeline.


def _cfg(channels=1, **mc):
  c = common.base_config().data
  c.image_size, c.channels, c.num_workers = 32, channels, 0
  c.multicrop = ml_collections.ConfigDict(
      dict(num_global=2, global_size=24, num_local=2, local_size=12, **mc))
  return c


def _source(n=40, channels=1):
  return PhantomSource("train", image_size=32, channels=channels, num_examples=n)


_take = helpers.take
_assert_batches_equal = helpers.assert_batches_equal


@pytest.mark.parametrize("channels", [1, 3])
def test_pipeline_multicrop_batches(channels):
  cfg = _cfg(channels)
  b = next(pipeline.make_train_iterator(cfg, 4, seed=0, source=_source(channels=channels)))
  assert set(b) == {"global", "local", "modality", "finding", *LESION_LABELS}
  assert set(b) == set(data_spec.resolve(cfg).abstract_batch(4))
  assert b["global"].shape == (4, 2, 24, 24, channels) and b["global"].dtype == np.float32
  assert b["local"].shape == (4, 2, 12, 12, channels) and b["local"].dtype == np.float32
  assert b["modality"].dtype == b["finding"].dtype == np.int32
  lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
  for k in ("global", "local"):
    assert lo - 1e-5 <= b[k].min() and b[k].max() <= hi + 1e-5 and b[k].std() > 0.1
  # Eval batches are unchanged: centre-resized ``image`` at data.image_size.
  e = next(iter(pipeline.make_eval_batches(cfg, "train", 4, 4, source=_source(channels=channels))))
  assert e["image"].shape == (4, 32, 32, channels)


def test_pipeline_multicrop_deterministic_and_restorable():
  a = _take(pipeline.make_train_iterator(_cfg(), 4, seed=3, source=_source(10)), 2)
  b = _take(pipeline.make_train_iterator(_cfg(), 4, seed=3, source=_source(10)), 2)
  c = _take(pipeline.make_train_iterator(_cfg(), 4, seed=4, source=_source(10)), 2)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["global"], c[0]["global"])
  helpers.assert_restore_reproduces(  # skipping 3 batches crosses an epoch boundary
      lambda: pipeline.make_train_iterator(_cfg(), 4, seed=0, source=_source(10)), skip=3, check=2)


def test_pipeline_multicrop_batches_do_not_depend_on_workers():
  cfg = _cfg()
  cfg.num_workers, cfg.prefetch = 2, 2
  it = pipeline.make_train_iterator(cfg, 4, seed=2, source=_source())
  try:
    with_workers = _take(it, 3)
  finally:
    it.close()
  _assert_batches_equal(
      with_workers, _take(pipeline.make_train_iterator(_cfg(), 4, seed=2, source=_source()), 3))


def test_pipeline_multicrop_process_rows():
  helpers.assert_process_rows(lambda p, n: pipeline.make_train_iterator(
      _cfg(), 4, seed=1, process_index=p, process_count=n, source=_source()), global_batch=4)


def test_pipeline_multicrop_off_and_errors():
  plain = common.base_config().data
  plain.image_size, plain.num_workers = 32, 0
  off = common.base_config().data
  off.image_size, off.num_workers, off.multicrop = 32, 0, None
  assert data_spec.resolve(plain).multicrop is None and data_spec.resolve(off).multicrop is None
  _assert_batches_equal(
      _take(pipeline.make_train_iterator(plain, 4, seed=0, source=_source(channels=3)), 1),
      _take(pipeline.make_train_iterator(off, 4, seed=0, source=_source(channels=3)), 1))
  spec = data_spec.resolve(_cfg(local_scale=(0.1, 0.3))).multicrop
  assert spec == transforms.MultiCropSpec(global_size=24, local_size=12, num_local=2,
                                          local_scale=(0.1, 0.3))
  bad = _cfg()
  bad.multicrop.local_size = 0
  with pytest.raises(ValueError, match="data.multicrop.local_size"):
    pipeline.make_train_iterator(bad, 4, seed=0, source=_source())


def test_multicrop_throughput():
  """Measurement only: global 64 / local 32 / 6 locals / batch 32, 0 workers."""
  cfg = common.base_config().data
  cfg.image_size, cfg.channels, cfg.num_workers = 64, 3, 0
  cfg.multicrop = ml_collections.ConfigDict(
      dict(global_size=64, local_size=32, num_local=6))
  rate = pipeline.benchmark_train_iterator(cfg, 32, num_batches=4, warmup=1)
  logging.getLogger(__name__).info("multi-crop throughput: %.0f images/s", rate)
  assert rate > 0
