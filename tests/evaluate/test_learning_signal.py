"""Pretraining learns something transferable: a short MAE run beats its architecture at random init
on a benchmark task (docs/benchmark.md), through the training job's closing table."""
import pytest

from configs import common, mae
from medfm_jax.evaluate import closing
from medfm_jax.sweeps import spec as sweep_spec
from medfm_jax.train import loop
from tests import helpers

STEPS = 150
# Lesion-location linear probe (mean-pooled tokens, 2048 train / 1024 test images, 847 labelled),
# pretrained minus random init, accuracy points, measured 2026-11-30 on a loaded 2-core machine:
#   150 steps, MAE seeds 0 / 1: MARGINS_150
#   600 steps (quick start), probe seeds 0 / 1 / 2: +7.1 / +6.5 / ...; random init seeds 0 / 1 / 2:
#   0.300 / ... (chance 0.287); the standard error of one accuracy is 0.016.
MIN_GAIN = 0.02


@pytest.mark.slow
def test_mae_pretraining_beats_random_init_on_lesion_location(tmp_path):
  config = helpers.override(mae.get_config("tiny"), {
      "total_steps": STEPS, "warmup_steps": 15, "eval_every": 10_000, "checkpoint_every": STEPS,
      "log_every": 50, "final_eval.config": ""})
  workdir = str(tmp_path / "mae")
  loop.train(config, workdir)
  result = closing.compare(sweep_spec.load_config(common.TINY_FINAL_EVAL), config, workdir,
                           ("lesion_location",))
  rows = result["rows"]
  gain = rows["pretrained"]["lesion_location"]["accuracy"] - rows["random init"]["lesion_location"]["accuracy"]
  assert gain > MIN_GAIN, closing.markdown(result)
