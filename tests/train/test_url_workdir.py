"""A bucket-URL workdir stays a URL: nothing a run writes may land under the cwd.

``os.path.abspath("gs://b/run")`` is ``./gs:/b/run``, so any output path that goes through
``os.path`` / ``open`` instead of etils.epath silently becomes a local folder. Here ``gs://`` is
served by a local folder, without network: epath's fsspec backend gets a local filesystem for the
``gs`` protocol, and orbax's TensorStore kvstore for ``gs://`` paths the ``file`` driver under
that folder. The tests train (checkpoints, meta, metrics.jsonl, TensorBoard, recon PNGs), resume,
evaluate from ``init_from=gs://...`` (restore, results, embeddings), write an attention PNG and
config.json, build the sweep report, read folder/manifest datasets and log skipped files, and run a
sweep stage (log, DONE, sweep.json), all with the cwd set to an empty folder that must stay empty.
"""
import concurrent.futures
import importlib
import json
import multiprocessing
import operator
import os
import sys

import fsspec
import numpy as np
import pytest
import tensorstore as ts
from etils.epath import backend as epath_backend
from fsspec.implementations import local
from orbax.checkpoint._src.path import gcs_utils

from medfm_jax import main, storage
from medfm_jax.data import decode, image_files, sources
from medfm_jax.evaluate import embed, protocols, results
from medfm_jax.metrics import attention_maps
from medfm_jax.train import restore
from medfm_jax.sweeps import report, runner, spec
from medfm_jax.train import checkpoint, loop
from tests import helpers

PNG = b"\x89PNG\r\n\x1a\n"


class _BucketFS(local.LocalFileSystem):
  """``gs://BUCKET/KEY`` -> ``ROOT/BUCKET/KEY`` on local disk (parent folders made on write)."""
  root = ""

  def __init__(self, *args, **kwargs):
    kwargs.pop("finalize_on_close", None)   # a gcsfs option epath passes
    super().__init__(*args, auto_mkdir=True, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    key = "/" + fsspec.utils.stringify_path(path).split("://", 1)[-1].lstrip("/")
    if key.startswith(cls.root + "/"):   # already mapped: a path this class handed out (ls, glob)
      return key.rstrip("/")
    return os.path.join(cls.root, key.lstrip("/")).rstrip("/")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local folder behind ``gs://`` for the duration of one test."""
  root = tmp_path / "bucket_store"
  root.mkdir()
  monkeypatch.setattr(_BucketFS, "root", str(root))
  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry, protocol, _BucketFS)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": _BucketFS._strip_protocol(path)})  # pylint: disable=protected-access
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  _BucketFS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield root
  _BucketFS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.mark.slow
def test_url_workdir_writes_only_to_the_bucket(bucket, tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  url, local_run = "gs://bkt/runs/mae", bucket / "bkt" / "runs" / "mae"
  config = helpers.tiny_mae_config(total_steps=2, eval_every=2, checkpoint_every=2, keep_checkpoints=5,
                                   async_checkpointing=False)
  main._save_config(config, url)  # pylint: disable=protected-access
  loop.train(config, url, helpers.single_device_mesh(config))
  config.total_steps = 3   # resumes from the bucket's step-2 checkpoint
  loop.train(config, url, helpers.single_device_mesh(config))

  assert checkpoint.Checkpointer(url).latest_step() == 3
  assert sorted(os.listdir(local_run / "checkpoints")) == ["2", "3"]
  assert checkpoint.read_meta(url)["config"]["objective"]["name"] == "mae"
  rows = [json.loads(line) for line in (local_run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert [r["step"] for r in rows if "compile_time_s" in r] == [0, 2]
  events = list((local_run / "tensorboard").iterdir())
  assert events and all(e.name.startswith("events.out.tfevents") and e.stat().st_size > 0 for e in events)
  assert (local_run / "recon" / "step_0000002.png").read_bytes().startswith(PNG)
  assert json.loads((local_run / "config.json").read_text())["total_steps"] == 2

  # Evaluation from init_from=URL into a URL workdir.
  eval_url = "gs://bkt/runs/knn"
  c = helpers.tiny_eval_config("knn", init_from=url, **{"data.eval_examples": 32,
                                                        "features.train_examples": 64})
  restore.adopt_architecture(c)
  out = protocols.run(c, eval_url)
  json_path, _ = results.write(eval_url, out)
  assert json_path == f"{eval_url}/results.json"
  assert json.loads((bucket / "bkt" / "runs" / "knn" / "results.json").read_text())["protocol"] == "knn"
  assert embed.export(c, eval_url, "test", 16) == f"{eval_url}/embeddings_test.npz"
  assert np.load(bucket / "bkt" / "runs" / "knn" / "embeddings_test.npz")["features"].shape[0] == 16

  attention_maps.write_attention_png(storage.path(url) / "attention" / "a.png", np.zeros((1, 8, 8, 1)),
                                     np.random.rand(1, 2, 2, 2), [0.5], [0.25])
  assert (local_run / "attention" / "a.png").read_bytes().startswith(PNG)
  md = report.build([url], ["loss"], "gs://bkt/report")
  assert md == "gs://bkt/report/report.md"
  assert (bucket / "bkt" / "report" / "loss_curves.png").read_bytes().startswith(PNG)

  assert sorted(os.listdir(cwd)) == []   # e.g. no ./gs:/bkt/runs/mae


def test_unsupported_url_scheme_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(storage.StorageError, match=r"'memory://x/run': URL scheme 'memory://' is not supported"):
    storage.path("memory://x/run")
  with pytest.raises(checkpoint.CheckpointError, match=r"init_from='file:///r'"):
    checkpoint.resolve_checkpoint_dir("file:///r")
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_data_inputs_from_a_bucket(bucket, tmp_path, monkeypatch):
  """Folder datasets, manifests (relative paths) and the export writers work on URLs too."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  image_files.export_phantoms("gs://bkt/data", 6, image_size=16)
  image_files.write_image("gs://bkt/data/.hidden/skip.png", np.zeros((4, 4), np.uint8))
  entries, classes = sources.list_folder("gs://bkt/data")
  assert len(entries) == 6 and all(e.path.startswith("gs://bkt/data/") for e in entries)
  assert classes == sorted({e.label for e in entries})
  assert decode.read_file(entries[0].path).startswith(PNG)
  rel = [e.path.removeprefix("gs://bkt/data/") for e in entries]
  storage.write_text("gs://bkt/data/manifest.csv", "path,label\n" + "".join(f"{p},x\n" for p in rel))
  assert [e.path for e in sources.read_manifest("gs://bkt/data/manifest.csv")] == [e.path for e in entries]
  assert sorted(os.listdir(bucket / "bkt" / "data")) == sorted({*classes, ".hidden", "manifest.csv"})
  # A bad file is skipped and logged to a skip log in the bucket (appends rewrite the object).
  bad = [sources.Entry("gs://bkt/data/bad.png", label=entries[0].label), entries[0]] * 2
  storage.write_bytes(bad[0].path, b"not a png")
  src = sources.FileSource(bad, classes, decode.Preprocess(), "skip",
                           sources.skip_log_path("gs://bkt/runs/mae"))
  assert [src[i]["skipped"] for i in (0, 2)] == [1, 1]
  log = (bucket / "bkt" / "runs" / "mae" / "skipped_files.txt").read_text().splitlines()
  assert [line.split("\t")[0] for line in log] == [bad[0].path] * 2
  assert sorted(os.listdir(cwd)) == []


@pytest.mark.slow
def test_sweep_bookkeeping_in_a_bucket(bucket, tmp_path, monkeypatch):
  """A stage's log, DONE marker and the sweep.json manifest of a sweep folder at a URL."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  stage = runner.Stage("train", "gs://bkt/sweep/p1", [sys.executable, "-c", "print('hello')"])
  assert runner.run_stage(stage, "gs://bkt/sweep/p1/logs/train.log")[0] == 0 and stage.is_done()
  assert runner.run_stage(stage, "gs://bkt/sweep/p1/logs/train.log")[0] == 0   # appends
  assert (bucket / "bkt" / "sweep" / "p1" / "logs" / "train.log").read_text().count("\nhello\n") == 2
  assert runner._tail("gs://bkt/sweep/p1/logs/train.log")[-1] == "hello"  # pylint: disable=protected-access
  sweep = spec.Sweep("configs/sweeps/x.py", "configs/mae.py:tiny", "train", [{"seed": 0}])
  runner.Manifest("gs://bkt/sweep", sweep, [runner.Point("p1", {"seed": 0}, stage.workdir, [stage])], [], [])
  manifest = json.loads((bucket / "bkt" / "sweep" / "sweep.json").read_text())
  assert manifest["points"][0]["status"] == "done"
  assert sorted(os.listdir(cwd)) == []


@pytest.mark.slow
def test_train_run_from_a_bucket_skips_damaged_files_and_logs_them_in_the_bucket(gcs, tmp_path, monkeypatch):
  """On the GCS emulator: a 2-step MAE run (``loop.train``, what ``medfm_jax.main`` runs) reads a
  folder dataset at ``gs://bucket/...`` holding an empty PNG with ``data.on_error=skip``; the run
  counts the skipped draws in ``data/skipped`` and appends each read of the file to
  ``skipped_files.txt`` in the gs:// workdir, and nothing lands under the working folder (no
  ``./gs:``)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  data, url = "gs://bucket/skips/data", "gs://bucket/skips/run"
  rng = np.random.default_rng(2)
  for split, n in (("train", 10), ("val", 8)):
    for i in range(n):
      image_files.write_image(f"{data}/{split}/c/{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
  storage.write_bytes(f"{data}/train/c/bad.png", b"")
  config = helpers.tiny_mae_config(**{
      "data.source": "folder", "data.path": data, "data.on_error": "skip", "total_steps": 2,
      "data.eval_examples": 8, "data.eval_batch_size": 8, "objective.recon_examples": 4})
  loop.train(config, url, helpers.single_device_mesh(config))
  rows = [json.loads(line) for line in gcs.read("bucket", "skips/run/metrics.jsonl").splitlines()]
  skipped = [m["data/skipped"] for m in rows if "data/skipped" in m]
  assert len(skipped) == 2 and all(s >= 1 for s in skipped)   # 11 files, batch 16: drawn every batch
  lines = gcs.read("bucket", "skips/run/skipped_files.txt").decode().splitlines()
  assert len(lines) >= sum(skipped), lines   # the input reads ahead of the steps (prefetch)
  assert all(line == f"{data}/train/c/bad.png\tempty file (0 bytes)" for line in lines), lines
  assert "skips/run/skipped_files.txt" in gcs.list("bucket", "skips/run/")
  assert os.listdir(cwd) == []   # e.g. no ./gs:/bucket/skips/run


def test_bucket_listings_show_what_tensorstore_wrote(gcs):
  """On the GCS emulator: orbax writes checkpoints through TensorStore, not gcsfs, so a folder
  listed before a new step was written must still show it (medfm_jax.storage turns gcsfs' listings
  cache off); else resume and ``init_from`` miss the newest steps."""
  kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "listing/"}).result()
  kv["checkpoints/3/state"] = b"3"
  root = storage.path("gs://bucket/listing/checkpoints")
  assert [p.name for p in root.iterdir()] == ["3"]
  kv["checkpoints/6/state"] = b"6"
  assert sorted(p.name for p in root.iterdir()) == ["3", "6"]
  assert (root / "6").is_dir()


def test_concurrent_appends_to_a_bucket_object_keep_every_line(gcs):
  """An appended URL object is read, extended and rewritten (no append in object stores): the
  input's reader threads skipping bad files at once must not lose each other's lines."""
  url = "gs://bucket/appends/skipped_files.txt"
  lines = [f"t{t}/{i}\n" for t in range(4) for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda line: storage.append_text(url, line), lines))
  assert sorted(gcs.read("bucket", "appends/skipped_files.txt").decode().splitlines(keepends=True)) == sorted(lines)


@pytest.mark.slow
def test_grain_worker_processes_log_skips_to_their_own_bucket_objects(gcs):
  """A source pickled into another process (a grain worker) logs its skips to
  ``skipped_files.worker<pid>.txt`` beside the URL log: processes rewriting one object would drop
  each other's lines. The process that built the source writes the log itself."""
  storage.write_bytes("gs://bucket/workers/data/bad.png", b"")
  image_files.write_image("gs://bucket/workers/data/good.png", np.zeros((4, 4), np.uint8))
  entries = [sources.Entry(f"gs://bucket/workers/data/{n}.png", label="x") for n in ("bad", "good")]
  src = sources.FileSource(entries, ["x"], decode.Preprocess(), "skip", "gs://bucket/workers/run/skipped_files.txt")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    assert pool.submit(operator.getitem, src, 0).result()["skipped"] == 1
    pid = pool.submit(os.getpid).result()
  assert src[0]["skipped"] == 1
  line = "gs://bucket/workers/data/bad.png\tempty file (0 bytes)\n"
  assert gcs.read("bucket", f"workers/run/skipped_files.worker{pid}.txt").decode() == line
  assert gcs.read("bucket", "workers/run/skipped_files.txt").decode() == line
