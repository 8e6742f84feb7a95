"""kill -9 mid-run, re-run the same command: the result is bitwise the uninterrupted run's."""
import os
import shutil

import pytest

import jax
import numpy as np

from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers

_ARGS = ["--config=configs/mae.py:tiny", "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
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
