r"""DINO self-distillation (Caron et al., 2021) of a ViT on medical images.

Tiny CPU run on the embedded phantoms:

  python -m medfm_jax.main --config=configs/dino.py:tiny --workdir=runs/dino_tiny

Paper recipe (ViT-S/16, B/16) on a pod or GPU box:

  python -m medfm_jax.main --config=configs/dino.py:vit_b16 --workdir=gs://BUCKET/dino_b16 \
      --config.mesh.fsdp=8 --config.dtype=bfloat16

Variants: tiny | vit_s16 | vit_b16; append ``,key=value`` pairs to override fields.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (config files are loaded by path)

_IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 1024


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  c = common.base_config()
  c.objective.name = "dino"
  c.objective.out_dim = 65536
  c.objective.head_hidden_dim = 2048
  c.objective.head_bottleneck_dim = 256
  c.objective.norm_last_layer = True
  c.objective.student_temp = 0.1
  c.objective.warmup_teacher_temp = 0.04
  c.objective.teacher_temp = 0.04                 # DINO ViT-S/16 default; 0.07 needs longer warmup
  c.objective.warmup_teacher_temp_steps = 30 * _IMAGENET_STEPS_PER_EPOCH
  c.objective.center_momentum = 0.9
  c.objective.momentum_teacher = 0.996
  c.objective.freeze_last_layer_steps = 1 * _IMAGENET_STEPS_PER_EPOCH
  c.objective.knn_train_examples = 2000           # kNN bank (phantom train split) at eval time

  c.model.variant = "S/16"
  c.model.width = c.model.depth = c.model.num_heads = c.model.mlp_dim = 0
  c.model.pos_embed = "learned"                   # interpolated for local crops
  c.model.layer_norm_eps = 1e-6
  c.model.drop_path = 0.1                         # student only
  c.model.layer_scale_init = 0.0
  c.model.remat = "none"
  c.model.scan = False
  c.model.attention_impl = "auto"

  # DINO recipe: AdamW, lr 5e-4 x B/256, 10 warmup epochs, wd 0.04 -> 0.4, clip 3.0 per tensor.
  c.batch_size = 1024
  c.lr, c.lr_scaling, c.min_lr = 5e-4, "linear", 1e-6
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.weight_decay, c.weight_decay_end = 0.04, 0.4
  c.grad_clip, c.grad_clip_mode = 3.0, "per_param"
  c.total_steps = 100 * _IMAGENET_STEPS_PER_EPOCH
  c.warmup_steps = 10 * _IMAGENET_STEPS_PER_EPOCH
  c.data.image_size, c.data.channels, c.data.num_workers = 224, 3, 16
  c.data.multicrop = ml_collections.ConfigDict(dict(
      num_global=2, global_size=224, global_scale=(0.4, 1.0), num_local=10, local_size=96,
      local_scale=(0.05, 0.4), ratio=(3.0 / 4.0, 4.0 / 3.0)))
  c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 5000

  if variant == "tiny":
    c.model.variant = "Mu/4"
    c.objective.out_dim, c.objective.head_hidden_dim, c.objective.head_bottleneck_dim = 512, 256, 64
    c.objective.warmup_teacher_temp_steps, c.objective.freeze_last_layer_steps = 50, 20
    c.data.image_size, c.data.channels, c.data.num_workers = 32, 1, 0
    c.data.multicrop.update(global_size=32, num_local=4, local_size=16)
    c.data.eval_examples, c.data.eval_batch_size = 256, 64
    c.objective.knn_train_examples = 1024
    c.batch_size, c.lr = 32, 5e-4 * 8
    c.total_steps, c.warmup_steps = 200, 20
    c.log_every, c.eval_every, c.checkpoint_every = 20, 200, 200
  elif variant == "vit_s16":
    c.model.variant = "S/16"
  elif variant == "vit_b16":
    c.model.variant = "B/16"
    c.lr = 7.5e-4 * 256 / 1024                    # paper: 7.5e-4 at batch 1024
  else:
    raise ValueError(f"configs/dino.py: unknown variant {variant!r}; allowed: tiny, vit_s16, vit_b16")
  common.apply_overrides(c, overrides)
  return c
