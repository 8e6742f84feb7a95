"""Two processes on localhost (launch/local.py: jax.distributed + gloo, 2 fake devices each)
train exactly like one process with 4 devices on the same global batches; the default mesh.dcn,
a mesh that does not fit, resume on another process count and, in that resumed run, SIGTERM to one
process."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import jax
import numpy as np

from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers
from tests.parallel import fingerprint_worker

# The tiny MAE with 2 encoder blocks (the check does not depend on depth; each process compiles).
# Plain SGD at a constant lr 0.1 (helpers.sgd_overrides; weight_decay_end stays unset): parameter
# differences follow gradient differences. Adam divides tiny gradients by their own size, so
# reduction-order noise in a near-zero gradient became a full-size update (1.2e-5 at XLA level 0,
# 2026-11-30). The lr is constant after the warmup (1 step, given after the overrides: the last
# flag wins), so a run resumed with more total steps (the SIGTERM scenario below) takes the same
# step 3 as the 3-step runs.
_SGD = [f"--config.{k}={v}" for k, v in helpers.sgd_overrides(lr=0.1).items() if v is not None]
_ARGS = ["--config=configs/mae.py:tiny", helpers.NO_FINAL_EVAL, *_SGD, "--config.data.image_size=16",
         "--config.batch_size=16", "--config.model.depth=2", "--config.model.decoder_width=32",
         "--config.model.decoder_depth=1", "--config.total_steps=3", "--config.warmup_steps=1",
         "--config.log_every=1", "--config.eval_every=3", "--config.checkpoint_every=2",
         "--config.async_checkpointing=False", "--config.data.eval_examples=16",
         "--config.data.eval_batch_size=16", "--config.objective.knn_train_examples=0",
         "--config.mesh.fsdp=2"]
# The 2-process run gives no mesh.dcn flags: the default (mesh.dcn.data=-1) puts the processes on
# the data axis (DCN), and mesh.fsdp=2 stays inside each.
_MULTI = []
_SINGLE = ["--config.mesh.data=2"]


def _two_process_command(args, workdir):
  """``launch/local.py`` with 2 processes x 2 CPU devices running the train CLI on ``args``."""
  return [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2",
          "--timeout=600", "--", *args, f"--workdir={workdir}"]


def _launch_two(args, workdir):
  return subprocess.run(_two_process_command(args, workdir), cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=660)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _max_param_diff(a_dir, b_dir):
  a, b = ckpt_lib.restore_params(a_dir), ckpt_lib.restore_params(b_dir)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.slow
def test_two_processes_match_one_and_each_resumes_on_the_other_count(tmp_path):
  """2 processes x 2 devices train like 1 process x 4 devices (losses, evals, params). Then each
  run's step-3 checkpoint is removed (as if killed before it) and the run resumes from step 2 on
  the other process count: the data stream continues at batch 2 and step 3 ends within float
  tolerance of the uninterrupted run. The 2-process resume is also the SIGTERM scenario (one
  launch instead of two): given 200 steps, its process 1 gets a SIGTERM after step 3 and both
  processes stop after the same step (one where they compare their stop flags), save it jointly
  and exit 0; process 0 names the other process's signal."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  t0 = time.perf_counter()
  result = _launch_two(_ARGS + _MULTI, multi)
  wall = time.perf_counter() - t0
  assert result.returncode == 0, result.stdout[-4000:]
  assert "[1] " in result.stdout and "process 1 of 2, 2 local / 4 global devices (cpu; explicit)" in result.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in result.stdout
  print(f"2-process run: {wall:.1f}s wall")

  result = helpers.run_cli(_ARGS + _SINGLE + [f"--workdir={single}"], devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "process 0 of 1, 4 local / 4 global devices" in result.stderr

  loss = lambda w: [m["loss"] for m in helpers.read_metrics(w) if "loss" in m]
  assert len(loss(multi)) == 3        # only process 0 wrote metrics
  np.testing.assert_allclose(loss(multi), loss(single), rtol=0, atol=1e-5)
  evals = lambda w: [m["eval/loss"] for m in helpers.read_metrics(w) if "eval/loss" in m]
  np.testing.assert_allclose(evals(multi), evals(single), rtol=0, atol=1e-5)
  # The checkpoint written jointly by both processes restores here (one process) and matches.
  assert sorted(os.listdir(os.path.join(multi, "checkpoints", "3", "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  a = ckpt_lib.restore_params(os.path.join(multi, "checkpoints", "3"))
  b = ckpt_lib.restore_params(os.path.join(single, "checkpoints", "3"))
  diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  print(f"max |param diff| {max(diffs):.2e}, max |loss diff| "
        f"{np.max(np.abs(np.subtract(loss(multi), loss(single)))):.2e}")
  assert max(diffs) <= 1e-5
  # ... while one step moves the parameters by far more (a gradient-scale bug would show).
  one_step = _max_param_diff(os.path.join(single, "checkpoints", "2"), os.path.join(single, "checkpoints", "3"))
  print(f"largest change of a parameter in step 3: {one_step:.2e}")
  assert one_step > 100 * 1e-5

  step_loss = lambda w: {m["step"]: m["loss"] for m in helpers.read_metrics(w) if "loss" in m}
  for source, counts in ((single, "1 process(es), this run has 2"), (multi, "2 process(es), this run has 1")):
    moved = str(tmp_path / f"{os.path.basename(source)}_moved")
    shutil.copytree(source, moved)
    shutil.rmtree(os.path.join(moved, "checkpoints", "3"))
    if source == single:
      out = _preempt_resumed_two(moved)
    else:
      result = helpers.run_cli(_ARGS + _SINGLE + [f"--workdir={moved}"], devices=4)
      out = result.stderr
      assert result.returncode == 0, out[-4000:]
    assert f"written by {counts}: the data stream continues at batch 2" in out
    np.testing.assert_allclose(step_loss(moved)[3], step_loss(source)[3], rtol=0, atol=1e-5)
    diff = _max_param_diff(os.path.join(source, "checkpoints", "3"), os.path.join(moved, "checkpoints", "3"))
    print(f"{counts}: max |param diff| {diff:.2e}")
    assert diff <= 1e-5


def _preempt_resumed_two(workdir):
  """Resumes ``workdir`` (a 1-process run, its step-3 checkpoint removed) on 2 processes with 200
  total steps, sends SIGTERM to process 1 once step 4 is logged, checks that both processes stop
  after the same step and save it jointly, and returns the launcher's output."""
  args = [a for a in _ARGS if not any(f in a for f in ("total_steps", "checkpoint_every", "eval_every"))]
  proc = subprocess.Popen(
      _two_process_command([*args, *_MULTI, "--config.total_steps=200",
                            "--config.checkpoint_every=3", "--config.keep_checkpoints=100",   # step 3's, kept to compare
                            "--config.eval_every=0"],   # no in-training eval (not checked here)
                           workdir),
      cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline and proc.poll() is None:
    if any("loss" in m and m["step"] >= 4 for m in helpers.read_metrics(workdir)):
      break
    time.sleep(0.1)
  victim = _child_with(proc.pid, "--process_id=1")
  assert victim is not None
  os.kill(victim, signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]
  lines = {i: [l for l in out.splitlines() if l.startswith(f"[{i}] medfm_jax: ")] for i in (0, 1)}
  assert len(lines[0]) == 1 and len(lines[1]) == 1, out[-4000:]
  assert lines[1][0].startswith("[1] medfm_jax: SIGTERM: stopped after step ")
  assert lines[0][0].startswith("[0] medfm_jax: a signal on another process: stopped after step ")
  steps = {int(lines[i][0].split("stopped after step ")[1].split()[0]) for i in (0, 1)}
  assert len(steps) == 1, lines
  step = steps.pop()
  # The flags are all-gathered every stop_check_every=10 steps and at checkpoint steps (every 3).
  assert 4 <= step < 200 and (step % 10 == 0 or step % 3 == 0), step
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", str(step), "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  # The source run's steps 1-3, then the resumed run's from step 3 on.
  assert [m["step"] for m in helpers.read_metrics(workdir) if "loss" in m] == [1, 2, 3, *range(3, step + 1)]
  return out


@pytest.mark.slow
def test_launcher_dry_run_prints_one_command_per_process():
  result = subprocess.run([sys.executable, "launch/local.py", "--num_processes=3", "--port=4321",
                           "--devices_per_process=2", "--dry_run", "--", "--config=configs/mae.py:tiny",
                           "--workdir=/tmp/w x"], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, XLA_FLAGS=""))   # as a user types it
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 ")
    assert line.endswith(f" -m medfm_jax.main --config=configs/mae.py:tiny '--workdir=/tmp/w x' "
                         f"--coordinator_address=127.0.0.1:4321 --num_processes=3 --process_id={i}")



@pytest.mark.slow
def test_a_mesh_that_does_not_fit_is_one_line_per_process_before_any_write(tmp_path):
  """2 processes with 1 device each cannot hold mesh.fsdp=2 inside a process (mesh.dcn, by
  default, spans the processes): one config-error line from each, no traceback, nothing written."""
  bad = tmp_path / "bad"
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=1",
       "--timeout=300", "--", *_ARGS, f"--workdir={bad}"],      # _ARGS sets mesh.fsdp=2
      cwd=helpers.REPO, capture_output=True, text=True, timeout=360)
  assert result.returncode == 2, result.stdout[-4000:]
  errors = [line for line in result.stdout.splitlines() if "medfm_jax: config error: " in line]
  assert len(errors) == 2, result.stdout[-4000:]
  assert all("fixed axes (2) do not divide the 1 devices per slice" in e for e in errors), errors
  assert "Traceback" not in result.stdout and not bad.exists()


def _child_with(parent_pid, needle):
  """The pid of the child process of ``parent_pid`` whose command line contains ``needle``."""
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode()
    except OSError:
      continue
    if ppid == parent_pid and needle in cmdline:
      return int(pid)
  return None


@pytest.mark.slow
def test_fingerprint_device_path_agrees_on_two_processes():
  """The checkpoint fingerprint's accelerators' path (forced on CPU devices) on 2 processes x 4
  devices, kernels split over both processes: each process gets every leaf's sums (the output is
  replicated), equal to the host path's and to the sums of the whole values in one process."""
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel.fingerprint_worker", port, str(i)],
                            cwd=helpers.REPO, env=helpers.subprocess_env(4, {"JAX_PLATFORMS": "cpu"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  expected = ckpt_lib.fingerprint(fingerprint_worker.global_values(), on_device=False)
  assert [r["device"] for r in results] == [expected, expected]
  assert [r["host"] for r in results] == [expected, expected]
