r"""DINO ablation: the teacher's EMA momentum (DINO paper: the momentum teacher), with the teacher's
entropy, its KL to uniform, the centre norm and kNN at the end of each run.

  python -m medfm_jax.sweeps --config=configs/sweeps/dino_teacher_momentum.py:tiny \
      --workdir=runs/dino_momentum --seeds=0,1 \
      --then_eval=configs/eval/linear_probe.py:tiny,data.label=lesion_location,features.pool=mean
  python -m medfm_jax.sweeps.report runs/dino_momentum

Variants: tiny (momentum 0.996 / 0.98, 200 steps of configs/dino.py:tiny, closing table off: about
3 CPU-minutes a point; after T steps the EMA keeps exp(-(1 - m) T / 2) of the random-init teacher,
67% at 0.996 and 14% at 0.98; docs/benchmark.md#ablations-issue-15-part-5) | vit_s16 (0.99 / 0.996
/ 0.999 on the paper recipe). ``VARIANT,k=v`` overrides go to every point's base config.
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
    overrides = {"total_steps": 200, "log_every": 20, "eval_every": 200, "checkpoint_every": 100,
                 "final_eval.config": "", **overrides}
    points = product({"objective.momentum_teacher": [0.996, 0.98]})
  elif variant == "vit_s16":
    base = "configs/dino.py:vit_s16"
    points = product({"objective.momentum_teacher": [0.99, 0.996, 0.999]})
  else:
    raise ValueError(f"configs/sweeps/dino_teacher_momentum.py: unknown variant {variant!r}; "
                     "allowed: tiny, vit_s16")
  return {"base": base_arg(base, overrides), "points": points}
