r"""Evaluation CLI over any checkpoint:

  python -m medfm_jax.evaluate --config=configs/eval/PROTOCOL.py:VARIANT \
      --config.init_from=WORKDIR_OR_CHECKPOINT --workdir=DIR

PROTOCOL: linear_probe | knn | fewshot | finetune | zero_shot | segment | segment3d (see configs/eval/). An empty
init_from evaluates the randomly initialised encoder (baseline). Writes DIR/results.json and
DIR/results.md (accuracy, balanced accuracy, macro AUROC, per-class table).
"""
from __future__ import annotations

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from medfm_jax import config as config_lib
from medfm_jax.evaluate import protocols, results as results_lib
from medfm_jax.parallel import distributed
from medfm_jax.train import checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config, e.g. configs/eval/knn.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results (and fine-tuning runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(kind: str, error: Exception, code: int = 2):
  sys.stderr.write(f"medfm_jax: {kind}: {error}\n")
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    protocols.adopt_checkpoint(config, config_lib.explicit_keys(flags.FLAGS["config"]))
    config_lib.validate(config, workdir)
    protocols.check_config(config)
    results = protocols.run(config, workdir)
  except config_lib.ConfigError as e:
    _fail("config error", e)
  except checkpoint.CheckpointError as e:
    _fail("checkpoint error", e)
  except protocols.EvalError as e:
    _fail("eval error", e)
  if jax.process_index() == 0:
    # The eval config next to its numbers: which budget, seeds and checkpoint produced them.
    json_path, md_path = results_lib.write(workdir, {**results, "config": json.loads(config.to_json_best_effort())})
    m = results["metrics"]
    if config.protocol in ("segment", "segment3d"):
      key = "mean_dice" if config.protocol == "segment3d" else "dice_box"
      logging.info("%s: %s %.4f -> %s, %s", config.protocol, key, m[key], json_path, md_path)
      print(results_lib.markdown(results))
      return
    if config.protocol == "seg_probe":
      logging.info("seg_probe: Dice %.4f  mIoU %.4f -> %s, %s", m["dice"], m["miou"], json_path, md_path)
      print(results_lib.markdown(results))
      return
    logging.info("%s: accuracy %.4f  balanced accuracy %.4f  macro AUROC %.4f  -> %s, %s",
                 config.protocol, m["accuracy"], m["balanced_accuracy"], m["macro_auroc"],
                 json_path, md_path)
    print(results_lib.markdown(results))


if __name__ == "__main__":
  app.run(main)
