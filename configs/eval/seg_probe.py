r"""Linear segmentation probe: frozen patch tokens -> BatchNorm without affine -> one linear layer per token -> bilinear upsampling to per-pixel logits, trained on the phantoms' lesion masks; Dice and mIoU.

  python -m medfm_jax.evaluate --config=configs/eval/seg_probe.py:tiny \
      --config.init_from=runs/mae_tiny --workdir=runs/eval/seg_probe_mae_tiny

Variants: tiny | vit_b16; append ``,key=value`` pairs to override fields (``seg_probe.mask``:
lesion | body | organ). Empty init_from = random init. The probe trains with ``probe.*``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval import base  # noqa: E402  (config files are loaded by path)


def get_config(arg: str | None = None):
  return base.eval_config("seg_probe", arg)
