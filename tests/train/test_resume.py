"""kill -9, SIGTERM/SIGINT or a damaged checkpoint mid-run, re-run the same command: the result is
bitwise the uninterrupted run's."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import jax
import numpy as np

from medfm_jax import storage
from medfm_jax.data import build, decode, image_files, sources
from medfm_jax.sweeps import runner
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import loop
from tests import gcs_emulator, helpers

# The tests' shared tiny MAE run (8 steps; the check does not depend on its size).
_ARGS = ["--config=configs/mae.py:tiny", helpers.NO_FINAL_EVAL, *runner.override_flags(helpers.TINY_MAE_CLI),
         "--config.log_every=1", "--config.eval_every=0",   # no in-training eval: not checked here
         "--config.checkpoint_every=3"]


def _final_params(workdir):
  return ckpt_lib.restore_params(os.path.join(workdir, "checkpoints", "8"))


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run (checkpoints 3, 6, 8) and its final params."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  result = helpers.run_cli(_ARGS + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, _final_params(workdir)


@pytest.mark.slow
def test_kill_and_resume_is_bitwise(tmp_path, straight):
  straight, straight_params = straight
  crashed = str(tmp_path / "crashed")

  # SIGKILL right after step 5 (a hook of tests/crash_main.py): the (synchronous) checkpoint of
  # step 3 exists, 6 never happens.
  result = helpers.run_cli(_ARGS + [f"--workdir={crashed}", "--config.async_checkpointing=False",
                                    "--crash_at_step=5"], module="tests.crash_main")
  assert result.returncode == -9
  assert ckpt_lib.Checkpointer(crashed).latest_step() == 3
  result = helpers.run_cli(_ARGS + [f"--workdir={crashed}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "restored step 3" in result.stderr

  _assert_same_params(straight_params, _final_params(crashed))
  # Steps 4..8 of the resumed run logged the same losses as the uninterrupted run.
  loss = lambda w: {m["step"]: m["loss"] for m in helpers.read_metrics(w) if "loss" in m}
  assert all(loss(crashed)[s] == loss(straight)[s] for s in range(4, 9))


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_previous_bitwise(tmp_path, straight):
  """The final checkpoint's largest array file truncated: the same command warns, resumes from
  step 6, trains 7 and 8 again and ends with the uninterrupted run's parameters."""
  workdir, straight_params = straight
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  array_dir = os.path.join(damaged, "checkpoints", "8", "state", "ocdbt.process_0", "d")
  big = max((os.path.join(array_dir, f) for f in os.listdir(array_dir)), key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  result = helpers.run_cli(_ARGS + [f"--workdir={damaged}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"step 8 in {damaged}/checkpoints is damaged and skipped" in result.stderr
  assert "restored step 6" in result.stderr
  _assert_same_params(straight_params, _final_params(damaged))


def _wait_for_step(workdir, step, proc, timeout=300):
  """Until metrics.jsonl logs ``step`` (or the process ends)."""
  deadline = time.monotonic() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.monotonic() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(m.get("step", 0) >= step and "loss" in m
                                    for m in helpers.read_metrics(workdir)):
      return
    time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_current_step_and_the_rerun_is_bitwise(tmp_path, straight, signum):
  """A signal at a random moment after step 1 (0.4 s per step; no periodic checkpoint in the run):
  exit 0 with one line, a checkpoint at the step it stopped after; the same command resumes with
  no step lost and ends with the uninterrupted run's parameters."""
  _, straight_params = straight
  workdir = str(tmp_path / "preempted")
  args = _ARGS + ["--config.checkpoint_every=1000", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  proc = subprocess.Popen([sys.executable, "-m", "tests.crash_main", "--sleep_per_step=0.4", *args],
                          cwd=helpers.REPO, env=env, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 1, proc)
  delay = random.Random().uniform(0.0, 2.0)      # steps 2..6 at 0.4 s each
  print(f"{signal.Signals(signum).name} {delay:.2f}s after step 1")
  time.sleep(delay)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  line = [l for l in stderr.splitlines() if l.startswith("medfm_jax: ")]
  assert len(line) == 1 and line[0].startswith(f"medfm_jax: {signal.Signals(signum).name}: "
                                               "stopped after step "), stderr[-3000:]
  stopped = int(line[0].split("stopped after step ")[1].split()[0])
  assert line[0].endswith(f"saved it to {workdir}/checkpoints/{stopped}; run the same command "
                          "to resume")
  assert 1 <= stopped < 8 and ckpt_lib.Checkpointer(workdir).latest_step() == stopped
  logged = [m["step"] for m in helpers.read_metrics(workdir) if "loss" in m]
  assert logged == list(range(1, stopped + 1))          # metrics flushed up to the saved step

  result = helpers.run_cli(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"restored step {stopped}" in result.stderr
  logged = [m["step"] for m in helpers.read_metrics(workdir) if "loss" in m]
  assert logged == list(range(1, 9))                    # no step lost, none repeated
  _assert_same_params(straight_params, _final_params(workdir))


def test_stop_flags_are_compared_every_n_steps_and_at_saves(monkeypatch):
  """One process: after every step (no collective). Several: only at multiples of
  stop_check_every and at checkpoint steps, steps that every process shares."""
  assert all(loop.StopSignals.due(step, 10, saved=False) for step in range(1, 25))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert [s for s in range(1, 25) if loop.StopSignals.due(s, 10, saved=False)] == [10, 20]
  assert loop.StopSignals.due(7, 10, saved=True)


@pytest.mark.slow
def test_second_signal_exits_at_once():
  code = ("import os, signal, time\n"
          "from medfm_jax.train import loop\n"
          "with loop.StopSignals() as stop:\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n"
          "  time.sleep(0.1)\n"
          "  assert stop.requested() and stop.name == 'SIGTERM'\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(5)\n"
          "print('not reached')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=helpers.REPO))
  assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
  assert "medfm_jax: second SIGINT: exiting now, without saving" in result.stderr
  assert "not reached" not in result.stdout


@pytest.mark.slow
def test_failing_save_is_one_line_and_earlier_checkpoints_resume_bitwise(tmp_path, straight):
  """After step 4 no file may grow past 16 KiB (RLIMIT_FSIZE: writes fail with EFBIG, as on a
  full disk): the save of step 6 stops the run with one line naming the step and path; step 3
  stays intact and the same command (disk 'freed') resumes from it to the uninterrupted result."""
  _, straight_params = straight
  workdir = str(tmp_path / "full")
  args = _ARGS + ["--config.async_checkpointing=False", f"--workdir={workdir}"]
  result = helpers.run_cli(args + ["--file_size_limit_at_step=4"], module="tests.crash_main")
  assert result.returncode == 2, result.stderr[-3000:]
  ours = [l for l in result.stderr.splitlines() if l.startswith("medfm_jax: ")]
  assert len(ours) == 1, result.stderr[-3000:]
  last = ours[0]
  # Which writer meets the limit first varies: Python's (OSError: [Errno 27] File too large) or
  # TensorStore's (OUT_OF_RANGE: Error writing local file ...).
  assert last.startswith(f"medfm_jax: checkpoint error: cannot save step 6 to {workdir}/checkpoints/6 ("), last
  assert ("File too large" in last or "Error writing local file" in last), last
  assert last.endswith("earlier checkpoints are intact, the same command resumes from the newest"), last
  assert ckpt_lib.Checkpointer(workdir).latest_step() == 3
  result = helpers.run_cli(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "restored step 3" in result.stderr
  _assert_same_params(straight_params, _final_params(workdir))


def _one_line(result) -> str:
  """The one ``medfm_jax: ...`` line of a CLI run's stderr."""
  ours = [l for l in result.stderr.splitlines() if l.startswith("medfm_jax: ")]
  assert len(ours) == 1, result.stderr[-3000:]
  return ours[0]


def _assert_step_3_intact(workdir, straight_dir):
  """The newest checkpoint is step 3, bitwise the uninterrupted run's step 3 (restorable)."""
  assert ckpt_lib.Checkpointer(workdir).latest_step() == 3
  _assert_same_params(ckpt_lib.restore_params(os.path.join(straight_dir, "checkpoints", "3")),
                      ckpt_lib.restore_params(f"{workdir}/checkpoints/3"))


@pytest.mark.slow
def test_save_into_a_read_only_checkpoint_dir_is_one_line(tmp_path, straight):
  """Permission denied: after step 4 WORKDIR/checkpoints is read-only; the save of step 6 stops the
  run with one line naming the step and path; step 3 stays intact. (Synchronous saves: an async
  save of step 3 still finishing after step 4 fails too, and its error names step 3.)"""
  straight_dir, _ = straight
  workdir = str(tmp_path / "read_only")
  result = helpers.run_cli(_ARGS + [f"--workdir={workdir}", "--config.async_checkpointing=False",
                                    "--read_only_checkpoints_at_step=4"], module="tests.crash_main")
  os.chmod(os.path.join(workdir, "checkpoints"), 0o755)
  assert result.returncode == 2, result.stderr[-3000:]
  line = _one_line(result)
  assert line.startswith(f"medfm_jax: checkpoint error: cannot save step 6 to {workdir}/checkpoints/6 ("), line
  assert "Permission denied" in line, line
  assert line.endswith("earlier checkpoints are intact, the same command resumes from the newest"), line
  _assert_step_3_intact(workdir, straight_dir)


@pytest.mark.slow
def test_save_into_an_unreachable_bucket_is_one_line(straight, gcs):
  """The GCS emulator killed after step 5 (no bucket write until the save of step 6: metrics are
  logged at step 8 only): that save stops the run with one line naming the step and the gs://
  path; with the emulator back, the bucket's step 3 is intact."""
  straight_dir, _ = straight
  url = "gs://bucket/unreachable/run"
  args = [f"--config={helpers.REPO}/configs/mae.py:tiny", *_ARGS[1:], "--config.log_every=100",
          "--config.async_checkpointing=False", f"--workdir={url}", f"--kill_process_at_step=5:{gcs.pid}"]
  try:
    result = helpers.run_cli(args, module="tests.crash_main")
  finally:
    gcs.stop()
    gcs.start()
  assert result.returncode == 2, result.stderr[-3000:]
  line = _one_line(result)
  assert line.startswith(f"medfm_jax: checkpoint error: cannot save step 6 to {url}/checkpoints/6 ("), line
  assert f"Cannot connect to host 127.0.0.1:{gcs.port}" in line, line
  assert line.endswith("earlier checkpoints are intact, the same command resumes from the newest"), line
  _assert_step_3_intact(url, straight_dir)


@pytest.mark.slow
def test_bucket_workdir_on_the_gcs_emulator(tmp_path, straight, gcs):
  """``--workdir=gs://bucket/...`` against the local GCS emulator, run from an empty folder:
  kill -9 after step 5, the same command resumes from the bucket's step 3 and ends with the
  uninterrupted local run's parameters, bitwise. Checkpoints, metrics, TensorBoard events, recon
  PNGs and config.json are objects in the bucket; ``python -m medfm_jax.evaluate`` restores
  ``init_from=gs://...`` and reads a TFDS dataset at ``data.data_dir=gs://...``; a skip log is
  appended in the bucket; nothing lands under the working folder (no ``./gs:``)."""
  _, straight_params = straight
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  url = "gs://bucket/resume/run"
  args = [f"--config={helpers.REPO}/configs/mae.py:tiny", *_ARGS[1:], "--config.eval_every=4",
          f"--workdir={url}"]
  result = helpers.run_cli(args + ["--config.async_checkpointing=False", "--crash_at_step=5"],
                           module="tests.crash_main", cwd=cwd)
  assert result.returncode == -9, result.stderr[-3000:]
  assert ckpt_lib.Checkpointer(url).latest_step() == 3
  result = helpers.run_cli(args, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "restored step 3" in result.stderr
  _assert_same_params(straight_params, ckpt_lib.restore_params(f"{url}/checkpoints/8"))

  objects = gcs.list("bucket", "resume/run/")
  top = {name.split("/")[2] for name in objects}
  assert top == {"checkpoints", "metrics.jsonl", "tensorboard", "recon", "config.json"}, top
  assert {name.split("/")[3] for name in objects if "/checkpoints/" in name} == {"3", "6", "8"}
  assert any(name.startswith("resume/run/tensorboard/events.out.tfevents") for name in objects)
  for step in (0, 4, 8):
    assert gcs.read("bucket", f"resume/run/recon/step_{step:07d}.png").startswith(b"\x89PNG")
  assert json.loads(gcs.read("bucket", "resume/run/config.json"))["total_steps"] == 8
  rows = [json.loads(line) for line in gcs.read("bucket", "resume/run/metrics.jsonl").splitlines()]
  straight_loss = {m["step"]: m["loss"] for m in helpers.read_metrics(straight[0]) if "loss" in m}
  assert {m["step"]: m["loss"] for m in rows if "loss" in m} == straight_loss

  # Evaluation from the bucket checkpoint, with features of a TFDS dataset in the bucket.
  build.build("phantoms", str(tmp_path / "tfds"), "ph", image_size=16,
              num_examples="train:64,val:8,test:32")
  gcs_emulator.upload(str(tmp_path / "tfds"), "gs://bucket/resume/tfds")
  result = helpers.run_cli([f"--config={helpers.REPO}/configs/eval/knn.py:tiny",
                            f"--config.init_from={url}", "--workdir=gs://bucket/resume/knn",
                            "--config.data.source=tfds", "--config.data.name=ph:1.0.0",
                            "--config.data.data_dir=gs://bucket/resume/tfds",
                            "--config.data.image_size=16", "--config.features.train_examples=64",
                            "--config.features.batch_size=32", "--config.data.eval_examples=32",
                            "--config.data.eval_batch_size=32"], module="medfm_jax.evaluate", cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  knn = json.loads(gcs.read("bucket", "resume/knn/results.json"))
  assert knn["init_from"] == url and knn["protocol"] == "knn"
  assert sum(row["support"] for row in knn["metrics"]["per_class"]) == 32, knn

  # A skip log appended in the bucket (each append rewrites the object).
  bad = sources.Entry("gs://bucket/resume/data/bad.png", label="x")
  storage.write_bytes(bad.path, b"not a png")
  good = sources.Entry("gs://bucket/resume/data/good.png", label="x")
  image_files.write_image(good.path, np.zeros((4, 4), np.uint8))
  src = sources.FileSource([bad, good] * 2, ["x"], decode.Preprocess(), "skip",
                           sources.skip_log_path(url))
  assert [src[i]["skipped"] for i in (0, 2)] == [1, 1]
  log = gcs.read("bucket", "resume/run/skipped_files.txt").decode().splitlines()
  assert [line.split("\t")[0] for line in log] == [bad.path] * 2
  assert os.listdir(cwd) == []   # e.g. no ./gs:/bucket/resume/run
