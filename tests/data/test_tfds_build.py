"""The build CLI writes TFDS array_record datasets that TFDS and the tfds source read back without
TensorFlow; per-process sharding and exact resume (skip metrics of a training run: tests/train/test_url_workdir.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from medfm_jax.data import decode, image_files, pipeline
from tests import helpers

RNG = np.random.default_rng(2)


def _build(*args):
  env = dict(os.environ, PYTHONPATH=helpers.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-m", "medfm_jax.data.build", *args], cwd=helpers.REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """24 8-bit PNGs of 8 patients (manifest) -> 'mini' (8-bit), and 16-bit PNGs -> 'mini16'."""
  root = tmp_path_factory.mktemp("built")
  rows, images, images16 = [], {}, {}
  for i in range(24):
    img = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    img16 = RNG.integers(0, 65536, (12, 20), dtype=np.uint16)
    image_files.write_image(str(root / "png" / f"{i}.png"), img)
    image_files.write_image(str(root / "png16" / f"{i}.png"), img16)
    images[f"{i}.png"], images16[f"{i}.png"] = img, img16
    rows.append(f"{i}.png,{'ab'[i % 2]},caption {i},pat{i % 8}\n")
  for sub in ("png", "png16"):
    (root / sub / "m.csv").write_text("path,label,caption,patient_id\n" + "".join(rows))
  out = str(root / "tfds")
  for name, sub, extra in (("mini", "png", []), ("mini16", "png16", ["--bit_depth=16", "--window=full"])):
    r = _build("--source=manifest", f"--path={root / sub / 'm.csv'}", f"--out={out}",
               f"--name={name}", "--splits=train:0.5,val:0.25,test:0.25", "--split_seed=1", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
  return out, images, images16, r.stdout


def _cfg(data_dir, **kw):
  c = common.base_config().data
  c.image_size, c.channels, c.num_workers = 16, 1, 0
  c.source, c.name, c.data_dir = "tfds", "mini:1.0.0", data_dir
  return helpers.override(c, kw)


def test_tfds_reads_built_dataset_without_tensorflow(built):
  out, images, _, stdout = built
  assert "--config.data.mean=" in stdout
  sizes, patients = {}, {}
  for split in ("train", "val", "test"):
    ds = tfds.data_source("mini:1.0.0", split=split, data_dir=out)   # TFDS's own decoding
    sizes[split] = len(ds)
    patients[split] = set()
    for i in range(len(ds)):
      ex = ds[i]
      name = os.path.basename(ex["path"].decode())
      np.testing.assert_array_equal(ex["image"][..., 0], images[name])
      assert ex["caption"].decode() == f"caption {name[:-4]}"
      assert ex["label"] == int(name[:-4]) % 2 and ex["patient_id"].decode() == f"pat{int(name[:-4]) % 8}"
      patients[split].add(ex["patient_id"])
  assert sum(sizes.values()) == 24 and all(sizes.values())
  assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
              or patients["val"] & patients["test"])                  # patient-level splits
  builder = tfds.builder_from_directory(os.path.join(out, "mini", "1.0.0"))
  assert builder.info.features["label"].names == ["a", "b"]
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes
  assert "tensorflow" not in sys.modules


def test_tfds_source_uint16_and_records(built):
  out, images, images16, _ = built
  src = pipeline.make_source(_cfg(out, name="mini16:1.0.0", window="full"), "val")
  assert src.class_names == ("a", "b")
  raw = tfds.data_source("mini16:1.0.0", split="val", data_dir=out,
                         decoders={"image": tfds.decode.SkipDecoding()})
  for i in range(len(src)):
    name = os.path.basename(src[i]["path"])
    stored = decode.decode(raw[i]["image"], "x", check_extension=False).pixels[..., 0]
    np.testing.assert_array_equal(stored, images16[name])               # 16 bits kept exactly
    np.testing.assert_array_equal(src[i]["image"][..., 0],
                                  np.rint(images16[name] / 257.0).astype(np.uint8))
  r = pipeline.make_source(_cfg(out), "train")[0]
  assert r["image"].shape == (16, 16, 1) and r["caption"].startswith("caption ")
  with pytest.raises(ValueError, match="data.name='nope'"):
    pipeline.make_source(_cfg(out, name="nope"), "train")


def test_tfds_sharding_disjoint_covering_and_process_rows(built):
  out = built[0]
  src = pipeline.make_source(_cfg(out), "train")
  n = len(src)
  seen = [[pipeline.shard_stream(n, 0, p, 2)[j][1] for j in range(n // 2)] for p in range(2)]
  assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(n))
  helpers.assert_process_rows(lambda p, c: pipeline.make_train_iterator(
      _cfg(out), 4, seed=0, process_index=p, process_count=c, source=src), global_batch=4)


@pytest.mark.parametrize("source", ["tfds", "png_folder", "dicom_manifest"])
def test_resume_exact(built, tmp_path, source):
  out = built[0]
  if source == "tfds":
    cfg = _cfg(out)
  elif source == "png_folder":
    for i in range(10):
      image_files.write_image(str(tmp_path / "c" / f"{i}.png"), RNG.integers(0, 256, (20, 18), dtype=np.uint8))
    cfg = _cfg(out, source="folder", path=str(tmp_path), splits="train:1")
  else:
    image_files.export_phantoms(str(tmp_path / "d"), 10, 16, "dicom")
    rows = [f"{os.path.relpath(os.path.join(d, f), tmp_path)},{os.path.basename(d)}\n"
            for d, _, fs in os.walk(tmp_path / "d") for f in fs]
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(rows))
    cfg = _cfg(out, source="manifest", path=str(tmp_path / "m.csv"), splits="train:1",
               window="soft_tissue")
  helpers.assert_restore_reproduces(lambda: pipeline.make_train_iterator(cfg, 4, seed=0),
                                    skip=3, check=2)


@pytest.mark.slow
def test_tfds_source_in_worker_processes_resumes(built):
  cfg = _cfg(built[0], num_workers=1)
  it = pipeline.make_train_iterator(cfg, 4, seed=0)
  try:
    helpers.take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = helpers.take(it, 2)
  finally:
    it.close()
  fresh = pipeline.make_train_iterator(cfg, 4, seed=0)
  try:
    fresh.set_state(state)
    helpers.assert_batches_equal(helpers.take(fresh, 2), expected)
  finally:
    fresh.close()
  in_process = helpers.take(pipeline.make_train_iterator(_cfg(built[0]), 4, seed=0), 4)
  helpers.assert_batches_equal(in_process[2:], expected)


@pytest.mark.slow
def test_build_errors_are_one_line(tmp_path):
  (tmp_path / "m.csv").write_text("path,label\nmissing.png,a\n")
  r = _build("--source=manifest", f"--path={tmp_path / 'm.csv'}", f"--out={tmp_path}", "--name=x")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("medfm_jax.data.build: error: ")
  assert "missing.png: cannot read" in r.stderr


def test_build_phantoms_roundtrip(tmp_path):
  from medfm_jax.data import build, phantoms  # pylint: disable=g-import-not-at-top
  result = build.build("phantoms", str(tmp_path), "ph", num_examples="train:6,val:3", image_size=16)
  assert result["splits"] == {"train": 6, "val": 3} and len(result["stats"]["mean"]) == 1
  src = pipeline.make_source(_cfg(str(tmp_path), name="ph"), "val")
  ref = phantoms.PhantomSource("val", image_size=16, channels=1, num_examples=3)
  assert src.class_names == phantoms.FINDINGS and src.modality_names == phantoms.MODALITIES
  for i in range(3):
    got, want = src[i], ref[i]
    np.testing.assert_array_equal(got["image"], want["image"])
    assert (got["finding"], got["modality"], got["caption"]) == (want["finding"], want["modality"],
                                                                 want["caption"])


def test_build_masks_roundtrip(tmp_path):
  """A folder with <stem>_mask.png label maps -> a 'mask' feature -> tfds records with the masks,
  segmentation targets from them; a folder where only some images have masks is refused."""
  from medfm_jax.data import build  # pylint: disable=g-import-not-at-top
  ids = {}
  for i in range(4):
    m = np.zeros((16, 16), np.uint8)
    m[2 + i:8 + i, 3:9], m[10:14, 10:15] = 1, 2
    ids[f"{i}.png"] = m
    image_files.write_image(str(tmp_path / "data" / "c" / f"{i}.png"), np.where(m > 0, 200, 20).astype(np.uint8))
    image_files.write_image(str(tmp_path / "data" / "c" / f"{i}_mask.png"), m)
  build.build("folder", str(tmp_path / "out"), "seg", path=str(tmp_path / "data"), splits="train:1.0")
  cfg = _cfg(str(tmp_path / "out"), name="seg", splits="train:1.0")
  src = pipeline.make_source(cfg, "train")
  for i in range(4):
    r = src[i]
    np.testing.assert_array_equal(r["lesion_ids"], ids[os.path.basename(r["path"])])
    np.testing.assert_array_equal(r["masks"][..., 0], r["lesion_ids"] > 0)
  cfg.segment, cfg.flip = dict(classes=("lesion",), jitter=0.0), False
  batch = next(pipeline.make_train_iterator(cfg, 4, seed=0))
  assert all(0 < t.sum() < 40 for t in batch["target"])
  os.remove(tmp_path / "data" / "c" / "3_mask.png")
  with pytest.raises(ValueError, match="3 of 4 images have a mask"):
    build.build("folder", str(tmp_path / "out"), "seg2", path=str(tmp_path / "data"))


def test_build_shards_and_refuses_to_overwrite(tmp_path):
  from medfm_jax.data import build  # pylint: disable=g-import-not-at-top
  build.build("phantoms", str(tmp_path), "sh", num_examples="train:5", image_size=8, shard_size=2)
  files = sorted(f for f in os.listdir(tmp_path / "sh" / "1.0.0") if ".array_record" in f)
  assert files == [f"sh-train.array_record-0000{i}-of-00003" for i in range(3)]
  src = pipeline.make_source(_cfg(str(tmp_path), name="sh", image_size=8), "train")
  assert [src[i]["caption"] for i in range(5)] == [
      build.phantoms.PhantomSource("train", 8, 1, num_examples=5)[i]["caption"] for i in range(5)]
  with pytest.raises(ValueError, match="exists and is not empty"):
    build.build("phantoms", str(tmp_path), "sh", num_examples="train:5", image_size=8)


def test_bench_data_table_covers_every_source():
  from medfm_jax import bench  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_mae_config(**{"batch_size": 8})
  rows = bench.benchmark_data_sources(config, ["phantoms", "folder", "dicom", "tfds"], ["0"],
                                      num_examples=16, num_batches=2)
  assert [(r["source"], r["workers"]) for r in rows] == [
      ("phantoms", 0), ("folder", 0), ("dicom", 0), ("tfds", 0)]
  assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in rows)
  table = bench.data_table(rows).splitlines()
  assert len(table) == 6 and table[2].startswith("| phantoms | 0 | ")
