r"""DINO ablation: number of local crops (DINO paper, Table 5: multi-crop), kNN-evaluated.

  python -m medfm_jax.sweeps --config=configs/sweeps/dino_local_crops.py:tiny --workdir=runs/dino_crops \
      --then_eval=configs/eval/knn.py:tiny

Variants: tiny (2 / 4 / 6 local 16-px crops, 100 steps of configs/dino.py:tiny) | vit_s16
(2 / 6 / 10 local 96-px crops). ``VARIANT,k=v`` overrides go to every point's base config.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)
from medfm_jax.sweeps.grid import base_arg, product  # noqa: E402


def get_sweep(arg=None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  if variant == "tiny":
    base = "configs/dino.py:tiny"
    overrides = {"total_steps": 100, "warmup_steps": 10, "log_every": 10, "eval_every": 100,
                 "checkpoint_every": 50, **overrides}
    points = product({"data.multicrop.num_local": [2, 4, 6]})
  elif variant == "vit_s16":
    base = "configs/dino.py:vit_s16"
    points = product({"data.multicrop.num_local": [2, 6, 10]})
  else:
    raise ValueError(f"configs/sweeps/dino_local_crops.py: unknown variant {variant!r}; allowed: tiny, vit_s16")
  return {"base": base_arg(base, overrides), "points": points}
