"""FLAVA (Singh et al., 2022): image ViT, BERT-like text encoder, multimodal fusion encoder, heads.

``Flava`` holds a plain :class:`~medfm_jax.models.vit.VisionTransformer` at ``params/image`` (built
with a learned ``mask_token`` for MIM), a bidirectional :class:`~medfm_jax.models.text.TextTransformer`
at ``params/text`` (cls pooling, padding keys masked, ``embed_norm``), and

* ``multimodal``: ``[mm_cls, image_to_mm(image states), text_to_mm(text states)]`` -> pre-LN
  :class:`~medfm_jax.models.vit.Encoder` (text padding masked out as keys) -> final LN. There are no
  position embeddings in the fusion encoder (as HF / torchmultimodal: the unimodal towers added them).
* ``image_projection`` / ``text_projection``: contrastive heads (with bias) on the LN'd cls states;
  ``logit_scale`` (raw; the objective clamps it).
* ``mim_head`` / ``mmm_image_head`` (``image_vocab`` outputs) and ``mlm_head`` / ``mmm_text_head``
  (``text_vocab``): dense -> activation -> LN -> decoder with bias (HF ``FlavaMaskedPredictionHead``);
  image heads use the image tower's activation / LN eps, text heads the text tower's.
* ``itm_head``: pooler (dense + tanh on the mm cls state) -> linear 2-way.

Which states feed the fusion encoder: FLAVA (torchmultimodal and HF) projects the last block's
output *before* the towers' final LN (``encode_image(..., return_pre_norm=True)[1]``); the final-LN'd
states feed the contrastive, MIM and MLM heads. :meth:`Flava.__call__` wires it that way.

Fused sequence layout (:func:`split_fused`): ``[mm_cls, image cls, N patches, L text tokens]``;
MMM-image predicts from the N patch rows (HF: ``[:, 2:2+N]``), MMM-text from the L text rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medfm_jax.models import layers, vit
from medfm_jax.models import text as text_lib
from medfm_jax.models.layers import DenseGeneral, LayerNorm, constrain

MIM_TARGETS = ("pixels", "codebook")


class MaskedPredictionHead(nn.Module):
  """``[..., d] -> [..., vocab]`` float32: dense(d) -> activation -> LN -> decoder (with bias)."""
  vocab: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = DenseGeneral((x.shape[-1],), ("embed", "mlp"), dtype=self.dtype, name="dense")(x)
    h = LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(layers.ACTIVATIONS[self.activation](h))
    return DenseGeneral((self.vocab,), ("embed", "vocab"), dtype=self.dtype, name="decoder")(h).astype(jnp.float32)


class ItmHead(nn.Module):
  """Fused states ``[b, n, d]`` -> ``[b, 2]`` float32: tanh(dense(mm cls)) -> linear (match = 1)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, mm_hidden):
    pooled = jnp.tanh(DenseGeneral((mm_hidden.shape[-1],), ("embed", "mlp"), dtype=self.dtype,
                                   name="pooler")(mm_hidden[:, 0]))
    return DenseGeneral((2,), ("mlp", None), dtype=self.dtype, name="classifier")(pooled).astype(jnp.float32)


class FusionEncoder(nn.Module):
  """``[b, n, width]`` projected unimodal states + key mask ``[b, n]`` -> ``[b, 1+n, width]``:
  a learned cls token is prepended, then pre-LN blocks and a final LN.

  The cls token is initialised N(0, 0.02), not zeros as in HF / torchmultimodal: the fusion encoder
  adds no position embedding, so a zero token enters the first LayerNorm as an all-zero row, whose
  gradient is scaled by 1/sqrt(eps) = 1e6 (eps 1e-12); that one gradient then dominates global-norm
  clipping and stalls every other parameter (measured: ITM gradient norm 7e5 at init, vs <= 21 for
  every other tower). Imported weights are unaffected."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool = True):
    b = x.shape[0]
    cls = layers.param_with_axes(self, "cls_token", nn.initializers.normal(0.02), (1, 1, self.width),
                                 (None, None, "embed"))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(self.dtype), x], axis=1)
    x = constrain(x, ("batch", "seq", "act_embed"))
    mask = jnp.concatenate([jnp.ones((b, 1), bool), key_mask], axis=1)[:, None, None, :]
    x = vit.Encoder(self.depth, self.num_heads, self.mlp_dim, self.layer_norm_eps,
                    activation=self.activation, dtype=self.dtype, remat=self.remat, scan=self.scan,
                    attention_impl=self.attention_impl, name="encoder")(x, deterministic, mask)
    return LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)


def split_fused(mm_hidden: jnp.ndarray, num_image_tokens: int):
  """Fused states ``[b, 1 + num_image_tokens + L, d]`` -> ``(mm_cls [b, d], image [b,
  num_image_tokens, d] (image cls first), text [b, L, d])``."""
  return mm_hidden[:, 0], mm_hidden[:, 1:1 + num_image_tokens], mm_hidden[:, 1 + num_image_tokens:]


class Flava(nn.Module):
  """FLAVA; see the module docstring. Every method works via ``model.apply(vars, ..., method=...)``."""
  image: vit.VisionTransformer
  text: text_lib.TextTransformer
  mm_width: int
  mm_depth: int
  mm_heads: int
  mm_mlp_dim: int
  embed_dim: int
  image_vocab: int
  text_vocab: int
  layer_norm_eps: float = 1e-12      # fusion encoder
  activation: str = "gelu"           # fusion encoder
  dtype: Any = jnp.float32
  init_logit_scale: float = math.log(1 / 0.07)

  def setup(self):
    if not self.image.mask_token:
      raise ValueError("Flava: the image tower must be built with mask_token=True (MIM)")
    if self.text.causal or self.text.pooling != "cls":
      raise ValueError(f"Flava: the text tower must be bidirectional with cls pooling, got "
                       f"causal={self.text.causal}, pooling={self.text.pooling!r}")
    dense = lambda n, bias=True: DenseGeneral((n,), ("embed", "mlp"), use_bias=bias, dtype=self.dtype)
    self.image_projection = dense(self.embed_dim)
    self.text_projection = dense(self.embed_dim)
    self.image_to_mm = dense(self.mm_width)
    self.text_to_mm = dense(self.mm_width)
    self.multimodal = FusionEncoder(self.mm_width, self.mm_depth, self.mm_heads, self.mm_mlp_dim,
                                    self.layer_norm_eps, self.activation, self.dtype, self.image.remat,
                                    self.image.scan, self.image.attention_impl)
    img = dict(activation=self.image.activation, layer_norm_eps=self.image.layer_norm_eps, dtype=self.dtype)
    txt = dict(activation=self.text.activation, layer_norm_eps=self.text.layer_norm_eps, dtype=self.dtype)
    self.mim_head = MaskedPredictionHead(self.image_vocab, **img)
    self.mmm_image_head = MaskedPredictionHead(self.image_vocab, **img)
    self.mlm_head = MaskedPredictionHead(self.text_vocab, **txt)
    self.mmm_text_head = MaskedPredictionHead(self.text_vocab, **txt)
    self.itm_head = ItmHead(self.dtype)
    self.logit_scale = layers.param_with_axes(self, "logit_scale",
                                              nn.initializers.constant(self.init_logit_scale), (), ())

  def encode_image(self, images, patch_mask=None, deterministic: bool = True,
                   return_pre_norm: bool = False):
    """``images [b, H, W, c]`` -> final-LN'd states ``[b, 1+N, D]`` (cls first); ``patch_mask [b, N]``
    (True = replaced by the mask token). ``return_pre_norm``: ``(states, pre-final-LN states)``."""
    return self.image(images, deterministic=deterministic, patch_mask=patch_mask,
                      return_pre_norm=return_pre_norm)

  def encode_text(self, tokens, deterministic: bool = True, return_pre_norm: bool = False,
                  attention_mask=None):
    """``tokens [b, L]`` -> final-LN'd states ``[b, L, Dt]``; ``return_pre_norm`` as encode_image;
    ``attention_mask [b, L]`` (nonzero = real token): the padding (see ``text.TextTransformer``)."""
    _, x, pre = self.text(tokens, deterministic=deterministic, return_pre_norm=True,
                          attention_mask=attention_mask)
    return (x, pre) if return_pre_norm else x

  def image_embedding(self, image_hidden):
    """Unnormalised contrastive embedding ``[b, E]`` float32 of the cls state."""
    return constrain(self.image_projection(image_hidden[:, 0]).astype(jnp.float32), ("batch", None))

  def text_embedding(self, text_hidden):
    return constrain(self.text_projection(text_hidden[:, 0]).astype(jnp.float32), ("batch", None))

  def fuse(self, image_hidden, text_hidden, tokens, deterministic: bool = True, attention_mask=None):
    """``[mm_cls, image_to_mm(image_hidden), text_to_mm(text_hidden)]`` -> ``[b, 1+(1+N)+L, Dm]``.

    Pass the towers' pre-final-LN states for FLAVA / HF behaviour (see the module docstring).
    Masked text keys: ``attention_mask == 0`` when given, else ``tokens == text.pad_id`` when the
    text tower masks padding.
    """
    b, n_img = image_hidden.shape[:2]
    x = jnp.concatenate([self.image_to_mm(image_hidden), self.text_to_mm(text_hidden)], axis=1)
    if attention_mask is not None:
      text_keys = attention_mask.astype(bool)
    else:
      text_keys = (tokens != self.text.pad_id) if self.text.mask_padding else jnp.ones(tokens.shape, bool)
    key_mask = jnp.concatenate([jnp.ones((b, n_img), bool), text_keys], axis=1)
    return self.multimodal(x.astype(self.dtype), key_mask, deterministic)

  def mim_logits(self, image_hidden):
    return self.mim_head(image_hidden)

  def mlm_logits(self, text_hidden):
    return self.mlm_head(text_hidden)

  def mmm_image_logits(self, mm_hidden):
    return self.mmm_image_head(mm_hidden)

  def mmm_text_logits(self, mm_hidden):
    return self.mmm_text_head(mm_hidden)

  def itm_logits(self, mm_hidden):
    """``[b, 2]`` from the fused states (their row 0 is the mm cls)."""
    return self.itm_head(mm_hidden)

  def scale(self):
    """The raw (unclamped) logit scale, a float32 scalar."""
    return self.logit_scale

  def __call__(self, images, tokens, patch_mask=None, deterministic: bool = True, attention_mask=None):
    """One pass through every part (creates all params at init): a dict with ``image_hidden``,
    ``text_hidden``, ``mm_hidden``, ``image_embedding``, ``text_embedding``, ``mim_logits``,
    ``mlm_logits``, ``mmm_image_logits`` (patch rows), ``mmm_text_logits`` (text rows),
    ``itm_logits``, ``logit_scale``."""
    image_hidden, image_pre = self.encode_image(images, patch_mask, deterministic, return_pre_norm=True)
    text_hidden, text_pre = self.encode_text(tokens, deterministic, True, attention_mask)
    mm = self.fuse(image_pre, text_pre, tokens, deterministic, attention_mask)
    _, mm_image, mm_text = split_fused(mm, image_hidden.shape[1])
    return dict(image_hidden=image_hidden, text_hidden=text_hidden, mm_hidden=mm,
                image_embedding=self.image_embedding(image_hidden),
                text_embedding=self.text_embedding(text_hidden),
                mim_logits=self.mim_logits(image_hidden), mlm_logits=self.mlm_logits(text_hidden),
                mmm_image_logits=self.mmm_image_logits(mm_image[:, 1:]),
                mmm_text_logits=self.mmm_text_logits(mm_text),
                itm_logits=self.itm_logits(mm), logit_scale=self.scale())


# ---------------------------------------------------------------------------------------------
# sizes and construction from a config

@dataclasses.dataclass(frozen=True)
class FlavaSize:
  image_variant: str                          # ViT "NAME/PATCH"
  image: tuple[int, int, int, int]            # width, depth, heads, mlp_dim
  text: text_lib.TextSize
  multimodal: tuple[int, int, int, int]       # width, depth, heads, mlp_dim
  embed_dim: int
  codebook_size: int                          # discrete MIM target vocabulary


VARIANTS = {
    # CPU tests / demos (byte tokenizer: 259 ids + its [MASK] id 259 -> 260).
    "tiny": FlavaSize("Mu/8", (64, 2, 4, 256),
                      dataclasses.replace(text_lib.VARIANTS["tiny"], vocab_size=260, causal=False,
                                          pooling="cls", layer_norm_eps=1e-12),
                      (64, 1, 4, 256), 64, 512),
    # FLAVA paper / HF facebook/flava-full: ViT-B/16, 12-layer 768 text (BERT vocab), 6-layer 768
    # multimodal, 768-d embeddings, DALL-E codebook of 8192.
    "full": FlavaSize("B/16", tuple(vit.VARIANTS["B"]), text_lib.VARIANTS["flava"], (768, 6, 12, 3072),
                      768, 8192),
}


def model_fields(variant: str) -> dict[str, Any]:
  """Every ``config.model`` field :func:`build_flava` reads, for ``VARIANTS[variant]`` (nested dict:
  the ViT fields, ``text``, ``multimodal``, ``embed_dim``)."""
  if variant not in VARIANTS:
    raise ValueError(f"FLAVA variant {variant!r}: allowed {sorted(VARIANTS)}")
  s = VARIANTS[variant]
  w, d, h, m = s.image
  mw, md, mh, mm = s.multimodal
  text = dict(variant="flava" if variant == "full" else "tiny", **dataclasses.asdict(s.text),
              mask_padding=True, embed_norm=True)
  return dict(variant=s.image_variant, width=w, depth=d, num_heads=h, mlp_dim=m, pos_embed="learned",
              layer_norm_eps=1e-12, activation="gelu", mask_token=True, text=text,
              multimodal=dict(width=mw, depth=md, num_heads=mh, mlp_dim=mm, layer_norm_eps=1e-12,
                              activation="gelu"),
              embed_dim=s.embed_dim, image_vocab=0)


def image_vocab_from_config(config) -> int:
  """``model.image_vocab`` if > 0, else from ``objective.mim_target``: 'pixels' -> patch*patch*channels,
  'codebook' -> ``objective.codebook_size``."""
  explicit = int(config.model.get("image_vocab", 0) or 0)
  if explicit > 0:
    return explicit
  objective = config.get("objective") or {}
  target = objective.get("mim_target", "pixels")
  if target == "pixels":
    return vit.size_from_config(config.model).patch_size ** 2 * int(config.data.get("channels", 3))
  if target == "codebook":
    size = int(objective.get("codebook_size", 0) or 0)
    if size <= 0:
      raise ValueError(f"objective.codebook_size={size}: a positive codebook size is needed for "
                       "objective.mim_target='codebook'")
    return size
  raise ValueError(f"objective.mim_target={target!r}: allowed {MIM_TARGETS}")


def build_flava(config, tokenizer) -> Flava:
  """The FLAVA model of ``config.model`` (text ids from ``tokenizer``: ``eot_id``, ``pad_id``)."""
  m = config.model
  mm = m.get("multimodal")
  missing = [k for k in ("width", "depth", "num_heads", "mlp_dim") if not mm or not mm.get(k)]
  if missing:
    raise ValueError(f"model.multimodal.{missing[0]}: FLAVA needs positive model.multimodal."
                     "{width,depth,num_heads,mlp_dim}")
  if int(m.get("embed_dim", 0) or 0) <= 0:
    raise ValueError(f"model.embed_dim={m.get('embed_dim')}: must be a positive integer")
  image = vit.vit_from_config(config).clone(mask_token=True)
  text = text_lib.text_from_config(config, tokenizer.eot_id, tokenizer.pad_id)
  mask_id = getattr(tokenizer, "mask_id", None)
  if mask_id is not None and text.vocab_size <= mask_id:
    raise ValueError(f"model.text.vocab_size={text.vocab_size}: the tokenizer's [MASK] id is {mask_id}, "
                     f"so MLM needs a text vocabulary of at least {mask_id + 1}")
  objective = config.get("objective") or {}
  return Flava(image, text, mm_width=int(mm.width), mm_depth=int(mm.depth), mm_heads=int(mm.num_heads),
               mm_mlp_dim=int(mm.mlp_dim), embed_dim=int(m.embed_dim),
               image_vocab=image_vocab_from_config(config), text_vocab=text.vocab_size,
               layer_norm_eps=float(mm.get("layer_norm_eps", 1e-12)),
               activation=mm.get("activation", "gelu"), dtype=vit.COMPUTE_DTYPES[config.dtype],
               init_logit_scale=float(objective.get("init_logit_scale", math.log(1 / 0.07))))
