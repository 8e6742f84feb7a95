r"""Label efficiency (issue 15 part 2): one protocol at 10 / 100 / 1000 labels per class.

A sweep over an EVAL config: run it once per pretrained checkpoint (``--init_from``) and once from
random init (no ``--init_from``, ``--seeds`` = the init seeds), then report them together; the
report pairs each pretrained point with the random-init point of the same budget and protocol
(difference, its standard error, their ratio) and plots accuracy against the budget:

  for s in 0 1 2; do python -m medfm_jax.sweeps --config=configs/sweeps/label_efficiency.py:finetune_full \
      --workdir=runs/label_efficiency/full_mae_s$s --init_from=runs/mae_bench_s$s; done
  python -m medfm_jax.sweeps --config=configs/sweeps/label_efficiency.py:finetune_full \
      --workdir=runs/label_efficiency/full_random --seeds=0,1,2
  python -m medfm_jax.sweeps.report runs/label_efficiency/full_* --metric=accuracy

Variants, all on ``lesion_location`` (the benchmark task pretraining helps most; docs/benchmark.md)
with labels drawn (``probe.seed``) from the first 8192 train images: finetune_full /
finetune_lora (``configs/eval/finetune.py:full_spatial`` / ``lora_spatial``, 300 steps, about
150 CPU-s a point) | linear_probe (mean-pooled tokens, about 25 CPU-s a point).
``VARIANT,k=v`` overrides go to every point's base config, e.g. ``finetune_full,data.label=lesion_size``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)
from medfm_jax.sweeps.grid import base_arg, product  # noqa: E402

BASES = {
    "finetune_full": "configs/eval/finetune.py:full_spatial",
    "finetune_lora": "configs/eval/finetune.py:lora_spatial",
    "linear_probe": "configs/eval/linear_probe.py:tiny",
}
BUDGETS = [10, 100, 1000]


def get_sweep(arg=None):
  variant, overrides = common.parse_arg(arg, default_variant="finetune_full")
  if variant not in BASES:
    raise ValueError(f"configs/sweeps/label_efficiency.py: unknown variant {variant!r}; allowed: "
                     f"{', '.join(BASES)}")
  overrides = {"data.label": "lesion_location", "features.train_examples": 8192,
               **({"features.pool": "mean"} if variant == "linear_probe" else {}), **overrides}
  return {"base": base_arg(BASES[variant], overrides),
          "points": product({"probe.labels_per_class": BUDGETS})}
