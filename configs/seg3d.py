r"""3D segmentation fine-tuning (UNETR decoder on a volumetric ViT, Dice + CE) on labelled volumes.

Tiny CPU run on 8 labelled 3D phantoms, the encoder restored from a tiny 3D MAE run:

  python -m medfm_jax.main --config=configs/mae3d.py:tiny --workdir=runs/mae3d_tiny
  python -m medfm_jax.main --config=configs/seg3d.py:tiny --workdir=runs/seg3d_tiny \
      --config.init_from=runs/mae3d_tiny

Whole-volume sliding-window Dice / HD95 per structure: ``configs/eval/segment3d.py``.
Variants: tiny | primus_m; append ``,key=value`` pairs to override fields.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (config files are loaded by path)
from configs import mae3d  # noqa: E402
from medfm_jax.data import phantoms3d  # noqa: E402


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  c = mae3d.get_config("tiny" if variant == "tiny" else "primus_m")
  del c.objective.mask_ratio, c.objective.mask_block, c.objective.norm_pix_loss, c.objective.recon_examples
  del c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads
  c.init_from = ""                        # a mae3d workdir/checkpoint; '' = random init
  c.encoder_weights = "default"
  c.objective.name = "seg3d"
  c.objective.num_classes = phantoms3d.NUM_CLASSES
  c.objective.structures = ("background", "organ_1", "organ_2", "lesion")   # phantoms: see STRUCTURES
  c.objective.decoder = "unetr"          # 'unetr' | 'primus' (tokens only, models/patch_decoder.py)
  c.objective.feature_size = 16           # UNETR's full-resolution width
  c.objective.dice_weight = 1.0
  c.objective.encoder_lr_mult = 1.0       # encoder lr / decoder lr (0 = frozen encoder)
  c.data.volume.labels = True
  c.data.volume.foreground_prob = 0.33    # nnU-Net's oversampling of foreground crops
  c.data.volume.train_volumes = 0         # few-shot: the first N labelled train volumes (0 = all)
  c.lr, c.warmup_steps, c.weight_decay = 1e-4, 50, 0.01
  if variant == "tiny":
    c.objective.feature_size = 8
    c.data.volume.train_volumes = 8
    c.batch_size, c.lr = 4, 1e-3
    c.total_steps, c.warmup_steps = 150, 15
    c.data.eval_examples, c.data.eval_batch_size = 16, 8
    c.log_every, c.eval_every, c.checkpoint_every = 25, 75, 150
  elif variant != "primus_m":
    raise ValueError(f"configs/seg3d.py: unknown variant {variant!r}; allowed: tiny, primus_m")
  common.apply_overrides(c, overrides)
  return c
