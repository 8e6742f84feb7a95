r"""Adaptation ablation: LoRA rank of the fine-tuning protocol (a sweep over an EVAL config).

Each point fine-tunes the same pretrained checkpoint (``--init_from``) with LoRA on the query and
value projections at one rank, and writes results.json (accuracy, AUROC) into its folder:

  python -m medfm_jax.sweeps --config=configs/sweeps/lora_rank.py:tiny --workdir=runs/lora_rank \
      --init_from=runs/mae_tiny
  python -m medfm_jax.sweeps.report runs/lora_rank --metric=accuracy --metric=macro_auroc

Variants: tiny (ranks 1, 2, 4, 8; 100 steps of configs/eval/finetune.py:lora) | vit_b16 (ranks 1 to
64 on ViT-B/16). ``VARIANT,k=v`` overrides go to every point's base config.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)
from medfm_jax.sweeps.grid import base_arg, product  # noqa: E402


def get_sweep(arg=None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  if variant == "tiny":
    base = "configs/eval/finetune.py:lora"
    overrides = {"total_steps": 100, "warmup_steps": 10, "log_every": 10, "eval_every": 100,
                 "checkpoint_every": 50, **overrides}
    ranks = [1, 2, 4, 8]
  elif variant == "vit_b16":
    base = ("configs/eval/finetune.py:lora,model.variant='B/16',data.image_size=224,data.channels=3,"
            "data.num_workers=16")
    ranks = [1, 4, 8, 16, 64]
  else:
    raise ValueError(f"configs/sweeps/lora_rank.py: unknown variant {variant!r}; allowed: tiny, vit_b16")
  points = product({"objective.lora_rank": ranks})   # lora_alpha fixed (16): scale alpha/r
  return {"base": base_arg(base, overrides), "points": points}
