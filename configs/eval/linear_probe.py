r"""Linear probe: frozen cls (or mean-pooled) features -> BatchNorm without affine -> linear (Adam/SGD), features extracted once.

  python -m medfm_jax.evaluate --config=configs/eval/linear_probe.py:tiny \
      --config.init_from=runs/mae_tiny --workdir=runs/eval/linear_probe_mae_tiny

Variants: tiny | vit_b16; append ``,key=value`` pairs to override fields. Empty init_from = random init.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval import base  # noqa: E402  (config files are loaded by path)


def get_config(arg: str | None = None):
  return base.eval_config("linear_probe", arg)
