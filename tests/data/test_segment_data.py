"""Phantom masks, SAM prompts made in the input pipeline (data.segment)."""
import pathlib

import numpy as np
import pytest

from medfm_jax.data import phantoms, pipeline, prompts, sources
from medfm_jax.data import spec as spec_lib


def test_masks_are_where_the_lesions_are():
  for modality in range(len(phantoms.MODALITIES)):
    seed = (0, 0, modality)
    plain, _ = phantoms.render_phantom(modality, 0, seed, 64, 1)
    img, _, m = phantoms.render_phantom(modality, 1, seed, 64, 1, with_masks=True)
    _, _, none = phantoms.render_phantom(modality, 0, seed, 64, 1, with_masks=True)
    assert m["masks"].shape == (64, 64, len(phantoms.MASK_CLASSES)) and m["masks"].dtype == np.uint8
    lesion = m["masks"][..., 0] > 0
    assert lesion.sum() > 10 and not none["masks"][..., 0].any() and not none["lesion_ids"].any()
    # Same seed: same anatomy and noise, so the lesion changes the pixels inside its mask only.
    diff = np.abs(img.astype(np.float32) - plain.astype(np.float32))[..., 0]
    assert diff[lesion].mean() > 10 * (diff[~lesion].mean() + 0.1), phantoms.MODALITIES[modality]
    for k in (1, 2):   # body and organ are present, the organ inside the image
      assert 0 < m["masks"][..., k].mean() < 1, (phantoms.MODALITIES[modality], phantoms.MASK_CLASSES[k])


def test_multiple_lesions_are_instances():
  _, _, m = phantoms.render_phantom(0, phantoms.FINDINGS.index("multiple_lesions"), (0, 0, 3), 96, 1,
                                    with_masks=True)
  ids = set(np.unique(m["lesion_ids"])) - {0}
  assert len(ids) >= 3 and ((m["lesion_ids"] > 0) == (m["masks"][..., 0] > 0)).all()


def test_box_and_points():
  mask = np.zeros((40, 50), np.uint8)
  mask[10:20, 5:15] = 1
  rng = np.random.default_rng(0)
  boxes = np.stack([prompts.box_from_mask(mask, rng, 3) for _ in range(200)])
  np.testing.assert_array_equal(boxes.min(0), [2, 7, 14, 19])     # pushed out by 0..3 px
  np.testing.assert_array_equal(boxes.max(0), [5, 10, 17, 22])
  pts, labels = prompts.sample_points(mask, rng, 30, 20)
  xy = pts.astype(int)
  assert (mask[xy[:, 1], xy[:, 0]] == (labels == 1)).all() and labels.tolist() == [1] * 30 + [0] * 20
  with pytest.raises(ValueError, match="data.segment.classes"):
    prompts.PromptSpec.from_config({"classes": ("tumour",)})
  with pytest.raises(ValueError, match="unknown fields"):
    prompts.PromptSpec.from_config({"points": 2})


def test_pipeline_batches_carry_targets_and_prompts():
  data = dict(source="phantoms", image_size=32, channels=1, flip=True,
              segment=dict(classes=("lesion", "organ"), num_points=2, num_neg_points=1))
  spec = spec_lib.resolve(data)
  batch = next(pipeline.make_train_iterator(spec, 8, seed=0))
  abstract = spec.abstract_batch(8)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in abstract.items()}
  for i in range(8):
    t = batch["target"][i]
    ys, xs = np.nonzero(t)
    x0, y0, x1, y1 = batch["box"][i]
    assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
    inside = t[batch["points"][i, :, 1].astype(int), batch["points"][i, :, 0].astype(int)]
    np.testing.assert_array_equal(inside, [1, 1, 0])
  evals = list(pipeline.make_eval_batches(spec, "val", 8, 10))
  assert len(evals) == 2 and not evals[1]["mask"][2:].any() and not evals[1]["target"][2:].any()


def test_train_examples_restricts_the_train_split():
  data = dict(source="phantoms", image_size=16, channels=1, flip=False, segment=dict(train_examples=3))
  spec = spec_lib.resolve(data)
  train, full = pipeline.make_source(spec, "train"), pipeline.make_source(spec_lib.resolve(
      dict(data, segment={})), "train")
  assert len(train) == 3 and len(pipeline.make_source(spec, "val")) == phantoms.SPLIT_SIZES["val"]
  np.testing.assert_array_equal(train[2]["image"], full[2]["image"])
  batch = next(pipeline.make_train_iterator(spec, 12, seed=0))      # 4 epochs of the 3 images
  assert len({x.tobytes() for x in batch["image"]}) == 3
  with pytest.raises(ValueError, match="data.segment.train_examples=-1: must be >= 0"):
    spec_lib.resolve(dict(data, segment=dict(train_examples=-1)))
  with pytest.raises(ValueError, match="data.segment.train_examples=2001: must be <= 2000"):
    pipeline.make_source(spec_lib.resolve(dict(data, train_split="val", segment=dict(train_examples=2001))), "val")


def test_manifest_mask_column(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rows = ["path,label,mask"]
  for i in range(4):
    img = np.full((40, 60), 30, np.uint8)
    ids = np.zeros((40, 60), np.uint8)
    ids[10:20, 25 + i:35 + i] = 1          # object 1 (bright in the image)
    ids[25:30, 40:50] = 2                  # object 2
    img[ids > 0] = 220
    Image.fromarray(img).save(tmp_path / f"im{i}.png")
    Image.fromarray(ids).save(tmp_path / f"m{i}.png")
    rows.append(f"im{i}.png,a,m{i}.png")
  (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
  data = dict(source="manifest", path=str(tmp_path / "data.csv"), image_size=32, channels=1, flip=False,
              splits="train:1.0", segment=dict(classes=("lesion",), jitter=0.0))
  batch = next(pipeline.make_train_iterator(spec_lib.resolve(data), 4, seed=0))
  for i in range(4):   # the target is one object, and the (resampled) image is bright there
    t, img = batch["target"][i] > 0, batch["image"][i, ..., 0]
    mid = (img.max() + img.min()) / 2
    assert t.sum() > 5 and (img[t] > mid).mean() > 0.8 and (img[~t] > mid).mean() < 0.2
    ys, xs = np.nonzero(t)
    np.testing.assert_array_equal(batch["box"][i], [xs.min(), ys.min(), xs.max(), ys.max()])


def _seg_source_dicom(path, pixels):
  """A CT image with the attributes a DICOM SEG writer needs of its source (patient, study, frame
  of reference, plane geometry)."""
  import pydicom  # pylint: disable=import-outside-toplevel
  from medfm_jax.data import image_files  # pylint: disable=import-outside-toplevel
  ds = pydicom.dcmread(image_files.write_dicom(str(path), pixels))
  for k, v in dict(PatientName="Phantom^A", PatientID="p1", PatientBirthDate="", PatientSex="O",
                   StudyDate="20260101", StudyTime="000000", ReferringPhysicianName="", StudyID="1",
                   AccessionNumber="", SeriesNumber=1, InstanceNumber=1,
                   FrameOfReferenceUID=pydicom.uid.generate_uid(), PixelSpacing=[1, 1],
                   ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, 0],
                   SliceThickness=1).items():
    if k not in ds:
      setattr(ds, k, v)
  ds.save_as(path)
  return ds


def _highdicom_seg(path, source, ids):
  """``ids`` (segment k = label k) as a BINARY DICOM SEG written by highdicom (another writer)."""
  import highdicom as hd  # the 'parity' extra  pylint: disable=import-outside-toplevel
  from pydicom.sr.codedict import codes  # pylint: disable=import-outside-toplevel
  desc = [hd.seg.SegmentDescription(segment_number=k, segment_label=f"object {k}",
                                    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                    segmented_property_type=codes.SCT.Lesion,
                                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
          for k in range(1, int(ids.max()) + 1)]
  hd.seg.Segmentation(source_images=[source], pixel_array=ids, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                      segment_descriptions=desc, series_instance_uid=hd.UID(), series_number=2,
                      sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
                      manufacturer_model_name="test", software_versions="0",
                      device_serial_number="0").save_as(path)


def test_folder_masks_png_and_dicom_seg(tmp_path):
  """Folder layout: <stem>_mask.png / <stem>_mask.dcm beside the image; a DICOM SEG from highdicom
  reads back as its label map; masked examples become targets."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path / "root" / "a"
  root.mkdir(parents=True)
  ids = np.zeros((40, 60), np.uint8)
  ids[10:20, 25:35] = 1
  ids[25:30, 40:50] = 2
  img = np.where(ids > 0, 220, 30).astype(np.uint8)
  Image.fromarray(img).save(root / "im0.png")
  Image.fromarray(ids).save(root / "im0_mask.png")
  source = _seg_source_dicom(root / "im1.dcm", np.where(ids > 0, 1000, 0).astype(np.int16))
  _highdicom_seg(root / "im1_mask.dcm", source, ids)
  np.testing.assert_array_equal(sources.read_mask(str(root / "im1_mask.dcm"), (40, 60))["lesion_ids"], ids)
  Image.fromarray(img).save(tmp_path / "other_mask.png")
  with pytest.raises(sources.DataError, match="must be a Segmentation"):
    sources.read_mask(str(root / "im1.dcm"), (40, 60))

  entries, _ = sources.list_folder(str(tmp_path / "root"))
  assert [(pathlib.Path(e.path).name, pathlib.Path(e.mask).name) for e in entries] == [
      ("im0.png", "im0_mask.png"), ("im1.dcm", "im1_mask.dcm")]
  Image.fromarray(img).save(root / "lonely_mask.png")      # no image 'lonely': an image itself
  Image.fromarray(img).save(root / "im2.png")              # an image without a mask
  entries, _ = sources.list_folder(str(tmp_path / "root"))
  assert {pathlib.Path(e.path).name: e.mask for e in entries}.keys() == {"im0.png", "im1.dcm", "im2.png",
                                                                         "lonely_mask.png"}
  assert not [e for e in entries if pathlib.Path(e.path).name in ("im2.png", "lonely_mask.png") and e.mask]

  (root / "lonely_mask.png").unlink()
  (root / "im2.png").unlink()
  data = dict(source="folder", path=str(tmp_path / "root"), image_size=32, channels=1, flip=False,
              splits="train:1.0", window="minmax", segment=dict(classes=("lesion",), jitter=0.0))
  batch = next(pipeline.make_train_iterator(spec_lib.resolve(data), 4, seed=0))
  for i in range(4):
    t, im = batch["target"][i] > 0, batch["image"][i, ..., 0]
    mid = (im.max() + im.min()) / 2
    assert t.sum() > 5 and (im[t] > mid).mean() > 0.8 and (im[~t] > mid).mean() < 0.2
