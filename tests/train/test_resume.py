"""kill -9 mid-run, re-run the same command: the result is bitwise the uninterrupted run's."""
import os
import pytest

import jax
import numpy as np

from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers

# The tiny MAE with 2 encoder blocks (the check does not depend on depth; each process compiles).
_ARGS = ["--config=configs/mae.py:tiny", "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.depth=2", "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
         "--config.total_steps=8", "--config.warmup_steps=2", "--config.log_every=1",
         "--config.eval_every=1000", "--config.checkpoint_every=3",
         "--config.data.eval_examples=16", "--config.data.eval_batch_size=16"]


def _final_params(workdir):
  return ckpt_lib.restore_params(os.path.join(workdir, "checkpoints", "8"))


@pytest.mark.slow
def test_kill_and_resume_is_bitwise(tmp_path):
  straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
  result = helpers.run_cli(_ARGS + [f"--workdir={straight}"])
  assert result.returncode == 0, result.stderr[-3000:]

  # SIGKILL right after step 5 (a hook of tests/crash_main.py): the (synchronous) checkpoint of
  # step 3 exists, 6 never happens.
  result = helpers.run_cli(_ARGS + [f"--workdir={crashed}", "--config.async_checkpointing=False",
                                    "--crash_at_step=5"], module="tests.crash_main")
  assert result.returncode == -9
  assert ckpt_lib.Checkpointer(crashed).latest_step() == 3
  result = helpers.run_cli(_ARGS + [f"--workdir={crashed}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "restored step 3" in result.stderr

  a, b = _final_params(straight), _final_params(crashed)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Steps 4..8 of the resumed run logged the same losses as the uninterrupted run.
  loss = lambda w: {m["step"]: m["loss"] for m in helpers.read_metrics(w) if "loss" in m}
  assert all(loss(crashed)[s] == loss(straight)[s] for s in range(4, 9))
