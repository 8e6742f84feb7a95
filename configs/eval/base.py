"""Shared fields of the evaluation configs (``configs/eval/*.py``).

``eval_config(protocol, arg)`` builds on ``configs/common.py``: the encoder (``model.*``, taken
from the checkpoint's config when ``init_from`` is set), the labelled data (``data.label``,
``data.eval_split``), frozen-feature extraction (``features.*``), the per-protocol fields
(``probe.*``, ``knn.*``, ``fewshot.*``) and the supervised objective used by fine-tuning.
Variants: ``tiny`` (ViT-Mu/4 on 32x32 1-channel phantoms, the CPU demo) | ``vit_b16``.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (config files are loaded by path)


def eval_config(protocol: str, arg: str | None, default_variant: str = "tiny",
                extra_variants: dict | None = None) -> ml_collections.ConfigDict:
  """The eval config of ``protocol``; ``extra_variants`` maps variant -> fn(config) (applied after
  the size variant ``tiny``)."""
  variant, overrides = common.parse_arg(arg, default_variant)
  c = common.base_config()
  c.protocol = protocol
  c.init_from = ""                  # workdir/checkpoint of any pretraining objective; '' = random init
  c.encoder_weights = "default"     # DINO: 'teacher' (default) | 'student'

  # Encoder: the architecture fields are replaced by the checkpoint's when init_from is set.
  c.model.variant = "B/16"
  c.model.width = c.model.depth = c.model.num_heads = c.model.mlp_dim = 0
  c.model.pos_embed = "sincos2d"
  c.model.layer_norm_eps = 1e-6
  c.model.layer_scale_init = 0.0
  c.model.num_registers = 0
  c.model.activation = "gelu"
  c.model.swiglu = False
  c.model.ln_pre = False                # CLIP towers: LayerNorm before the blocks
  c.model.patch_embed = "patch"         # 'patch' | 'conv' (ViT-C stem)
  c.model.cls_pool = "token"            # 'token' | 'max' | 'mean'
  c.model.drop_path = 0.0
  c.model.remat = "none"
  c.model.scan = False
  c.model.attention_impl = "auto"
  c.model.num_prompts = 0           # prompt tuning: learned tokens after cls
  c.model.adapter_dim = 0           # bottleneck adapters in every block
  c.model.adapter_where = "both"    # 'attn' | 'mlp' | 'both'

  # phantoms: 'finding' (6 classes) | 'modality' (4) | 'lesion_present' (2) | 'lesion_location' (4
  # quadrants) | 'lesion_size' (3); docs/benchmark.md
  c.data.label = "finding"
  c.data.eval_split = "test"
  c.data.eval_examples = 2000
  c.data.eval_batch_size = 256
  c.data.image_size, c.data.channels = 224, 3
  c.data.crop_scale = (0.5, 1.0)    # fine-tuning augmentation (lesions must stay in the crop)

  # input: 'encoder' (frozen features) | 'pixels' (flattened raw pixels: a task's linear floor)
  c.features = ml_collections.ConfigDict(dict(input="encoder", pool="cls", train_examples=10000,
                                              batch_size=256))
  # labels_per_class: the label budget of the linear probe and of finetune (rows per class drawn
  # with probe.seed from the first features.train_examples train records), 0 = all
  c.probe = ml_collections.ConfigDict(dict(epochs=90, batch_size=256, lr=1e-3, optimizer="adam",
                                           weight_decay=0.0, seed=0, labels_per_class=0))
  c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07))
  # seg_probe: a phantom mask class (lesion | body | organ); balanced = inverse-frequency class
  # weights in the per-pixel cross-entropy (the lesion is ~1% of the pixels)
  c.seg_probe = ml_collections.ConfigDict(dict(mask="lesion", balanced=True))
  c.fewshot = ml_collections.ConfigDict(dict(shots=10, seeds=5, classifier="ridge", ridge_lambda=1.0,
                                             logistic_steps=300, logistic_lr=1e-2,
                                             logistic_weight_decay=1e-3))

  # Fine-tuning = the shared trainer with the supervised objective.
  c.objective.name = "supervised"
  c.objective.scheme = "full"       # full | last_n | linear_probe | lora | prompt | adapter
  c.objective.last_n = 2
  c.objective.layer_decay = 0.0     # MAE layer-wise lr decay (0.65 for B), 0 = off
  c.objective.pool = "cls"          # 'cls' | 'mean' (+ fc_norm)
  c.objective.head_init_std = 0.01
  c.objective.label_smoothing = 0.0
  c.objective.lora_rank = 8
  c.objective.lora_alpha = 16.0
  c.objective.lora_rslora = False
  c.objective.lora_dropout = 0.0
  c.objective.lora_targets = (r".*/attn/query/kernel$", r".*/attn/value/kernel$")
  c.batch_size, c.lr, c.lr_scaling = 256, 1e-3, "none"
  c.total_steps, c.warmup_steps = 5000, 500
  c.weight_decay, c.grad_clip = 0.05, 1.0
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.log_every, c.eval_every, c.checkpoint_every = 100, 1000, 1000

  extra_variants = extra_variants or {}
  if variant == "tiny" or variant in extra_variants:
    c.model.variant = "Mu/4"
    c.data.image_size, c.data.channels, c.data.num_workers = 32, 1, 0
    c.data.lesion_scale = 2.0       # lesions of 2-13 px across at 32 px: the benchmark tasks
    c.data.eval_examples, c.data.eval_batch_size = 1024, 128
    c.features.train_examples, c.features.batch_size = 4096, 256
    c.batch_size, c.total_steps, c.warmup_steps = 64, 300, 30
    c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 300
    if variant in extra_variants:
      extra_variants[variant](c)
  elif variant == "vit_b16":
    c.model.variant = "B/16"
    c.data.num_workers = 16
  else:
    raise ValueError(f"configs/eval ({protocol}): unknown variant {variant!r}; allowed: "
                     f"{['tiny', 'vit_b16', *extra_variants]}")
  common.apply_overrides(c, overrides)
  return c
