"""Folder and manifest sources on real files the tests write: labels, frames, splits, bad data."""
import json
import os
import pathlib

import numpy as np
import pydicom.data
import pytest
from pydicom import uid as uids

from configs import common
from medfm_jax.data import decode, image_files, pipeline, sources
from tests import helpers

RNG = np.random.default_rng(1)


def _png(path, value=None, size=(16, 16)):
  img = RNG.integers(0, 256, size, dtype=np.uint8) if value is None else np.full(size, value, np.uint8)
  image_files.write_image(str(path), img)
  return img


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """ROOT/<class>/...: 2 PNGs in 'b_nodule', a PNG + a 3-frame DICOM (patient P1) in 'a_normal'."""
  root = tmp_path_factory.mktemp("tree")
  imgs = {"b_nodule/x.png": _png(root / "b_nodule" / "x.png"),
          "b_nodule/sub/y.png": _png(root / "b_nodule" / "sub" / "y.png"),
          "a_normal/z.png": _png(root / "a_normal" / "z.png")}
  frames = RNG.integers(0, 4096, (3, 16, 16)).astype(np.uint16)
  image_files.write_dicom(str(root / "a_normal" / "mf.dcm"), frames, patient_id="P1", modality="MR")
  (root / "a_normal" / "notes.txt").write_text("not an image")
  (root / "a_normal" / ".hidden.png").write_bytes(b"")
  return root, imgs, frames


def _cfg(**kw):
  c = common.base_config().data
  c.image_size, c.channels = 16, 1
  return helpers.override(c, kw)


def test_folder_source_labels_frames_and_records(tree):
  root, imgs, frames = tree
  entries, classes = sources.list_folder(str(root))
  assert classes == ["a_normal", "b_nodule"]
  names = [(os.path.relpath(e.path, root), e.frame) for e in entries]
  assert names == [("a_normal/mf.dcm", 0), ("a_normal/mf.dcm", 1), ("a_normal/mf.dcm", 2),
                   ("a_normal/z.png", 0), ("b_nodule/sub/y.png", 0), ("b_nodule/x.png", 0)]
  assert [e.patient_id for e in entries[:3]] == ["P1"] * 3
  src = sources.FileSource(entries, classes, decode.Preprocess(channels=3))   # auto: PNG as is, DICOM min-max
  assert src.class_names == ("a_normal", "b_nodule") and src.modality_names == ("MR",)
  for i, e in enumerate(entries):
    r = src[i]
    assert set(r) >= {"image", "label", "finding", "modality", "caption", "index"}
    assert r["image"].dtype == np.uint8 and r["image"].shape == (16, 16, 3)
    assert r["label"] == r["finding"] == classes.index(e.label) and r["frame"] == e.frame
    if e.frame or e.path.endswith(".dcm"):
      f = frames[e.frame].astype(np.float64)
      expected = np.rint((f - f.min()) / (f.max() - f.min()) * 255)
      np.testing.assert_array_equal(r["image"][..., 0], expected)
    else:
      np.testing.assert_array_equal(r["image"][..., 1], imgs[os.path.relpath(e.path, root)])


def test_make_source_folder_with_split_dirs_and_errors(tmp_path):
  for split, n in (("train", 3), ("val", 2)):
    for i in range(n):
      _png(tmp_path / split / ("cat" if i % 2 else "dog") / f"{i}.png")
  _png(tmp_path / "val" / "emu" / "e.png")
  cfg = _cfg(source="folder", path=str(tmp_path))
  train, val = pipeline.make_source(cfg, "train"), pipeline.make_source(cfg, "val")
  assert (len(train), len(val)) == (3, 3)
  assert train.class_names == val.class_names == ("cat", "dog", "emu")
  assert [int(val[i]["label"]) for i in range(3)] == [0, 1, 2]  # cat/1, dog/0, emu/e (sorted)
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.make_source(cfg, "test")
  with pytest.raises(ValueError, match="data.path"):
    pipeline.make_source(_cfg(source="folder", path=str(tmp_path / "missing")), "train")


def test_assign_splits_patient_level_deterministic():
  groups = [f"p{g}" for g in RNG.integers(0, 40, 400)]
  fr = sources.parse_splits("train:0.7,val:0.2,test:0.1")
  a = sources.assign_splits(groups, fr, seed=3)
  assert a == sources.assign_splits(groups, fr, seed=3)
  assert a != sources.assign_splits(groups, fr, seed=4)
  by_patient = {}
  for g, s in zip(groups, a, strict=True):
    by_patient.setdefault(g, set()).add(s)
  assert all(len(v) == 1 for v in by_patient.values())            # no patient in two splits
  counts = {s: a.count(s) for s in fr}
  assert sum(counts.values()) == 400 and all(counts[s] > 0 for s in fr)
  assert abs(counts["train"] / 400 - 0.7) < 0.1
  order = RNG.permutation(400)                                     # listing order does not matter
  b = sources.assign_splits([groups[i] for i in order], fr, seed=3)
  assert b == [a[i] for i in order]
  for bad in ("train:0.5,val:0.4", "train", "train:1,val:0"):
    with pytest.raises(ValueError, match="data.splits"):
      sources.parse_splits(bad)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_patient_split_and_captions(tmp_path, fmt):
  rows = []
  for i in range(30):
    _png(tmp_path / "img" / f"{i}.png", value=i)
    rows.append({"path": f"img/{i}.png", "label": ["cxr_normal", "cxr_effusion"][i % 2],
                 "caption": f"report {i}", "patient_id": f"pat{i // 3}"})
  path = tmp_path / f"m.{fmt}"
  if fmt == "csv":
    path.write_text("path,label,caption,patient_id\n" + "".join(
        f"{r['path']},{r['label']},{r['caption']},{r['patient_id']}\n" for r in rows))
  else:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _cfg(source="manifest", path=str(path), splits="train:0.6,val:0.4")
  splits = {s: pipeline.make_source(cfg, s) for s in ("train", "val")}
  seen = {s: {src[i]["patient_id"] for i in range(len(src))} for s, src in splits.items()}
  assert not seen["train"] & seen["val"] and len(seen["train"] | seen["val"]) == 10
  assert len(splits["train"]) + len(splits["val"]) == 30
  r = splits["val"][0]
  i = int(r["image"][0, 0, 0])
  assert r["caption"] == f"report {i}" and r["patient_id"] == f"pat{i // 3}"
  assert splits["val"].class_names[int(r["label"])] == rows[i]["label"]
  (tmp_path / "partial.csv").write_text("path,label\nimg/0.png,x\nimg/1.png,\n")
  partial = pipeline.make_source(_cfg(source="manifest", path=str(tmp_path / "partial.csv"),
                                      splits="train:1"), "train")
  assert partial.class_names == ("x",) and [int(partial[i]["label"]) for i in range(2)] == [0, -1]
  (tmp_path / "bad.csv").write_text("path,labels\nimg/0.png,x\n")
  with pytest.raises(ValueError, match=r"unknown column.*labels"):
    sources.read_manifest(str(tmp_path / "bad.csv"))


def _bad_file(folder, kind):
  """Writes one bad file of ``kind``; returns its path."""
  good = (folder / "ok.png").read_bytes()
  if kind == "corrupt":
    data = bytearray(good)
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = bytes(40)
    path = folder / "corrupt.png"
    path.write_bytes(bytes(data))
  elif kind == "truncated":
    path = folder / "truncated.png"
    path.write_bytes(good[:len(good) // 2])
  elif kind == "zero_byte":
    path = folder / "empty.png"
    path.write_bytes(b"")
  elif kind == "wrong_extension":
    path = folder / "really_png.jpg"
    path.write_bytes(good)
  elif kind == "not_an_image":
    path = folder / "notes.txt"
    path.write_text("hello")
  elif kind == "unsupported_syntax":
    path = folder / "video.dcm"
    image_files.write_dicom_encapsulated(str(path), [b"\0" * 64], uids.MPEG4HP41, 16, 16)
  elif kind == "malformed_value":   # RescaleIntercept (DS) '-10x4': pydicom raises ValueError
    path = folder / "malformed.dcm"
    image_files.write_dicom(str(path), np.zeros((16, 16), np.int16), intercept=-1024.0)
    path.write_bytes(path.read_bytes().replace(b"DS\x06\x00-1024 ", b"DS\x06\x00-10x4 ", 1))
  return str(path)


BAD_KINDS = {"corrupt": "cannot decode image", "truncated": "cannot decode image",
             "zero_byte": "empty file", "wrong_extension": "content is PNG but the extension",
             "not_an_image": "unsupported file extension", "unsupported_syntax": "MPEG-4",
             "malformed_value": "could not convert string to float: '-10x4'"}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bad")
  goods = [_png(folder / "ok.png", value=7), _png(folder / "ok2.png", value=9)]
  paths = {k: _bad_file(folder, k) for k in BAD_KINDS}
  return folder, goods, paths


def _manifest(folder, paths, name):
  path = folder / f"{name}.csv"
  path.write_text("path,label\n" + "".join(f"{p},x\n" for p in paths))
  return str(path)


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_file_raise_is_one_line_with_path(bad_folder, kind):
  folder, _, paths = bad_folder
  cfg = _cfg(source="manifest", path=_manifest(folder, [folder / "ok.png", paths[kind]], kind),
             splits="train:1")
  src = pipeline.make_source(cfg, "train")
  assert src[0]["image"][0, 0, 0] == 7
  with pytest.raises(pipeline.DataError) as e:
    src[1]
  msg = str(e.value)
  assert msg.startswith(paths[kind] + ": ") and BAD_KINDS[kind] in msg and "\n" not in msg


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_file_skip_takes_next_counts_and_logs(bad_folder, tmp_path, kind):
  folder, _, paths = bad_folder
  log = str(tmp_path / "skipped_files.txt")
  manifest = _manifest(folder, [folder / "ok.png", paths[kind], folder / "ok2.png"], kind + "_s")
  src = pipeline.make_source(_cfg(source="manifest", path=manifest, splits="train:1",
                                  on_error="skip"), "train", skip_log=log)
  r0, r1, r2 = src[0], src[1], src[2]
  assert (r0["skipped"], r1["skipped"], r2["skipped"]) == (0, 1, 0)
  assert r1["image"][0, 0, 0] == r2["image"][0, 0, 0] == 9      # deterministic: the next index
  lines = open(log).read().splitlines()
  assert len(lines) == 1 and lines[0].startswith(paths[kind] + "\t") and BAD_KINDS[kind] in lines[0]


def test_skip_counts_reach_the_train_batches(bad_folder):
  folder, _, paths = bad_folder
  manifest = _manifest(folder, [folder / "ok.png", paths["corrupt"], paths["zero_byte"],
                                folder / "ok2.png"], "batch")
  cfg = _cfg(source="manifest", path=manifest, splits="train:1", on_error="skip")
  it = pipeline.make_train_iterator(cfg, 4, seed=0)
  batches = helpers.take(it, 3)
  # Each epoch (one batch) draws both bad files once: corrupt -> zero_byte -> ok2 skips 2, zero_byte 1.
  assert [pipeline.pop_skipped(b) for b in batches] == [3, 3, 3]
  assert all(set(b) == {"image", "modality", "finding"} for b in batches)
  with pytest.raises(ValueError, match="data.on_error"):
    pipeline.make_source(_cfg(source="manifest", path=manifest, on_error="ignore"), "train")


def test_bad_file_error_crosses_worker_processes_intact(bad_folder):
  folder, _, paths = bad_folder
  kind = "malformed_value"    # pydicom's ValueError, raised in the worker, arrives as a DataError
  manifest = _manifest(folder, [folder / "ok.png", paths[kind]], "workers")
  it = pipeline.make_train_iterator(_cfg(source="manifest", path=manifest, splits="train:1",
                                         num_workers=1), 2, seed=0)
  try:
    with pytest.raises(pipeline.DataError) as e:
      next(it)
  finally:
    it.close()
  assert str(e.value).startswith(f"{paths[kind]}: ") and BAD_KINDS[kind] in str(e.value)
  assert "\n" not in str(e.value)


def test_malformed_header_value_is_a_data_error_when_listing(tmp_path):
  """pydicom's badVR.dcm (dcmtk; NumberOfFrames, an IS, is '1A'): one line naming the file with
  on_error=raise, read and skipped with on_error=skip."""
  bad = tmp_path / "bad.dcm"
  bad.write_bytes((pathlib.Path(pydicom.data.__file__).parent / "test_files" / "badVR.dcm").read_bytes())
  _png(tmp_path / "ok.png", value=5)
  manifest = _manifest(tmp_path, [bad, tmp_path / "ok.png"], "m")
  with pytest.raises(pipeline.DataError) as e:
    pipeline.make_source(_cfg(source="manifest", path=manifest, splits="train:1"), "train")
  assert str(e.value).startswith(f"{bad}: ") and "'1A'" in str(e.value) and "\n" not in str(e.value)
  log = str(tmp_path / "skipped_files.txt")
  src = pipeline.make_source(_cfg(source="manifest", path=manifest, splits="train:1",
                                  on_error="skip"), "train", skip_log=log)
  assert src[0]["skipped"] == 1 and src[0]["image"][0, 0, 0] == 5
  assert open(log).read().startswith(f"{bad}\t")


@pytest.mark.parametrize("field,value,match", [
    ("source", "dicomweb", "data.source='dicomweb': allowed phantoms, folder, manifest, tfds"),
    ("path", "/nonexistent", "data.path='/nonexistent': data.source='folder' needs an existing directory"),
    ("window", "lungs", "data.window='lungs'"),
    ("on_error", "ignore", "data.on_error='ignore': allowed raise, skip"),
    ("resize", "stretch", "data.resize='stretch'"),
    ("splits", "train:0.5", "data.splits='train:0.5'")])
def test_config_validation_of_real_data_fields(tmp_path, field, value, match):
  from medfm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_mae_config(**{"data.source": "folder", "data.path": str(tmp_path)})
  config_lib.validate(config, num_devices=1)
  config.data[field] = value
  with pytest.raises(config_lib.ConfigError, match=match.replace("(", r"\(")) as e:
    config_lib.validate(config, num_devices=1)
  assert "\n" not in str(e.value)


def _train_on_manifest_cli(manifest, tmp_path):
  """``python -m medfm_jax.main`` (tiny MAE, 16 px, batch 4) on a manifest split into 'train' only."""
  return helpers.run_cli(["--config=configs/mae.py:tiny", f"--workdir={tmp_path / 'run'}",
                          "--config.data.source=manifest", f"--config.data.path={manifest}",
                          "--config.data.splits=train:1", "--config.batch_size=4",
                          "--config.data.image_size=16"])


@pytest.mark.slow
def test_cli_bad_file_exits_with_one_line(bad_folder, tmp_path):
  folder, _, paths = bad_folder
  manifest = _manifest(folder, [folder / "ok.png", paths["zero_byte"]] * 2, "cli")
  result = _train_on_manifest_cli(manifest, tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"medfm_jax: data error: {paths['zero_byte']}: empty file") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_missing_eval_split_exits_with_one_line(bad_folder, tmp_path):
  """A manifest split into 'train' only, with the default data.eval_split='val': one config-error
  line naming the path, the split and what is available, no traceback."""
  folder, _, _ = bad_folder
  manifest = _manifest(folder, [folder / "ok.png"] * 4, "only_train")
  result = _train_on_manifest_cli(manifest, tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("medfm_jax: config error: data.path=") and "no split 'val'" in last, last
  assert "available: train" in last and "Traceback" not in result.stderr
