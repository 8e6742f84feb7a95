"""Two processes on localhost (jax.distributed + gloo) train exactly like one process."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers

_ARGS = ["--config=configs/mae.py:tiny", "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
         "--config.total_steps=3", "--config.warmup_steps=1", "--config.log_every=1",
         "--config.eval_every=3", "--config.checkpoint_every=3",
         "--config.data.eval_examples=16", "--config.data.eval_batch_size=16"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", MEDFM_COORDINATOR=f"127.0.0.1:{port}",
             MEDFM_NUM_PROCESSES="2", PYTHONPATH=helpers.REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-m", "medfm_jax.main", *_ARGS, f"--workdir={multi}"],
                            cwd=helpers.REPO, env=dict(env, MEDFM_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 1 of 2, 2 local / 4 global devices" in outs[1][1]

  result = helpers.run_cli(_ARGS + [f"--workdir={single}"])
  assert result.returncode == 0, result.stderr[-3000:]

  loss = lambda w: [m["loss"] for m in helpers.read_metrics(w) if "loss" in m]
  assert len(loss(multi)) == 3        # only process 0 wrote metrics
  np.testing.assert_allclose(loss(multi), loss(single), atol=1e-5)
  evals = lambda w: [m["eval/loss"] for m in helpers.read_metrics(w) if "eval/loss" in m]
  np.testing.assert_allclose(evals(multi), evals(single), atol=1e-5)
  # The jointly written checkpoint restores in one process and matches the 1-process run.
  assert sorted(os.listdir(os.path.join(multi, "checkpoints", "3", "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  a = ckpt_lib.restore_params(os.path.join(multi, "checkpoints", "3"))
  b = ckpt_lib.restore_params(os.path.join(single, "checkpoints", "3"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5)
