"""Volume sources on files other writers made: NIfTI by nibabel and by SimpleITK, DICOM series by
pydicom (shuffled files, sagittal orientation); canonical LPS frame, spacing, labels, bad files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from medfm_jax.data import image_files, phantoms3d, pipeline, volume_sources, volumes
from medfm_jax.data.decode import DataError
from tests import helpers

nibabel = pytest.importorskip("nibabel")   # the 'volume' extra (in 'test')

# Canonical (z, y, x) = (S, P, L) test volume: a 12x10x8 CT phantom (HU) and its label map.
_REC = phantoms3d.VolumePhantomSource("val", (12, 10, 8))[1]
VOL = np.rint(_REC["image"][..., 0]).astype(np.int16)
LAB = _REC["label_map"]
SPACING = (2.5, 0.8, 0.7)   # z, y, x mm


def _ras_affine_of_canonical():
  """RAS affine of :func:`_nifti_array`: i -> R, j -> A, k -> S at the test spacing."""
  sz, sy, sx = SPACING
  return np.diag([sx, sy, sz, 1.0])


def _nifti_array():
  """VOL as NIfTI's usual RAS storage ``data[i, j, k]``: i toward the patient's right (canonical x,
  toward the left, reversed), j anterior (canonical y reversed), k superior."""
  return VOL.transpose(2, 1, 0)[::-1, ::-1, :]


def _write_nibabel(path, data):
  nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(data), _ras_affine_of_canonical()), str(path))


def test_nifti_from_nibabel_lands_in_the_canonical_frame(tmp_path):
  path = tmp_path / "ct.nii.gz"
  _write_nibabel(path, _nifti_array())
  out = volume_sources.load_volume(volume_sources.VolumeEntry(str(path)))
  np.testing.assert_array_equal(out["image"][..., 0], VOL)
  np.testing.assert_allclose(out["spacing"], SPACING, rtol=1e-6)


def test_nifti_from_simpleitk_with_a_permuted_axis_order(tmp_path):
  sitk = pytest.importorskip("SimpleITK")   # the 'parity' extra: another NIfTI writer
  # SimpleITK arrays are [z, y, x] for image index (x, y, z); its direction is in LPS. Store the
  # volume with image x running posterior (canonical y), image y running superior (z), image z
  # running left (x): a permuted, non-axial acquisition.
  arr = VOL.transpose(2, 0, 1)                      # sitk [k, j, i] = VOL[z=j, y=i, x=k]
  img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
  img.SetSpacing((SPACING[1], SPACING[0], SPACING[2]))
  img.SetDirection((0, 0, 1,   1, 0, 0,   0, 1, 0))  # columns: i -> +P(y), j -> +S(z), k -> +L(x)
  img.SetOrigin((10.0, -5.0, 3.0))
  path = str(tmp_path / "sitk.nii")
  sitk.WriteImage(img, path)
  out = volume_sources.load_volume(volume_sources.VolumeEntry(path))
  np.testing.assert_array_equal(out["image"][..., 0], VOL)
  np.testing.assert_allclose(out["spacing"], SPACING, rtol=1e-5)


def _write_series(folder, volume, *, shuffle_seed=0, sagittal=True, slope=1.0, intercept=0.0,
                  thickness="9.9"):
  """A pydicom-written series of ``volume`` (canonical z, y, x). Sagittal: one file per x
  (normal +L), rows running inferior (-z), columns running posterior (+y); files in a shuffled
  order with unrelated names; SliceThickness deliberately wrong."""
  from pydicom.uid import generate_uid  # the 'dicom' extra; pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  series, study = generate_uid(), generate_uid()
  sz, sy, sx = SPACING
  order = np.random.default_rng(shuffle_seed).permutation(volume.shape[2])
  for n, x in enumerate(order):
    stored = np.rint((volume[::-1, :, x] - intercept) / slope).astype(np.int16)   # rows: -z
    ds = image_files.dicom_dataset(stored, slope=slope, intercept=intercept, patient_id="P7")
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]       # row dir +P, column dir -S
    ds.ImagePositionPatient = [float(x * sx), 0.0, float((volume.shape[0] - 1) * sz)]
    ds.PixelSpacing = [f"{sz:g}", f"{sy:g}"]                # between rows (z), between columns (y)
    ds.SliceThickness = thickness
    image_files._save_dicom(str(folder / f"img{n:03d}"), ds)  # pylint: disable=protected-access
  return series


def test_dicom_series_sorted_by_position_with_spacing_from_geometry(tmp_path):
  uid = _write_series(tmp_path / "s", VOL, slope=2.0, intercept=-1024.0)
  entries = volume_sources.read_volume_manifest(_manifest(tmp_path, [{"path": "s", "modality": ""}]))
  assert [(e.series_uid, e.patient_id, e.modality) for e in entries] == [(uid, "P7", "CT")]
  out = volume_sources.load_volume(entries[0])
  np.testing.assert_allclose(out["image"][..., 0], np.rint((VOL + 1024) / 2) * 2 - 1024)
  np.testing.assert_allclose(out["spacing"], SPACING, rtol=1e-6)      # not SliceThickness 9.9


def test_dicom_uneven_slices_are_one_line_errors(tmp_path):
  _write_series(tmp_path / "s", VOL)
  import pydicom  # the 'dicom' extra; pylint: disable=g-import-not-at-top
  victim = sorted(os.listdir(tmp_path / "s"))[0]
  ds = pydicom.dcmread(tmp_path / "s" / victim)
  ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 0.3, 0.0, float(ds.ImagePositionPatient[2])]
  ds.save_as(tmp_path / "s" / victim)
  entry = volume_sources.read_volume_manifest(_manifest(tmp_path, [{"path": "s"}]))[0]
  with pytest.raises(DataError, match="not evenly spaced") as e:
    volume_sources.load_volume(entry)
  assert "\n" not in str(e.value) and str(tmp_path / "s") in str(e.value)


def _manifest(root, rows, name="m.jsonl"):
  path = root / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _volume_cfg(path, **kw):
  c = common.base_config().data
  c.source, c.path, c.channels, c.image_size = "manifest", str(path), 1, 8
  c.volume = {"size": (8, 8, 8), "labels": True, "spacing": (2.5, 1.6, 1.4), "foreground_prob": 1.0}
  return helpers.override(c, kw)


def test_manifest_with_label_maps_resampling_and_on_error(tmp_path):
  _write_nibabel(tmp_path / "a.nii.gz", _nifti_array())
  _write_nibabel(tmp_path / "a_seg.nii.gz", LAB.astype(np.uint8).transpose(2, 1, 0)[::-1, ::-1, :])
  (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8bnot gzip at all")
  manifest = _manifest(tmp_path, [
      {"path": "a.nii.gz", "label_map": "a_seg.nii.gz", "modality": "CT", "split": "train", "label": "x"},
      {"path": "bad.nii.gz", "modality": "CT", "split": "train", "label": "x"}])
  src = pipeline.make_source(_volume_cfg(manifest), "train")
  r = src[0]
  # Resampled to (2.5, 1.6, 1.4) mm: 12 x 5 x 4 voxels; labels nearest (values stay labels).
  assert r["image"].shape == (12, 5, 4, 1) and r["label_map"].shape == (12, 5, 4)
  np.testing.assert_allclose(r["spacing"], (2.5, 1.6, 1.4))
  # Nearest: output voxel (z, i, j) is centred between source voxels 2i, 2i+1 and 2j, 2j+1.
  candidates = np.stack([LAB[:, a::2, b::2][:, :5, :4] for a in (0, 1) for b in (0, 1)])
  assert (candidates == r["label_map"][None]).any(0).all()
  # Linear for images: between the min and max of the 2x2 source neighbourhood.
  img = _nifti_array()[::-1, ::-1, :].transpose(2, 1, 0).astype(np.float32)
  around = np.stack([img[:, a::2, b::2][:, :5, :4] for a in (0, 1) for b in (0, 1)])
  assert (r["image"][..., 0] >= around.min(0) - 1e-3).all() and (r["image"][..., 0] <= around.max(0) + 1e-3).all()
  with pytest.raises(DataError, match=r"bad.nii.gz: cannot read NIfTI") as e:
    src[1]
  assert "\n" not in str(e.value)
  skip_log = tmp_path / "skipped.txt"
  skipping = pipeline.make_source(_volume_cfg(manifest, on_error="skip"), "train", skip_log=str(skip_log))
  assert int(skipping[1]["skipped"]) == 1 and "bad.nii.gz" in skip_log.read_text()
  # A train batch: normalised CT crops with their label maps, from the grain pipeline.
  batch = next(pipeline.make_train_iterator(_volume_cfg(manifest, on_error="skip"), 2, seed=0))
  assert batch["image"].shape == (2, 8, 8, 8, 1) and batch["label_map"].shape == (2, 8, 8, 8)
  assert (batch["label_map"] > 0).any(axis=(1, 2, 3)).all()           # foreground-centred crops


def test_folder_layout_nifti_and_dicom_series(tmp_path):
  os.makedirs(tmp_path / "normal")
  _write_nibabel(tmp_path / "normal" / "a.nii.gz", _nifti_array())
  _write_series(tmp_path / "tumour" / "case1", VOL)
  _write_series(tmp_path / "tumour" / "case2", VOL, shuffle_seed=1)
  entries, classes = volume_sources.list_volume_folder(str(tmp_path))
  assert classes == ["normal", "tumour"]
  assert [(e.label, bool(e.series_uid)) for e in entries] == [("normal", False), ("tumour", True), ("tumour", True)]
  src = volume_sources.VolumeFileSource(entries, classes)
  for i in range(3):
    np.testing.assert_array_equal(src[i]["image"][..., 0], VOL)
    assert int(src[i]["label"]) == (0 if i == 0 else 1)


@pytest.mark.slow
def test_build_volume_mode_writes_array_record_the_tfds_source_reads(tmp_path):
  """``python -m medfm_jax.data.build --volume`` on a manifest (a NIfTI with a label map, a DICOM
  series, a bad file skipped) -> array_record read back by data.source='tfds' + data.volume."""
  _write_nibabel(tmp_path / "a.nii.gz", _nifti_array())
  _write_nibabel(tmp_path / "a_seg.nii.gz", LAB.astype(np.uint8).transpose(2, 1, 0)[::-1, ::-1, :])
  _write_series(tmp_path / "s", VOL)
  (tmp_path / "bad.nii").write_bytes(b"junk")
  manifest = _manifest(tmp_path, [
      {"path": "a.nii.gz", "label_map": "a_seg.nii.gz", "label": "x", "modality": "CT", "split": "train"},
      {"path": "s", "label": "y", "split": "train"},
      {"path": "bad.nii", "label": "y", "split": "train"}])
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  run = subprocess.run([sys.executable, "-m", "medfm_jax.data.build", "--volume", "--source=manifest",
                        f"--path={manifest}", f"--out={tmp_path / 'tfds'}", "--name=vol", "--on_error=skip"],
                       cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert '"skipped": 1' in run.stdout and '"train": 2' in run.stdout
  c = common.base_config().data
  c.source, c.name, c.data_dir, c.channels, c.image_size = "tfds", "vol:1.0.0", str(tmp_path / "tfds"), 1, 8
  c.volume = {"size": 8, "labels": False}
  src = pipeline.make_source(c, "train")
  records = [src[0], src[1]]
  assert [r["path"].endswith(p) for r, p in zip(records, ("a.nii.gz", "s"))] == [True, True]
  for r in records:
    np.testing.assert_array_equal(r["image"][..., 0], VOL)
    np.testing.assert_allclose(r["spacing"], SPACING, rtol=1e-5)
  np.testing.assert_array_equal(records[0]["label_map"], LAB)
  assert "label_map" not in records[1] and src.class_names == ("x", "y")
  assert next(pipeline.make_train_iterator(c, 2, seed=0))["image"].shape == (2, 8, 8, 8, 1)
