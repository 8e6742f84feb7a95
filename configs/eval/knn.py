r"""Weighted kNN (k=20, T=0.07) on frozen, L2-normalised features (DINO protocol).

  python -m medfm_jax.evaluate --config=configs/eval/knn.py:tiny \
      --config.init_from=runs/mae_tiny --workdir=runs/eval/knn_mae_tiny

Variants: tiny | vit_b16; append ``,key=value`` pairs to override fields. Empty init_from = random init.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval import base  # noqa: E402  (config files are loaded by path)


def get_config(arg: str | None = None):
  return base.eval_config("knn", arg)
