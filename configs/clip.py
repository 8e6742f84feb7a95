r"""CLIP / SigLIP / BiomedCLIP-like image-text pretraining (and LiT) on image-caption pairs.

Tiny CPU run on the embedded phantoms and their captions (byte-level tokenizer, no files):

  python -m medfm_jax.main --config=configs/clip.py:tiny --workdir=runs/clip_tiny
  python -m medfm_jax.main --config=configs/clip.py:tiny_siglip --workdir=runs/siglip_tiny

Recipes on a pod (image-caption manifest or TFDS data; only config values change):

  python -m medfm_jax.main --config=configs/clip.py:vit_b16 --workdir=gs://BUCKET/clip_b16 \
      --config.data.source=manifest --config.data.path=gs://BUCKET/pairs.csv \
      --config.data.tokenizer=hf --config.data.tokenizer_path=clip/tokenizer.json \
      --config.mesh.fsdp=8 --config.dtype=bfloat16

LiT: ``--config.objective.lit_init_from=runs/mae_b16`` (image tower restored and locked).

Variants: tiny | tiny_siglip (the tiny run with the sigmoid loss) | vit_b16 (OpenAI CLIP B/16) | siglip_b16 (SigLIP B/16) | biomedclip_b16
(BiomedCLIP's layout: timm ViT-B/16 + post-LN BERT-base text tower, texts of 256 tokens). The byte tokenizer is the default everywhere;
the real recipes name their tokenizer file via data.tokenizer / data.tokenizer_path.
"""
import math
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (config files are loaded by path)

from medfm_jax.models import text as text_lib  # noqa: E402


def _text(variant: str) -> ml_collections.ConfigDict:
  """``model.text``: the text variant with every size field explicit (override any of them)."""
  s = text_lib.VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      variant=variant, width=s.width, depth=s.depth, num_heads=s.num_heads, mlp_dim=s.mlp_dim,
      context_length=s.context_length, vocab_size=s.vocab_size, causal=s.causal,
      pooling=s.pooling, activation=s.activation, layer_norm_eps=s.layer_norm_eps,
      mask_padding=True, embed_norm=False, post_ln=False, pooler=False))


def get_config(arg: str | None = None):
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  c = common.base_config()
  c.objective.name = "clip"
  c.objective.loss = "clip"                 # 'clip' (softmax) | 'siglip' (sigmoid)
  c.objective.init_logit_scale = math.log(1 / 0.07)   # SigLIP: ln 10
  c.objective.init_logit_bias = -10.0       # SigLIP only
  c.objective.max_logit_scale = math.log(100.0)
  c.objective.lit_init_from = ""            # LiT: checkpoint whose image encoder is restored and locked
  c.objective.lit_encoder_weights = "default"
  c.objective.zero_shot_labels = ("finding", "modality")

  # Image tower: the ViT fields (as configs/mae.py) + CLIP options.
  c.model.variant = "B/16"
  c.model.width = c.model.depth = c.model.num_heads = c.model.mlp_dim = 0
  c.model.layer_norm_eps = 1e-5
  c.model.pos_embed = "learned"
  c.model.activation = "quick_gelu"
  c.model.ln_pre = True
  c.model.class_token = True
  c.model.drop_path = 0.0
  c.model.layer_scale_init = 0.0
  c.model.remat = "none"
  c.model.scan = False
  c.model.attention_impl = "auto"
  c.model.patch_embed = "patch"             # 'patch' | 'conv' (ViT-C convolutional stem)
  c.model.cls_pool = "token"                # 'token' | 'max' | 'mean': what the cls output holds
  c.model.image_pool = "cls"                # 'cls' | 'map' (SigLIP attention pooling)
  c.model.image_proj = True
  c.model.text_proj_bias = False
  c.model.text_proj = "linear"              # 'linear' | 'mlp' (open_clip HF text towers) | 'none'
  c.model.embed_dim = 512
  c.model.text = _text("clip_b16")

  c.data.tokenizer = "bytes"                # 'bytes' | 'hf' (tokenizer.json) | 'sentencepiece'
  c.data.tokenizer_path = ""
  c.data.context_length = 77
  c.data.mean, c.data.std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
  c.data.crop_scale = (0.9, 1.0)            # CLIP: resize + centre crop; mild crops only
  c.data.flip = False                       # captions name locations (left/right)

  # OpenAI CLIP recipe: AdamW (0.9, 0.98, eps 1e-6), wd 0.2, lr 5e-4 at batch 32768, 2000 warmup
  # steps, cosine; 32 epochs of 400M pairs.
  c.batch_size = 32768
  c.lr, c.lr_scaling = 5e-4, "none"
  c.weight_decay = 0.2
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
  c.grad_clip = 0.0
  c.warmup_steps = 2000
  c.total_steps = 32 * 400_000_000 // 32768
  c.data.image_size, c.data.channels = 224, 3
  c.data.num_workers = 16
  c.data.eval_examples, c.data.eval_batch_size = 2000, 256
  c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 5000

  if variant in ("tiny", "tiny_siglip"):
    c.model.variant = "Mu/8"
    c.model.embed_dim = 64
    c.model.text = _text("tiny")
    common.tiny_image_text(c)
    # Phantom findings are small local lesions: a plain patchify ViT pooled at its cls token stays
    # at chance on them at this scale. A convolutional stem (ViT-C), max-pooled patch tokens in the
    # cls slot and LayerScale 0.1 let the tiny tower learn them (see the README).
    c.model.patch_embed, c.model.cls_pool, c.model.layer_scale_init = "conv", "max", 0.1
    c.total_steps, c.warmup_steps = 1000, 50
    c.grad_clip = 1.0
    c.log_every, c.eval_every, c.checkpoint_every = 50, 500, 500
    common.tiny_final_eval(c)
    if variant == "tiny_siglip":
      c.objective.loss, c.objective.init_logit_scale = "siglip", math.log(10.0)
  elif variant == "vit_b16":
    pass
  elif variant == "siglip_b16":
    # SigLIP B/16 (big_vision): no cls token, attention-pooling head, no image projection, text
    # pooled at the last position with a biased head, GELU(tanh), LN eps 1e-6, sigmoid loss with
    # t' = ln 10, b = -10; batch 32k, lr 1e-3, wd 1e-4.
    c.objective.loss = "siglip"
    c.objective.init_logit_scale = math.log(10.0)
    c.model.embed_dim = 768
    c.model.layer_norm_eps = 1e-6
    c.model.activation = "gelu_tanh"
    c.model.ln_pre = False
    c.model.class_token = False
    c.model.image_pool, c.model.image_proj, c.model.text_proj_bias = "map", False, True
    c.model.text = _text("clip_b16")
    c.model.text.update(width=768, num_heads=12, mlp_dim=3072, context_length=64, vocab_size=32000,
                        causal=False, pooling="last", activation="gelu_tanh", layer_norm_eps=1e-6,
                        mask_padding=False)
    c.data.context_length = 64
    c.data.mean, c.data.std = (0.5,), (0.5,)
    c.lr, c.weight_decay = 1e-3, 1e-4
    c.optim.b2, c.optim.eps = 0.95, 1e-8
    c.grad_clip = 1.0
  elif variant == "biomedclip_b16":
    # BiomedCLIP (open_clip layout): timm ViT-B/16 (GELU, LN eps 1e-6, no ln_pre) + PubMedBERT
    # (post-LN BERT-base: embedding LN, 512 positions, texts of 256, cls pooling, 'mlp' projection).
    c.model.activation, c.model.layer_norm_eps, c.model.ln_pre = "gelu", 1e-6, False
    c.model.text = _text("biomedclip")
    c.model.text.update(context_length=512, embed_norm=True, post_ln=True)
    c.model.text_proj = "mlp"
    c.data.context_length = 256
    c.model.embed_dim = 512
    c.batch_size = 4096
    c.lr = 5e-4
  else:
    raise ValueError(f"configs/clip.py: unknown variant {variant!r}; allowed: tiny, tiny_siglip, "
                     "vit_b16, siglip_b16, biomedclip_b16")
  common.apply_overrides(c, overrides)
  return c
