r"""Promptable segmentation evaluation of a run of objective ``sam`` (SAM / MedSAM): Dice and IoU per
prompt type (a box; one positive point, then correction clicks at the centre of the error region,
up to ``segment.point_rounds`` points) and per target class, plus an overlay picture.

  python -m medfm_jax.main --config=configs/sam.py:tiny --workdir=runs/sam_tiny
  python -m medfm_jax.evaluate --config=configs/eval/segment.py:tiny \
      --config.init_from=runs/sam_tiny --workdir=runs/eval/segment_sam_tiny

The run's own data source, image size, normalisation and prompt jitter are used; this config picks
the split, the number of examples, the target classes and the point rounds. Writes
WORKDIR/results.{json,md} and WORKDIR/segment.png (top row: box prompts; bottom row: after the last
click). Variants: tiny.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)
from configs.eval import base  # noqa: E402


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  if variant != "tiny":
    raise ValueError(f"configs/eval/segment.py: unknown variant {variant!r}; allowed: tiny")
  c = base.eval_config("segment", variant)   # the model comes from the sam run (init_from)
  c.data.eval_split = "test"
  c.data.eval_examples, c.data.eval_batch_size = 512, 64
  c.segment = ml_collections.ConfigDict(dict(
      point_rounds=5,                         # report 1..point_rounds points (first + clicks); 0 = boxes only
      classes=("lesion", "body", "organ"),    # target classes drawn per image (data.segment.classes)
      overlay_examples=8))                    # examples in segment.png (0 = none)
  common.apply_overrides(c, overrides)
  return c
