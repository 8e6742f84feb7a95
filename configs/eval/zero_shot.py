r"""Zero-shot classification (+ retrieval) with an image-text checkpoint (CLIP/SigLIP): class
names x prompt templates give the classifier. Checkpoints of objectives without a text tower stop
with an error naming the objective.

  python -m medfm_jax.evaluate --config=configs/eval/zero_shot.py:tiny \
      --config.init_from=runs/clip_tiny --workdir=runs/eval/zero_shot_clip_tiny

Variants: tiny | vit_b16; append ``,key=value`` pairs to override fields.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval import base  # noqa: E402  (config files are loaded by path)


def get_config(arg: str | None = None):
  return base.eval_config("zero_shot", arg)
