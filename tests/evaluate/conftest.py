"""A tiny MAE checkpoint (4 steps of the shrunk tiny config with 2 encoder blocks), shared by the evaluation tests."""
import pytest

from tests import helpers


@pytest.fixture(scope="session")
def mae_ckpt(tmp_path_factory):
  from medfm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("mae_tiny"))
  config = helpers.tiny_mae_config(total_steps=4, checkpoint_every=4, **{"model.depth": 2})
  loop.train(config, workdir, helpers.single_device_mesh(config))
  return workdir
