r"""MAE ablation: mask ratio x decoder depth (MAE paper, Tables 1a/1b), kNN-evaluated.

  python -m medfm_jax.sweeps --config=configs/sweeps/mae_mask_ratio.py:tiny --workdir=runs/mae_mask \
      --then_eval=configs/eval/knn.py:tiny
  python -m medfm_jax.sweeps.report runs/mae_mask

Variants: tiny (2 x 2 points, 100 steps each of configs/mae.py:tiny on the phantoms: minutes on a
CPU) | vit_b16 (5 x 4 points of the paper recipe). ``VARIANT,k=v`` overrides go to every point's
base config, e.g. ``tiny,total_steps=50``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)
from medfm_jax.sweeps.grid import base_arg, product  # noqa: E402


def get_sweep(arg=None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  if variant == "tiny":
    base = "configs/mae.py:tiny"
    overrides = {"total_steps": 100, "warmup_steps": 10, "log_every": 5, "eval_every": 50,
                 "checkpoint_every": 50, **overrides}
    points = product({"objective.mask_ratio": [0.6, 0.9], "model.decoder_depth": [1, 2]})
  elif variant == "vit_b16":
    base = "configs/mae.py:vit_b16"
    points = product({"objective.mask_ratio": [0.5, 0.6, 0.75, 0.85, 0.9],
                      "model.decoder_depth": [1, 2, 4, 8]})
  else:
    raise ValueError(f"configs/sweeps/mae_mask_ratio.py: unknown variant {variant!r}; allowed: tiny, vit_b16")
  return {"base": base_arg(base, overrides), "points": points}
