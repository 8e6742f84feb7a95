r"""MAE pretraining (He et al., 2022) of a ViT on medical images.

Tiny CPU run on the embedded phantoms (a few minutes on 2 cores):

  python -m medfm_jax.main --config=configs/mae.py:tiny --workdir=runs/mae_tiny

Paper recipe (ViT-B/16, L/16, H/14) on a pod or GPU box, only config values change:

  python -m medfm_jax.main --config=configs/mae.py:vit_b16 --workdir=gs://BUCKET/mae_b16 \
      --config.mesh.fsdp=8 --config.dtype=bfloat16

Benchmark run (docs/benchmark.md): ``bench`` = ``tiny`` for 2000 steps (630 CPU-s measured, so
about 5 min on 2 quiet cores), the run that beats random init on lesion location by >= 5 points.

Variants: tiny | bench | vit_b16 | vit_l16 | vit_h14; append ``,key=value`` pairs to override fields.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (config files are loaded by path)

# MAE paper: 800 epochs of ImageNet-1k (1.28M images) at batch 4096, 40 warmup epochs.
_IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 4096


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  c = common.base_config()
  c.objective.name = "mae"
  c.objective.mask_ratio = 0.75
  c.objective.norm_pix_loss = True
  c.objective.visible_loss_weight = 0.0   # > 0: also reconstruct the visible patches (MAE: masked only)
  c.objective.encoder_tokens = "visible"  # 'all': mask tokens in the encoder (SimMIM; needs model.mask_token)
  c.model.mask_token = False              # the encoder's learned [MASK] embedding ('all' needs it)
  c.objective.recon_examples = 8          # images in the eval reconstruction PNG
  c.objective.knn_train_examples = 0      # > 0: kNN / few-shot monitor bank (labelled train images)

  c.model.variant = "B/16"                # encoder, see medfm_jax.models.vit.VARIANTS
  c.model.width = c.model.depth = c.model.num_heads = c.model.mlp_dim = 0   # 0 = the variant's
  c.model.layer_norm_eps = 1e-6
  c.model.pos_embed = "sincos2d"          # fixed, as in the paper
  c.model.drop_path = 0.0
  c.model.layer_scale_init = 0.0          # 0 disables LayerScale
  c.model.remat = "none"                  # 'none' | 'full' | 'dots'
  c.model.scan = False                    # nn.scan over blocks (faster compiles for deep models)
  # 'auto' (cuDNN flash on GPU in bf16, Pallas flash on TPU) | 'xla' | 'cudnn' | 'pallas'
  c.model.attention_impl = "auto"
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16

  # Paper recipe (defaults for the vit_* variants).
  c.batch_size = 4096
  c.lr = 1.5e-4
  c.lr_scaling = "linear"
  c.weight_decay = 0.05
  c.grad_clip = 0.0
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.total_steps = 800 * _IMAGENET_STEPS_PER_EPOCH
  c.warmup_steps = 40 * _IMAGENET_STEPS_PER_EPOCH
  c.data.image_size = 224
  c.data.channels = 3
  c.data.crop_scale = (0.2, 1.0)
  c.data.num_workers = 16
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 5000

  if variant in ("tiny", "bench"):
    c.model.variant = "Mu/4"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 64, 2, 4
    c.data.image_size, c.data.channels = 32, 1
    c.data.lesion_scale = 2.0             # the benchmark's lesions (docs/benchmark.md)
    c.data.num_workers = 0
    c.data.eval_examples, c.data.eval_batch_size = 256, 128
    c.batch_size = 64
    c.lr = 1.5e-4 * 16                    # effective 6e-4 at batch 64: short run, small model
    c.total_steps, c.warmup_steps = 600, 50
    c.log_every, c.eval_every, c.checkpoint_every = 50, 200, 200
    c.objective.knn_train_examples = 1024   # few-shot modality climbs from step 0 (docs/benchmark.md)
    common.tiny_final_eval(c)
    if variant == "bench":
      c.total_steps, c.warmup_steps = 2000, 100
      c.eval_every, c.checkpoint_every = 500, 500
  elif variant == "vit_b16":
    c.model.variant = "B/16"
  elif variant == "vit_l16":
    c.model.variant = "L/16"
  elif variant == "vit_h14":
    c.model.variant = "H/14"
  else:
    raise ValueError(f"configs/mae.py: unknown variant {variant!r}; allowed: tiny, bench, vit_b16, vit_l16, vit_h14")
  common.apply_overrides(c, overrides)
  return c
