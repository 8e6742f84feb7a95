"""kill -9, SIGTERM/SIGINT or a damaged checkpoint mid-run, re-run the same command: the result is
bitwise the uninterrupted run's."""
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

from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers

# The tiny MAE with 2 encoder blocks (the check does not depend on depth; each process compiles).
_ARGS = ["--config=configs/mae.py:tiny", helpers.NO_FINAL_EVAL, "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.depth=2", "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
         "--config.total_steps=8", "--config.warmup_steps=2", "--config.log_every=1",
         "--config.eval_every=1000", "--config.checkpoint_every=3",
         "--config.data.eval_examples=16", "--config.data.eval_batch_size=16"]


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
