r"""Fine-tuning through the shared trainer (supervised objective): the variant is the scheme.

  python -m medfm_jax.evaluate --config=configs/eval/finetune.py:lora \
      --config.init_from=runs/mae_tiny --workdir=runs/eval/lora_mae_tiny

Variants (tiny scale; add ``,model.variant=B/16,...`` or start from vit_b16 for ViT-B/16):
  full (layer-wise lr decay 0.75) | last_n (last 2 blocks) | linear_probe | lora (r=8, q/v) |
  prompt (8 prompt tokens) | adapter (bottleneck 16, after attention and MLP) | vit_b16 (full) |
  full_spatial, lora_spatial: for labels that image geometry changes (``lesion_location``,
  ``lesion_size``): no flips or random crops (they would move or enlarge the lesion but keep its
  label), mean-pooled tokens, no layer-wise lr decay; the recipe of docs/benchmark.md's
  label-efficiency fine-tuning.
Writes WORKDIR/finetune (train run), WORKDIR/export (plain merged checkpoint), results.{json,md}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval import base  # noqa: E402  (config files are loaded by path)


def _scheme(name, lr, **model):
  def apply(c):
    c.objective.scheme = name
    c.lr = lr
    for k, v in model.items():
      c.model[k] = v
    if name == "full":
      c.objective.layer_decay = 0.75
  return apply


def _spatial(scheme):
  def apply(c):
    scheme(c)
    c.data.flip = False
    c.data.crop_scale = c.data.crop_ratio = (1.0, 1.0)
    c.objective.pool = "mean"
    c.objective.layer_decay = 0.0
  return apply


VARIANTS = {
    "full": _scheme("full", 1e-3),
    "last_n": _scheme("last_n", 1e-3),
    "linear_probe": _scheme("linear_probe", 1e-2),
    "lora": _scheme("lora", 3e-3),
    "prompt": _scheme("prompt", 1e-2, num_prompts=8),
    "adapter": _scheme("adapter", 3e-3, adapter_dim=16),
}
VARIANTS.update(full_spatial=_spatial(VARIANTS["full"]), lora_spatial=_spatial(VARIANTS["lora"]))


def get_config(arg: str | None = None):
  return base.eval_config("finetune", arg, default_variant="full", extra_variants=VARIANTS)
