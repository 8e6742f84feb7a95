r"""Promptable segmentation: SAM / MedSAM prompt encoder and mask decoder on an image encoder.

Tiny CPU run on the phantoms' lesion masks (box prompts, MedSAM recipe, our ViT + neck; lesions
rendered at ``data.lesion_scale=2`` as in the phantom benchmark):

  python -m medfm_jax.main --config=configs/sam.py:tiny --workdir=runs/sam_tiny

Dice / IoU per prompt type (box, 1..5 points) and class on the test split, with overlays:

  python -m medfm_jax.evaluate --config=configs/eval/segment.py:tiny --config.init_from=runs/sam_tiny \
      --workdir=runs/eval/segment_sam_tiny

The same from the quick-start MAE checkpoint (``runs/mae_tiny``), encoder fine-tuned with LoRA:

  python -m medfm_jax.main --config=configs/sam.py:tiny_mae,objective.freeze=lora --workdir=runs/sam_mae

SAM's interactive recipe (a box or a point, then correction clicks) from the same MAE checkpoint:

  python -m medfm_jax.main --config=configs/sam.py:tiny_sam --workdir=runs/sam_points

Published recipes at 1024 px with SAM's own ViT-B encoder; point ``objective.sam_checkpoint`` at
``sam_vit_b_01ec64.pth`` or an HF ``facebook/sam-vit-base`` directory (and ``data.*`` at real data):

  python -m medfm_jax.main --config=configs/sam.py:medsam_vit_b --workdir=gs://BUCKET/medsam \
      --config.objective.sam_checkpoint=sam_vit_b_01ec64.pth --config.dtype=bfloat16

Variants: tiny | tiny_mae | tiny_sam | medsam_vit_b | sam_vit_b; append ``,key=value`` pairs to override.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (config files are loaded by path)


def _vit_b_1024(c) -> None:
  """What the published SAM and MedSAM recipes share: 1024 px RGB with ImageNet normalisation,
  AdamW b2 0.999, unscaled lr, 250 warmup steps, 16 loader workers."""
  c.data.image_size, c.data.channels = 1024, 3
  c.data.mean, c.data.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  c.lr_scaling, c.optim.b2, c.warmup_steps, c.data.num_workers = "none", 0.999, 250, 16


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  c = common.base_config()
  c.init_from = ""                        # our checkpoint whose image encoder starts objective.encoder='vit'
  c.encoder_weights = "default"
  o = c.objective
  o.name = "sam"
  o.recipe = "medsam"                     # 'medsam' (box, Dice + BCE) | 'sam' (clicks, focal:Dice 20:1, IoU MSE)
  o.encoder = "vit"                       # 'vit' (ours + conv neck) | 'vitdet' (SAM's encoder)
  o.freeze = "full"                       # image encoder: 'frozen' | 'lora' | 'full'
  o.freeze_prompt_encoder = True          # MedSAM freezes it; SAM trains it
  o.rounds = 1                            # prompt rounds per step (sam: 1 + correction clicks)
  o.eval_point_rounds = -1               # evals: one point + clicks up to this many points (-1: rounds if sam, else 0)
  o.box_prob = 0.5                        # sam: first prompt is a box with this probability, else a point
  o.focal_weight, o.dice_weight, o.bce_weight, o.iou_weight = 20.0, 1.0, 1.0, 0.0
  o.dice_smooth = 1.0                     # soft Dice (2 I + s) / (P + T + s); MedSAM (MONAI) 1e-5
  o.lora_rank, o.lora_alpha = 8, 16.0
  o.sam_checkpoint = ""                   # official SAM / MedSAM weights for encoder='vitdet'

  c.model.variant = "B/16"                # the image encoder's sizes (ViT or ViTDet)
  c.model.width = c.model.depth = c.model.num_heads = c.model.mlp_dim = 0   # 0 = the variant's
  c.model.remat = "none"
  c.model.attention_chunk = 0             # encoder='vitdet': > 0 = global attention N queries at a time (memory)
  # objective.encoder='vit': our ViT's fields, which init_from's checkpoint overwrites (main adopts
  # its architecture: a DINO run's learned positions, registers, LayerScale, ...).
  c.model.pos_embed, c.model.layer_norm_eps, c.model.layer_scale_init = "sincos2d", 1e-6, 0.0
  c.model.num_registers, c.model.patch_embed, c.model.cls_pool, c.model.swiglu = 0, "patch", "token", False
  c.model.activation, c.model.ln_pre = "gelu", False    # a CLIP image tower: quick_gelu, ln_pre
  c.model.sam = ml_collections.ConfigDict(dict(
      window_size=14, global_attn_indexes=(2, 5, 8, 11), prompt_dim=256, mask_in_chans=16,
      decoder_depth=2, decoder_heads=8, decoder_mlp_dim=2048, iou_head_hidden_dim=256,
      num_multimask_outputs=3))

  c.data.segment = ml_collections.ConfigDict(dict(classes=("lesion",), jitter=20.0, num_points=1,
                                                  num_neg_points=0,
                                                  train_examples=0))   # > 0: few-shot, the first N train images
  c.data.flip = True

  if variant in ("tiny", "tiny_mae", "tiny_sam"):
    c.model.variant = "Mu/4"              # the quick-start MAE encoder (configs/mae.py:tiny)
    c.model.sam.update(prompt_dim=64, decoder_heads=2, decoder_mlp_dim=128, iou_head_hidden_dim=64)
    c.data.image_size, c.data.channels, c.data.num_workers = 48, 1, 0
    c.data.lesion_scale = 2.0             # the benchmark's rendering (docs/benchmark.md), as configs/mae.py:tiny
    c.data.eval_examples, c.data.eval_batch_size = 256, 64
    c.batch_size, c.lr, c.weight_decay = 32, 1e-3, 0.01
    c.lr_scaling = "none"
    c.total_steps, c.warmup_steps = 1000, 100
    o.dice_smooth = 1e-5                  # MedSAM's; 1 hides 2-px lesions (docs/segmentation.md)
    c.log_every, c.eval_every, c.checkpoint_every = 50, 250, 500
    if variant in ("tiny_mae", "tiny_sam"):
      c.init_from = "runs/mae_tiny"       # python -m medfm_jax.main --config=configs/mae.py:tiny
    if variant == "tiny_sam":
      # SAM's recipe on the phantoms: a box or one point, 2 correction clicks per step; evals chain
      # one point and 4 clicks (Dice per round, docs/segmentation.md).
      o.recipe, o.freeze_prompt_encoder, o.rounds, o.eval_point_rounds, o.iou_weight = "sam", False, 3, 5, 1.0
      c.total_steps, c.eval_every = 1600, 400
  elif variant == "medsam_vit_b":
    # MedSAM (Ma et al., 2024): SAM ViT-B at 1024 px, box prompts shifted 0-20 px, Dice + BCE,
    # prompt encoder frozen, AdamW lr 1e-4, weight decay 0.01, batch 160.
    o.encoder = "vitdet"
    _vit_b_1024(c)
    c.batch_size, c.lr, c.weight_decay = 160, 1e-4, 0.01
    o.dice_smooth = 1e-5                  # MONAI DiceLoss, as MedSAM trains
    c.total_steps = 100_000
  elif variant == "sam_vit_b":
    # SAM (Kirillov et al., 2023): 11 rounds (a box or point, then clicks from the error region;
    # here every round adds a click), focal:Dice 20:1, IoU MSE, AdamW lr 8e-4, wd 0.1, batch 256.
    o.encoder, o.recipe, o.freeze_prompt_encoder = "vitdet", "sam", False
    o.rounds, o.iou_weight = 11, 1.0
    _vit_b_1024(c)
    c.batch_size, c.lr, c.weight_decay = 256, 8e-4, 0.1
    c.total_steps = 90_000
  else:
    raise ValueError(f"configs/sam.py: unknown variant {variant!r}; allowed: tiny, tiny_mae, tiny_sam, medsam_vit_b, sam_vit_b")
  common.apply_overrides(c, overrides)
  return c
