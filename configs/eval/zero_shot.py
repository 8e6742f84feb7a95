r"""Zero-shot classification with an image-text checkpoint (CLIP/SigLIP/FLAVA). No such objective exists in this codebase yet: the protocol stops with an error naming the checkpoint's objective.

  python -m medfm_jax.evaluate --config=configs/eval/zero_shot.py:tiny \
      --config.init_from=runs/mae_tiny --workdir=runs/eval/zero_shot_mae_tiny

Variants: tiny | vit_b16; append ``,key=value`` pairs to override fields. Empty init_from = random init.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval import base  # noqa: E402  (config files are loaded by path)


def get_config(arg: str | None = None):
  return base.eval_config("zero_shot", arg)
