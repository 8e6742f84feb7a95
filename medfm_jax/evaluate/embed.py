r"""Embedding export: frozen encoder features of one split as ``.npz`` for use outside JAX.

  python -m medfm_jax.evaluate.embed --config=configs/eval/linear_probe.py:tiny \
      --config.init_from=runs/mae_tiny --workdir=runs/embed_mae_tiny --split=test --num_examples=2000

writes ``WORKDIR/embeddings_<split>.npz`` with ``features [n, width]`` (float32; pooling by
``features.pool``), ``ids [n]`` (record index in the split), and one int array per label
(``finding``, ``modality``). Computed in global batches sharded over the mesh; only process 0 writes.
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from medfm_jax import config as config_lib
from medfm_jax.evaluate import features, protocols
from medfm_jax.parallel import distributed
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import checkpoint
from medfm_jax import storage


def export(config, workdir: str, split: str, num_examples: int, mesh=None) -> str:
  """Extracts and writes the embeddings; returns the ``.npz`` path."""
  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  objective, params = features.build_classifier(config, mesh)
  feats, labels = features.extract(config, mesh, objective, params, split, num_examples)
  path = storage.path(workdir) / f"embeddings_{split}.npz"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      np.savez(f, features=feats, ids=np.arange(len(feats), dtype=np.int64), **labels)
  return str(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()
  f = flags.FLAGS
  config = f.config
  try:
    protocols.adopt_checkpoint(config, config_lib.explicit_keys(f["config"]))
    config_lib.validate(config, f.workdir)
    protocols.check_config(config)
    path = export(config, f.workdir, f.split or config.data.eval_split,
                  f.num_examples or config.data.eval_examples)
  except config_lib.ConfigError as e:
    sys.stderr.write(f"medfm_jax: config error: {e}\n")
    sys.exit(2)
  except (checkpoint.CheckpointError, ValueError) as e:
    sys.stderr.write(f"medfm_jax: embed error: {e}\n")
    sys.exit(2)
  print(path)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Eval config, e.g. configs/eval/linear_probe.py:tiny.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.DEFINE_string("split", "", "Split to embed (default data.eval_split).")
  flags.DEFINE_integer("num_examples", 0, "Records to embed (default data.eval_examples).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
