"""Two processes on localhost (launch/local.py: jax.distributed + gloo, 2 fake devices each)
train exactly like one process with 4 devices on the same global batches."""
import os
import pytest
import subprocess
import sys
import time

import jax
import numpy as np

from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers

# The tiny MAE with 2 encoder blocks (the check does not depend on depth; each process compiles).
_ARGS = ["--config=configs/mae.py:tiny", "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.depth=2", "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
         "--config.total_steps=3", "--config.warmup_steps=1", "--config.log_every=1",
         "--config.eval_every=3", "--config.checkpoint_every=3",
         "--config.data.eval_examples=16", "--config.data.eval_batch_size=16", "--config.mesh.fsdp=2"]
# The 2-process run puts its data axis across the processes (DCN) and fsdp inside each.
_MULTI = ["--config.mesh.data=1", "--config.mesh.dcn.data=2"]
_SINGLE = ["--config.mesh.data=2"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  t0 = time.perf_counter()
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2",
       "--timeout=600", "--", *_ARGS, *_MULTI, f"--workdir={multi}"],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=660)
  wall = time.perf_counter() - t0
  assert result.returncode == 0, result.stdout[-4000:]
  assert "[1] " in result.stdout and "process 1 of 2, 2 local / 4 global devices (cpu; explicit)" in result.stdout
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
