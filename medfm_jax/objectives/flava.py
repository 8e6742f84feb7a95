"""FLAVA (Singh et al., 2022): contrastive, masked image / language / multimodal modelling and
image-text matching, on mixed unimodal and paired batches.

Model: :class:`medfm_jax.models.flava.Flava`. Batches (``data.tokenizer``, ``data.mlm``,
``data.patch_masks`` and optionally ``data.mix`` set; everything is made in the grain workers):
``image``, ``tokens`` (clean captions), ``mlm_tokens`` / ``mlm_labels`` (BERT-masked, -1 = not
predicted), ``patch_mask [b, N]`` (BEiT block masks) and, with ``data.mix``, ``has_image`` /
``has_text`` (paired = both; without ``data.mix`` every row is paired).

Which rows feed which loss (each weighted by ``objective.weights.<name>``, default 1):

=============  ======================================================================  =========
term           computed from                                                           rows
=============  ======================================================================  =========
contrastive    clean image / text cls embeddings, global batch, scale clamped          paired
mim            masked image states -> ``mim_head`` at masked patches                    image-only
mlm            masked text states -> ``mlm_head`` at masked tokens                      text-only
itm            fused masked pairs, a fraction replaced by hard negatives -> 2-way       paired
mmm_image      fused masked pairs -> ``mmm_image_head`` at masked patches              positives
mmm_text       fused masked pairs -> ``mmm_text_head`` at masked tokens                positives
=============  ======================================================================  =========

MIM / MMM-image targets (``objective.mim_target``): ``'pixels'``: MAE's per-patch normalised pixels
(``norm_pix``), MSE; ``'codebook'``: ids of the nearest centroid of a user-supplied VQ codebook
(``objective.codebook_path``, see :mod:`medfm_jax.models.codebook`; the paper's DALL-E dVAE is one
such tokenizer), cross-entropy. Every term averages over its own selection and is exactly 0, with a
finite zero gradient, when a batch has none (no masked token, no negative, no unimodal row).

ITM negatives (``objective.itm_negatives``: ``'hard'``, ALBEF-style, the default; ``'random'``:
uniform over the other paired rows, an ablation): a fraction ``objective.itm_negative_fraction`` of the paired
rows is made negative; half of them (by a per-row coin) keep their image and take a text drawn with
probability ``softmax(similarity)`` over the other paired rows' texts, the other half keep their text
and take a drawn image. Similarities come from the clean contrastive embeddings (no gradient) over the
global batch, excluding rows with an identical caption (a true match, frequent in templated
captions); the chosen partners' masked states are gathered from the global batch, so the draw and
the result do not depend on the mesh. A row with no other paired row stays positive.

Compute: all four tower passes (clean and masked image and text) and the fusion encoder run on every
row (static shapes under ``jit``); the rows a loss does not use are masked out of it.

Eval: zero-shot classification and retrieval through the contrastive heads (shared with CLIP), and
per batch ``itm_accuracy`` (each pair against its own caption and against the next row's caption, if
different), ``itm_ranking_accuracy`` (how often the own caption scores a higher match margin than
the next row's: threshold-free, chance 0.5), ``mlm_loss``, ``mim_loss`` and ``mmm_*`` losses on fixed eval masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medfm_jax.data import spec as data_spec
from medfm_jax.data import tokenizers
from medfm_jax.errors import check, config_errors
from medfm_jax.models import codebook as codebook_lib
from medfm_jax.models import flava as flava_model
from medfm_jax.models import vit
from medfm_jax.objectives import base, clip_losses
from medfm_jax.objectives import flava_losses as losses
from medfm_jax.objectives.clip import ImageTextObjective

TERMS = ("contrastive", "mim", "mlm", "itm", "mmm_image", "mmm_text")
ITM_NEGATIVES = ("hard", "random")


class FlavaObjective(ImageTextObjective):
  """``config.objective``: weights.{contrastive,mim,mlm,itm,mmm_image,mmm_text}, mim_target
  ('pixels' | 'codebook'), norm_pix, codebook_path, itm_negatives, itm_negative_fraction, init_logit_scale,
  max_logit_scale, zero_shot_labels; ``config.model``: see :func:`models.flava.build_flava`."""

  name = "flava"
  image_encoders = {"image": ("params", "image")}
  hf_export = ("flava", ("params",))
  hf_optional_heads = ("mim_head", "mmm_image_head", "mlm_head", "mmm_text_head", "itm_head")

  @classmethod
  def check_config(cls, config):
    """The tokenizer, the masked inputs (``data.mlm``, ``data.patch_masks``: only FLAVA needs both),
    loss weights, MIM target and ITM negatives."""
    o = config.objective
    with config_errors():
      d = data_spec.resolve(config.data)
    check(d.tokenizer is not None,
          f"data.tokenizer={config.data.get('tokenizer')!r}: the FLAVA objective needs one of {tokenizers.KINDS}")
    for field in ("mlm", "patch_masks"):
      check(getattr(d, field) is not None, f"data.{field}: FLAVA needs masked inputs (e.g. data.mlm=dict(probability=0.15) "
            "and data.patch_masks=dict(patch_size=P, probability=1.0, ratio=(0.4, 0.4)))")
    weights = dict(o.get("weights", {}) or {})
    unknown = sorted(set(weights) - set(TERMS))
    check(not unknown, f"objective.weights has unknown terms {unknown}: allowed {TERMS}")
    check(min(weights.values(), default=0.0) >= 0, f"objective.weights={weights}: weights must be >= 0")
    target = o.get("mim_target", "pixels")
    check(target in flava_model.MIM_TARGETS, f"objective.mim_target={target!r}: allowed {flava_model.MIM_TARGETS}")
    check(target != "codebook" or bool(o.get("codebook_path")),
          "objective.codebook_path: objective.mim_target='codebook' needs a VQ codebook .npz "
          "(python -m medfm_jax.models.codebook --config=... --out=codebook.npz)")
    fraction = float(o.get("itm_negative_fraction", 0.5))
    check(0.0 <= fraction <= 1.0, f"objective.itm_negative_fraction={fraction}: must be in [0, 1]")
    negatives = o.get("itm_negatives", "hard")
    check(negatives in ITM_NEGATIVES, f"objective.itm_negatives={negatives!r}: allowed {ITM_NEGATIVES}")
    super().check_config(config)

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    o = config.objective
    self.text_spec = self.data.tokenizer
    weights = dict(o.get("weights", {}) or {})
    self.weights = {t: float(weights.get(t, 1.0)) for t in TERMS}
    self.mim_target = o.get("mim_target", "pixels")
    self.codebook = None
    if self.mim_target == "codebook":
      self.codebook = codebook_lib.load_codebook(o.codebook_path)
      config.objective.codebook_size = self.codebook.size
    self.patch = vit.size_from_config(config.model).patch_size
    if self.codebook is not None and self.codebook.patch_size != self.patch:
      raise ValueError(f"objective.codebook_path={o.codebook_path!r}: codebook patch size "
                       f"{self.codebook.patch_size} != the model's patch size {self.patch}")
    self.norm_pix = bool(o.get("norm_pix", True))
    self.negative_fraction = float(o.get("itm_negative_fraction", 0.5))
    self.itm_negatives = o.get("itm_negatives", "hard")
    self.max_logit_scale = float(o.get("max_logit_scale", clip_losses.MAX_LOGIT_SCALE))
    self.model = flava_model.build_flava(config, self.text_spec)
    self._jit_embedders()

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["image"], batch["tokens"], batch["patch_mask"])
    return variables["params"], {}

  # ---- losses -----------------------------------------------------------------------------

  def _image_targets(self, images):
    """``(pixel patches [b, N, P] or codebook ids [b, N])`` of the clean images."""
    if self.codebook is not None:
      return codebook_lib.patch_ids(images, self.codebook)
    return vit.patchify(images.astype(jnp.float32), self.patch)

  def _image_term(self, logits, targets, mask):
    if self.codebook is not None:
      return losses.mim_codebook_loss(logits, targets, mask)
    return losses.mim_pixel_loss(logits, targets, mask, self.norm_pix)

  def _itm_partners(self, image_emb, text_emb, scale, paired, tokens, rng):
    """Per row: (image row, text row, ITM label): hard negatives for a fraction of the paired rows
    (never a row whose caption is identical to the row's own: that pair would match)."""
    b = paired.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    pick_rng, side_rng, i2t_rng, t2i_rng = jax.random.split(rng, 4)
    if self.itm_negatives == "hard":
      sim = scale * jnp.matmul(clip_losses.l2_normalize(image_emb),
                               clip_losses.l2_normalize(text_emb).T, precision=jax.lax.Precision.HIGHEST)
    else:                                                   # uniform over the other paired rows
      sim = jnp.zeros((b, b), jnp.float32)
    same = losses.same_sequences(tokens)
    neg_text, has_text_neg = losses.sample_hard_negatives(sim, paired, rows, i2t_rng, same)
    neg_image, has_image_neg = losses.sample_hard_negatives(sim.T, paired, rows, t2i_rng, same)
    negative = paired & (jax.random.uniform(pick_rng, (b,)) < self.negative_fraction)
    swap_text = jax.random.bernoulli(side_rng, 0.5, (b,))
    negative = negative & jnp.where(swap_text, has_text_neg, has_image_neg)
    image_rows = jnp.where(negative & ~swap_text, neg_image, rows)
    text_rows = jnp.where(negative & swap_text, neg_text, rows)
    return image_rows, text_rows, (~negative).astype(jnp.int32)

  def _forward(self, params, batch, rng, deterministic):
    """Every loss term and metric of one batch -> (dict of terms, dict of metrics)."""
    m, b = self.model, batch["image"].shape[0]
    ones = jnp.ones((b,), bool)
    has_image, has_text = batch.get("has_image", ones), batch.get("has_text", ones)
    paired = has_image & has_text
    drop_rng, itm_rng = jax.random.split(rng)

    def run(module):
      image = module.encode_image(batch["image"], None, deterministic)
      text = module.encode_text(batch["tokens"], deterministic)
      image_emb, text_emb = module.image_embedding(image), module.text_embedding(text)
      masked_image, masked_image_pre = module.encode_image(batch["image"], batch["patch_mask"],
                                                           deterministic, return_pre_norm=True)
      masked_text, masked_text_pre = module.encode_text(batch["mlm_tokens"], deterministic,
                                                        return_pre_norm=True)
      scale = clip_losses.clamp_logit_scale(module.scale(), self.max_logit_scale)
      image_rows, text_rows, itm_labels = self._itm_partners(image_emb, text_emb, scale, paired,
                                                                 batch["tokens"], itm_rng)
      fused = module.fuse(jnp.take(masked_image_pre, image_rows, axis=0),
                          jnp.take(masked_text_pre, text_rows, axis=0),
                          jnp.take(batch["mlm_tokens"], text_rows, axis=0), deterministic)
      _, mm_image, mm_text = flava_model.split_fused(fused, masked_image.shape[1])
      return dict(image_emb=image_emb, text_emb=text_emb, raw_scale=module.scale(),
                  mim=module.mim_logits(masked_image[:, 1:]), mlm=module.mlm_logits(masked_text),
                  itm=module.itm_logits(fused), itm_labels=itm_labels,
                  mmm_image=module.mmm_image_logits(mm_image[:, 1:]),
                  mmm_text=module.mmm_text_logits(mm_text))

    out = m.apply({"params": params}, method=run, rngs={"dropout": drop_rng})
    targets = self._image_targets(batch["image"])
    patch_mask = batch["patch_mask"].astype(bool)
    mlm_labels = batch["mlm_labels"]
    positive = paired & (out["itm_labels"] == 1)
    image_only, text_only = has_image & ~has_text, has_text & ~has_image
    terms = {
        "contrastive": clip_losses.contrastive_loss(out["image_emb"], out["text_emb"], out["raw_scale"],
                                                    kind="clip", max_logit_scale=self.max_logit_scale,
                                                    valid=paired),
        "mim": self._image_term(out["mim"], targets, patch_mask & image_only[:, None]),
        "mlm": losses.mlm_loss(out["mlm"], mlm_labels, (mlm_labels >= 0) & text_only[:, None]),
        "itm": losses.itm_loss(out["itm"], out["itm_labels"], paired),
        "mmm_image": self._image_term(out["mmm_image"], targets, patch_mask & positive[:, None]),
        "mmm_text": losses.mlm_loss(out["mmm_text"], mlm_labels, (mlm_labels >= 0) & positive[:, None]),
    }
    metrics = {
        "itm_accuracy": losses.masked_accuracy(out["itm"], out["itm_labels"], paired),
        "itm_negative_fraction": losses.safe_mean(jnp.sum(paired & ~(out["itm_labels"] == 1),
                                                          dtype=jnp.float32),
                                                  jnp.sum(paired, dtype=jnp.float32)),
        "logit_scale": clip_losses.clamp_logit_scale(out["raw_scale"], self.max_logit_scale),
    }
    return terms, metrics

  def loss(self, params, extra, batch, rng, step):
    del step
    terms, metrics = self._forward(params, batch, rng, deterministic=False)
    total = sum(self.weights[t] * terms[t] for t in TERMS if self.weights[t] > 0)
    metrics.update({f"{t}_loss": v for t, v in terms.items()})
    return total, (metrics, extra)

  def eval_metrics(self, params, extra, batch, rng):
    """Per-row ITM accuracy and ranking against the own and the next row's caption, and the masked-modelling
    losses of the eval batch's fixed masks (every real row is used as image, text and pair)."""
    del extra, rng
    m, real = self.model, batch["mask"].astype(bool)
    tokens, mlm_tokens, patch_mask = batch["tokens"], batch["mlm_tokens"], batch["patch_mask"]
    other = jnp.roll(jnp.arange(tokens.shape[0]), -1)
    distinct = real & real[other] & jnp.any(tokens != tokens[other], axis=-1)

    def run(module):
      _, image_pre = module.encode_image(batch["image"], None, return_pre_norm=True)
      _, text_pre = module.encode_text(tokens, return_pre_norm=True)
      pos = module.itm_logits(module.fuse(image_pre, text_pre, tokens))
      neg = module.itm_logits(module.fuse(image_pre, text_pre[other], tokens[other]))
      masked_image = module.encode_image(batch["image"], patch_mask)
      masked_text = module.encode_text(mlm_tokens)
      return pos, neg, module.mim_logits(masked_image[:, 1:]), module.mlm_logits(masked_text)

    pos, neg, mim, mlm = m.apply({"params": params}, method=run)
    hit_pos = (jnp.argmax(pos, -1) == 1).astype(jnp.float32)
    hit_neg = (jnp.argmax(neg, -1) == 0).astype(jnp.float32)
    targets = self._image_targets(batch["image"])
    labels = batch["mlm_labels"]
    per_row_mim = jax.vmap(lambda l, t, k: self._image_term(l[None], t[None], k[None]))(
        mim, targets, patch_mask.astype(bool))
    per_row_mlm = jax.vmap(lambda l, y: losses.mlm_loss(l[None], y[None]))(mlm, labels)
    margin = lambda logits: logits[:, 1] - logits[:, 0]
    ranked = (margin(pos) > margin(neg)).astype(jnp.float32)
    return {
        "itm_accuracy": (jnp.sum(jnp.where(real, hit_pos, 0.0)) + jnp.sum(jnp.where(distinct, hit_neg, 0.0)),
                         jnp.sum(real, dtype=jnp.float32) + jnp.sum(distinct, dtype=jnp.float32)),
        "itm_ranking_accuracy": base.masked_sum(ranked, distinct),
        "mim_loss": base.masked_sum(per_row_mim, real & jnp.any(patch_mask, -1)),
        "mlm_loss": base.masked_sum(per_row_mlm, real & jnp.any(labels >= 0, -1)),
    }

  # ---- zero-shot / retrieval embeddings (ImageTextObjective) ------------------------------

  def _embed_pairs_fn(self, params, images, tokens):
    def run(module):
      return (module.image_embedding(module.encode_image(images)),
              module.text_embedding(module.encode_text(tokens)))
    return self.model.apply({"params": params}, method=run)

  def _embed_tokens_fn(self, params, tokens):
    return self.model.apply({"params": params}, method=lambda module: module.text_embedding(
        module.encode_text(tokens)))

