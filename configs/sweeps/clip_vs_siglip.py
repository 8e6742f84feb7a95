r"""Image-text objective: CLIP softmax InfoNCE vs SigLIP sigmoid loss, each with its paper's
logit-scale initialisation (1/0.07 vs 10), zero-shot evaluated by the trainer and linear-probed.

  python -m medfm_jax.sweeps --config=configs/sweeps/clip_vs_siglip.py:tiny --workdir=runs/clip_siglip \
      --then_eval=configs/eval/linear_probe.py:tiny --seeds=0,1

Variants: tiny (150 steps of configs/clip.py:tiny) | vit_b16. ``VARIANT,k=v`` overrides go to
every point's base config.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)
from medfm_jax.sweeps.grid import base_arg, zip_  # noqa: E402


def get_sweep(arg=None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  if variant == "tiny":
    base = "configs/clip.py:tiny"
    overrides = {"total_steps": 150, "warmup_steps": 15, "log_every": 10, "eval_every": 150,
                 "checkpoint_every": 75, **overrides}
  elif variant == "vit_b16":
    base = "configs/clip.py:vit_b16"
  else:
    raise ValueError(f"configs/sweeps/clip_vs_siglip.py: unknown variant {variant!r}; allowed: tiny, vit_b16")
  points = zip_({"objective.loss": ["clip", "siglip"],
                 "objective.init_logit_scale": [math.log(1 / 0.07), math.log(10.0)]})
  return {"base": base_arg(base, overrides), "points": points}
