r"""MAE ablation: mask ratio (MAE paper, Table 1a; x decoder depth, Table 1b, at vit_b16).

  python -m medfm_jax.sweeps --config=configs/sweeps/mae_mask_ratio.py:tiny --workdir=runs/mae_mask \
      --then_eval=configs/eval/linear_probe.py:tiny,data.label=lesion_location,features.pool=mean \
      --seeds=0,1
  python -m medfm_jax.sweeps.report runs/mae_mask

Variants: tiny (mask ratio 0.25 / 0.75 / 0.9, each the 600-step quick start configs/mae.py:tiny on
the benchmark phantoms, closing table off: 2.5-5 CPU-minutes a point; with 2 seeds the benchmark
linear probe does not separate them, docs/benchmark.md#ablations-issue-15-part-5) | vit_b16 (5 x 4
points of the paper recipe). ``VARIANT,k=v`` overrides go to every point's base config, e.g.
``tiny,total_steps=300``.
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
    # The sweep's then_eval scores each point; the closing table's random-init half would repeat.
    overrides = {"log_every": 25, "eval_every": 600, "checkpoint_every": 200, "final_eval.config": "",
                 **overrides}
    points = product({"objective.mask_ratio": [0.25, 0.75, 0.9]})
  elif variant == "vit_b16":
    base = "configs/mae.py:vit_b16"
    points = product({"objective.mask_ratio": [0.5, 0.6, 0.75, 0.85, 0.9],
                      "model.decoder_depth": [1, 2, 4, 8]})
  else:
    raise ValueError(f"configs/sweeps/mae_mask_ratio.py: unknown variant {variant!r}; allowed: tiny, vit_b16")
  return {"base": base_arg(base, overrides), "points": points}
