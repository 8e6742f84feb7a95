r"""3D segmentation evaluation: fine-tune a UNETR decoder (and the encoder) on N labelled volumes
through the shared trainer (objective 'seg3d'), then segment whole volumes of the eval split with
Gaussian-weighted sliding windows and report Dice and HD95 per structure.

  python -m medfm_jax.evaluate --config=configs/eval/segment3d.py:tiny \
      --config.init_from=runs/mae3d_tiny --workdir=runs/eval/segment3d_mae3d_tiny

An empty ``init_from`` is the random-init baseline. ``data.volume.train_volumes`` is the few-shot N.
Variants: tiny | primus_m. Writes WORKDIR/results.{json,md} and WORKDIR/segment3d.png.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common, seg3d  # noqa: E402  (config files are loaded by path)
from configs.eval import base  # noqa: E402


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  c = seg3d.get_config(variant)
  shared = base.eval_config("segment3d", "tiny")
  for key in ("features", "probe", "knn", "fewshot"):   # protocols.check_config reads them
    c[key] = shared[key]
  c.protocol = "segment3d"
  c.data.label = "finding"
  c.data.eval_split = "test"
  c.segment3d = ml_collections.ConfigDict(dict(overlap=0.5, mode="gaussian", sigma_scale=0.125, batch_size=4))
  if variant == "tiny":
    c.data.eval_examples = 8              # whole 40^3 volumes, 32^3 windows
  common.apply_overrides(c, overrides)
  return c
