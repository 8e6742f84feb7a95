"""Tests for the embedded phantom dataset."""
import pickle

import numpy as np
import pytest

from medfm_jax.data import phantoms
from medfm_jax.data.phantoms import FINDINGS, MODALITIES, PhantomSource

_MODALITY_WORD = {"ct": "CT", "mri": "MRI", "cxr": "X-ray", "histology": "histology"}
_FINDING_WORDS = {"single_lesion": "lesion", "multiple_lesions": "multiple",
                  "elongated_lesion": "elongated", "calcification": "calcification",
                  "ring_enhancing": "ring-enhancing"}
_LOCATIONS = {w for row in phantoms._LOCATIONS for w in row}


@pytest.fixture(scope="module")
def records32():
  src = PhantomSource("train", image_size=32, channels=1)
  return [src[i] for i in range(2000)]


def test_same_record_every_time_and_distinct_across_seed_split_index():
  a = PhantomSource("train", image_size=48, channels=1)[7]
  b = PhantomSource("train", image_size=48, channels=1)[7]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert (a["modality"], a["finding"], a["caption"]) == (b["modality"], b["finding"], b["caption"])
  others = [PhantomSource("train", 48, 1, seed=1)[7], PhantomSource("val", 48, 1)[7],
            PhantomSource("test", 48, 1)[7], PhantomSource("train", 48, 1)[8]]
  for other in others:
    assert not np.array_equal(a["image"], other["image"])


@pytest.mark.parametrize("size,channels", [(48, 1), (80, 3), (64, 3)])
def test_record_shapes_and_dtypes(size, channels):
  src = PhantomSource("val", image_size=size, channels=channels)
  for i in range(12):
    r = src[i]
    assert r["image"].shape == (size, size, channels) and r["image"].dtype == np.uint8
    assert r["modality"].dtype == np.int32 and r["finding"].dtype == np.int32
    assert r["index"] == i and isinstance(r["caption"], str)
    assert r["image"].std() > 5  # not blank
    if channels == 3:
      grey = MODALITIES[r["modality"]] != "histology"
      same = np.array_equal(r["image"][..., 0], r["image"][..., 1])
      assert same == grey  # grey modalities replicate; H&E is colour


def test_split_sizes_bounds_and_pickling():
  assert len(PhantomSource("train")) == 100_000 and len(PhantomSource("val")) == 2_000
  src = PhantomSource("test", image_size=32, num_examples=5)
  assert len(src) == 5
  with pytest.raises(IndexError):
    src[5]
  with pytest.raises(ValueError, match="split"):
    PhantomSource("training")
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[3]["image"], src[3]["image"])


def test_labels_balanced_and_captions_name_modality_finding_location(records32):
  recs = records32[:600]
  mods = np.array([r["modality"] for r in recs])
  finds = np.array([r["finding"] for r in recs])
  assert np.bincount(mods, minlength=4).min() >= 110      # 150 expected each
  assert np.bincount(finds, minlength=6).min() >= 70      # 100 expected each
  assert mods.max() < len(MODALITIES) and finds.max() < len(FINDINGS) and mods.min() >= 0
  for r in recs:
    cap, finding = r["caption"], FINDINGS[r["finding"]]
    assert _MODALITY_WORD[MODALITIES[r["modality"]]] in cap and cap.endswith(".")
    if finding == "none":
      assert "no focal finding" in cap
      continue
    assert _FINDING_WORDS[finding] in cap
    assert any(w in cap for w in ("small", "medium", "large"))
    assert cap[:-1].split(" in the ")[-1] in _LOCATIONS
    for other, word in _FINDING_WORDS.items():
      if other != finding and word != "lesion":
        assert word not in cap, (finding, cap)


def _ridge_accuracy(x, y, lam=10.0, n_train=1500):
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  targets = np.eye(y.max() + 1)[y[:n_train]]
  w = np.linalg.solve(x[:n_train].T @ x[:n_train] + lam * np.eye(x.shape[1]),
                      x[:n_train].T @ targets)
  return float(((x[n_train:] @ w).argmax(1) == y[n_train:]).mean())


def test_raw_pixel_linear_probe_reads_modality_but_not_finding(records32):
  x = np.stack([r["image"].ravel() for r in records32]).astype(np.float64) / 255
  finding_acc = _ridge_accuracy(x, np.array([r["finding"] for r in records32]))
  modality_acc = _ridge_accuracy(x, np.array([r["modality"] for r in records32]))
  # Measured: finding ~0.15-0.18 (chance 1/6), modality ~0.99.
  assert modality_acc > 0.9, modality_acc  # the probe itself works
  assert finding_acc < 0.35, finding_acc


@pytest.mark.parametrize("modality", range(len(MODALITIES)))
def test_findings_change_only_a_visible_local_region(modality):
  none, cap = phantoms.render_phantom(modality, 0, seed=(3, 4), image_size=64, channels=1)
  assert "no focal finding" in cap
  for finding in range(1, len(FINDINGS)):
    img, _ = phantoms.render_phantom(modality, finding, seed=(3, 4), image_size=64, channels=1)
    diff = np.abs(img.astype(int) - none.astype(int))
    changed = (diff > 0).mean()
    assert 0 < changed < 0.15, (FINDINGS[finding], changed)
    assert diff.max() >= 25, (FINDINGS[finding], diff.max())  # visible contrast


def test_benchmark_runs():
  assert phantoms.benchmark_phantoms(image_size=32, n=20) > 0


def test_lesion_labels_of_an_id_map():
  ids = np.zeros((10, 10), np.uint8)
  assert phantoms.lesion_labels(ids) == {"lesion_present": 0, "lesion_location": -1, "lesion_size": -1}
  ids[7:9, 1:3] = 2                      # largest lesion (4 px) lower left; total 5 px = 5 %
  ids[1, 8] = 1
  assert phantoms.lesion_labels(ids) == {"lesion_present": 1, "lesion_location": 2, "lesion_size": 2}
  ids[:] = 0
  ids[0, 9] = 1                          # 1 % of the image, upper right: medium (cuts 0.7 %, 1.2 %)
  assert phantoms.lesion_labels(ids) == {"lesion_present": 1, "lesion_location": 1, "lesion_size": 1}


def test_records_carry_the_lesion_labels_of_their_masks():
  source = PhantomSource("val", image_size=32, masks=True, num_examples=24)
  seen = set()
  for i in range(len(source)):
    r = source[i]
    labels = phantoms.lesion_labels(r["lesion_ids"])
    assert {k: r[k] for k in phantoms.LESION_LABELS} == labels
    assert labels["lesion_present"] == int(r["masks"][..., 0].any())
    seen.add(int(r["lesion_location"]))
  assert len(seen) >= 3                  # not a constant


def test_raw_pixel_linear_probe_stays_near_chance_on_the_lesion_labels(records32):
  # The floor of the benchmark tasks (docs/benchmark.md): a linear model on raw pixels within 5
  # points of the majority-class rate.
  x = np.stack([r["image"].ravel() for r in records32]).astype(np.float64) / 255
  for label in ("lesion_location", "lesion_size"):
    y = np.array([r[label] for r in records32])
    keep = y >= 0
    acc = _ridge_accuracy(x[keep], y[keep], n_train=1000)
    chance = np.bincount(y[keep][1000:]).max() / len(y[keep][1000:])
    assert acc < chance + 0.05, (label, acc, chance)
