"""A tiny MAE checkpoint (4 steps of the shrunk tiny config with 2 encoder blocks), shared by the evaluation tests."""
import pytest

from tests import helpers


def train_mae_ckpt(workdir, seed=0):
  """Trains the shared checkpoint into ``workdir`` (``tools/seed_spread.py`` varies ``seed``)."""
  from medfm_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_mae_config(total_steps=4, checkpoint_every=4, seed=seed, **{"model.depth": 2})
  loop.train(config, workdir, helpers.single_device_mesh(config))
  return workdir


@pytest.fixture(scope="session")
def mae_ckpt(tmp_path_factory):
  return train_mae_ckpt(str(tmp_path_factory.mktemp("mae_tiny")))
