r"""3D segmentation evaluation: fine-tune a UNETR decoder (and the encoder) on N labelled volumes
through the shared trainer (objective 'seg3d'), then segment whole volumes of the eval split with
Gaussian-weighted sliding windows and report Dice and HD95 per structure.

  python -m medfm_jax.evaluate --config=configs/eval/segment3d.py:tiny \
      --config.init_from=runs/mae3d_tiny --workdir=runs/eval/segment3d_mae3d_tiny

An empty ``init_from`` is the random-init baseline. ``data.volume.train_volumes`` is the few-shot N.
Variants: tiny | fewshot | fewshot_primus | primus_m. ``fewshot`` is the first learning-signal setup
of docs/volumes.md (issue 19 part 8): tiny, N = 2 labelled phantoms (one CT, one MRI), the encoder
frozen, 160 steps of batch 2 on the 32^3 crops the tiny 3D MAE was trained on, UNETR decoder.
``fewshot_primus`` is the same N and crops with the tokens-only Primus decoder
(``objective.decoder='primus'``, so the Dice depends on the encoder's features) and the whole
model fine-tuned, 600 steps at lr 2e-3. Writes WORKDIR/results.{json,md} and
WORKDIR/segment3d.png.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common, seg3d  # noqa: E402  (config files are loaded by path)
from configs.eval import base  # noqa: E402


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  variants = ("tiny", "fewshot", "fewshot_primus", "primus_m")
  if variant not in variants:
    raise ValueError(f"configs/eval/segment3d.py: unknown variant {variant!r}; allowed: {', '.join(variants)}")
  fewshot = variant in ("fewshot", "fewshot_primus")
  c = seg3d.get_config("tiny" if fewshot else variant)
  shared = base.eval_config("segment3d", "tiny")
  for key in ("features", "probe", "knn", "fewshot"):   # protocols.check_config reads them
    c[key] = shared[key]
  c.protocol = "segment3d"
  c.data.label = "finding"
  c.data.eval_split = "test"
  c.segment3d = ml_collections.ConfigDict(dict(overlap=0.5, mode="gaussian", sigma_scale=0.125, batch_size=4))
  if variant != "primus_m":
    c.data.eval_examples = 8              # whole 40^3 volumes, 32^3 windows
  if fewshot:
    c.data.volume.train_volumes = 2       # train volumes 0 (MRI) and 1 (CT)
    c.data.volume.foreground_prob = 0.67
    c.objective.encoder_lr_mult = 0.0     # frozen encoder: the decoder reads the init's features
    c.batch_size, c.total_steps, c.warmup_steps = 2, 160, 16
    c.eval_every, c.log_every, c.checkpoint_every = 0, 20, 160
    c.segment3d.batch_size = 8
  if variant == "fewshot_primus":
    c.objective.decoder = "primus"        # tokens only: no input skip, no full-resolution convs
    c.objective.encoder_lr_mult = 1.0     # frozen, a random encoder's tokens decode better than the MAE's
    c.lr, c.total_steps, c.warmup_steps = 2e-3, 600, 30
    c.log_every, c.checkpoint_every = 100, 600
  common.apply_overrides(c, overrides)
  return c
