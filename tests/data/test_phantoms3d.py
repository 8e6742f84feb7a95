"""3D phantoms: deterministic, 2D labels and captions, label maps that match the findings."""
import pickle
import re

import numpy as np
import pytest
from scipy import ndimage

from medfm_jax.data import phantoms, phantoms3d
from medfm_jax.data.phantoms3d import VolumePhantomSource


@pytest.fixture(scope="module")
def records():
  src = VolumePhantomSource("val", size=24)
  return [src[i] for i in range(48)]


def test_deterministic_and_distinct_across_seed_split_index():
  a, b = VolumePhantomSource("train", 16)[3], VolumePhantomSource("train", 16)[3]
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label_map"], b["label_map"])
  assert a["caption"] == b["caption"]
  for other in (VolumePhantomSource("train", 16, seed=1)[3], VolumePhantomSource("test", 16)[3],
                VolumePhantomSource("train", 16)[4]):
    assert not np.array_equal(a["image"], other["image"])
  src = VolumePhantomSource("test", 16, num_examples=2)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[1]["image"], src[1]["image"])
  with pytest.raises(IndexError):
    src[2]
  with pytest.raises(ValueError, match="split"):
    VolumePhantomSource("training")


def test_records_shapes_labels_and_captions_as_2d(records):
  caption = re.compile(r"^(Abdominal CT|Brain MRI) with (no focal finding|.* in the (" +
                       "|".join(w for row in phantoms._LOCATIONS for w in row) + "))\\.$")
  seen = set()
  for r in records:
    assert r["image"].shape == (24, 24, 24, 1) and r["image"].dtype == np.float32
    assert r["label_map"].shape == (24, 24, 24) and r["label_map"].dtype == np.uint8
    name = phantoms.MODALITIES[r["modality"]]
    assert name in phantoms3d.MODALITIES_3D and caption.match(r["caption"]), r["caption"]
    assert r["caption"].startswith(phantoms.MODALITY_NAMES[name])
    counts = np.bincount(r["label_map"].ravel(), minlength=phantoms3d.NUM_CLASSES)
    assert len(counts) == phantoms3d.NUM_CLASSES and counts[1] > 0 and counts[2] > 0   # >= 2 structures
    none = phantoms.FINDINGS[r["finding"]] == "none"
    assert (counts[phantoms3d.LESION] == 0) == none and ("no focal finding" in r["caption"]) == none
    np.testing.assert_allclose(r["spacing"] * 24, phantoms3d.FOV_MM[name])
    seen.add((name, int(r["finding"])))
  assert {m for m, _ in seen} == {"ct", "mri"} and len({f for _, f in seen}) == len(phantoms.FINDINGS)


def test_ct_is_in_hounsfield_units_and_mri_is_nonnegative(records):
  for r in records:
    img, lab = r["image"][..., 0], r["label_map"]
    if phantoms.MODALITIES[r["modality"]] == "ct":
      assert abs(np.median(img[0, :3, :3]) - phantoms3d.AIR_HU) < 60       # air in the corner
      assert 20 < np.median(img[lab == 1]) < 110                            # liver: soft tissue
      assert img.max() > 300                                                # bone
    else:
      assert img.min() >= 0 and np.median(img[lab == 1]) > 3 * np.median(img[0, :3, :3]) + 1


def test_lesions_are_visible_against_their_surroundings(records):
  """The lesion label marks voxels whose intensity differs from the tissue right around them."""
  contrasts = []
  for r in records:
    lesion = r["label_map"] == phantoms3d.LESION
    if lesion.sum() < 4 or phantoms.FINDINGS[r["finding"]] == "ring_enhancing":
      continue
    img = r["image"][..., 0]
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
    noise = np.std(np.diff(img[r["label_map"] == 1]))
    contrasts.append(abs(img[lesion].mean() - img[shell].mean()) / noise)
  assert len(contrasts) >= 10 and np.median(contrasts) > 1.0, contrasts


def test_anisotropic_shape_and_bad_size():
  r = VolumePhantomSource("train", (12, 24, 20))[0]
  assert r["image"].shape == (12, 24, 20, 1) and r["label_map"].shape == (12, 24, 20)
  with pytest.raises(ValueError, match=">= 8"):
    VolumePhantomSource("train", 4)
  with pytest.raises(ValueError, match="no volume"):
    phantoms3d.render_volume(phantoms.MODALITIES.index("cxr"), 0, 0, 16)
