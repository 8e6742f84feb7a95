"""CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) image-text pretraining, and LiT.

Model: :class:`medfm_jax.models.clip.ImageTextModel` (ViT image tower ``params/image``, text
transformer ``params/text``, projections, ``logit_scale`` and for SigLIP ``logit_bias``). Batches:
``image [b, H, W, C]`` and ``tokens int32 [b, L]`` (captions tokenized in the grain workers, see
``data.tokenizer``). Loss: :func:`clip_losses.contrastive_loss` over the global batch (each device
builds only its ``[local, global]`` block of logits). Neither scale nor bias gets weight decay
(the optimizer decays only ``kernel`` leaves). With gradient accumulation the negatives are those
of each microbatch.

LiT (Zhai et al., 2022): ``objective.lit_init_from`` = a workdir/checkpoint of any objective that
declares ``image_encoders`` (MAE, DINO, supervised, CLIP, ...): the image tower is initialised from
it (partial restore, by the loader the trainer hands in) and locked: no gradient, no update, no optimizer state; the text tower and both
projections train.

Eval hook (:meth:`ClipObjective.evaluate`): zero-shot classification of ``objective.zero_shot_labels``
(phantoms) and image<->text retrieval recall@1/5/10 on the first ``data.eval_examples`` of
``data.eval_split``. :func:`evaluate_image_text` runs the same evaluation on any image-text
objective (the ``zero_shot`` protocol of ``medfm_jax.evaluate`` uses it on a checkpoint).
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from medfm_jax.data import spec as data_spec
from medfm_jax.data import tokenizers
from medfm_jax.errors import ConfigError, check, config_errors
from medfm_jax.metrics import over_split, retrieval, zero_shot
from medfm_jax.models import clip as clip_model
from medfm_jax.models import text, vit
from medfm_jax.objectives import base, clip_losses, supervised
from medfm_jax.parallel import mesh as mesh_lib


def build_model(config, tokenizer) -> clip_model.ImageTextModel:
  """The image-text model of ``config.model`` (text ids from ``tokenizer``)."""
  m, o = config.model, config.objective
  siglip = o.get("loss", "clip") == "siglip"
  bias = o.get("init_logit_bias", -10.0) if siglip else None
  return clip_model.ImageTextModel(
      vit.vit_from_config(config), text.text_from_config(config, tokenizer.eot_id, tokenizer.pad_id),
      embed_dim=int(m.embed_dim), image_pool=m.get("image_pool", "cls"),
      image_proj=m.get("image_proj", True), text_proj_bias=m.get("text_proj_bias", False),
      text_proj=m.get("text_proj", "linear"),
      init_logit_scale=float(o.get("init_logit_scale", float(np.log(1 / 0.07)))),
      init_logit_bias=None if bias is None else float(bias))


class ImageTextObjective(base.Objective):
  """Shared by the objectives with an image and a text embedding (CLIP/SigLIP, FLAVA): zero-shot
  and retrieval evaluation. Subclasses set ``self.text_spec`` (the CaptionTokenizer) and define
  ``_embed_pairs_fn(params, images, tokens) -> (image emb, text emb)`` and
  ``_embed_tokens_fn(params, tokens) -> text emb``, then call :meth:`_jit_embedders`."""
  image_text = True

  @classmethod
  def check_config(cls, config):
    """``objective.zero_shot_labels``: phantom labels, or labels whose class names the source has."""
    d = config.data
    for label in config.objective.get("zero_shot_labels", ()):
      check(label in over_split.LABELS, f"objective.zero_shot_labels={tuple(config.objective.zero_shot_labels)}: "
            f"allowed labels {over_split.LABELS}")
      if d.source != "phantoms":   # class names come from the source (as for fine-tuning)
        try:
          _class_names(d, label)
        except ValueError as e:
          raise ConfigError(f"objective.zero_shot_labels: {e} (set objective.zero_shot_labels=() "
                            "for caption-only data)") from None

  def _jit_embedders(self):
    replicated = PartitionSpec()
    self._embed_pairs = jax.jit(self._embed_pairs_fn, out_shardings=replicated)
    self._embed_tokens = jax.jit(self._embed_tokens_fn, out_shardings=replicated)

  def _embed_pairs_fn(self, params, images, tokens):
    raise NotImplementedError

  def _embed_tokens_fn(self, params, tokens):
    raise NotImplementedError

  def embed_texts(self, params, texts: list[str], mesh) -> np.ndarray:
    """Text embeddings ``[n, e]`` (unnormalised) of host strings, computed over the mesh."""
    tokens = tokenizers.tokenize(self.text_spec.tokenizer(), texts, self.text_spec.context_length)
    rows = -(-len(tokens) // jax.device_count()) * jax.device_count()   # pad to split evenly
    padded = np.full((rows, tokens.shape[1]), self.text_spec.pad_id, np.int32)
    padded[:len(tokens)] = tokens
    with mesh_lib.use_mesh(mesh):
      sharded = jax.device_put(padded, mesh_lib.batch_sharding(mesh, 2))
      return np.asarray(self._embed_tokens(params, sharded))[:len(tokens)]

  def embed_split(self, params, mesh, split: str, num_examples: int):
    """(image embeddings ``[n, e]``, text embeddings ``[n, e]``, {label: ``[n]``}) of the first
    ``num_examples`` records of ``split`` (captions as the texts); identical on every process."""
    d = self.data
    (imgs, txts), labels = over_split.map_over_split(
        d, mesh, lambda batch: self._embed_pairs(params, batch["image"], batch["tokens"]), split,
        num_examples, d.eval_batch_size, keys=("image", "tokens"))
    return imgs, txts, labels

  def evaluate(self, params, extra, mesh, step):
    del extra, step
    return evaluate_image_text(self, params, mesh, self.data.eval_split, self.data.eval_examples,
                               tuple(self.config.objective.get("zero_shot_labels", over_split.LABELS)))


class ClipObjective(ImageTextObjective):
  """``config.objective``: loss ('clip' | 'siglip'), init_logit_scale, init_logit_bias,
  max_logit_scale, lit_init_from, lit_encoder_weights, zero_shot_labels;
  ``config.model``: the ViT fields + embed_dim, image_pool, image_proj, text_proj_bias, text.*;
  ``config.data``: tokenizer, tokenizer_path, context_length."""
  name = "clip"
  image_encoders = {"image": ("params", "image")}
  hf_export = ("clip", ("params",))

  @classmethod
  def check_config(cls, config):
    """The contrastive loss, the image pooling/projection, the text tower and its tokenizer."""
    o, m, d = config.objective, config.model, config.data
    check(o.loss in clip_losses.LOSSES, f"objective.loss={o.loss!r}: allowed {clip_losses.LOSSES}")
    check(0 < o.max_logit_scale, f"objective.max_logit_scale={o.max_logit_scale}: must be > 0")
    check(m.image_pool in clip_model.IMAGE_POOLS, f"model.image_pool={m.image_pool!r}: allowed {clip_model.IMAGE_POOLS}")
    check(m.image_pool == "map" or m.get("class_token", True),
          "model.class_token=False needs model.image_pool='map' (no cls token to pool)")
    check(isinstance(m.embed_dim, int) and m.embed_dim > 0, f"model.embed_dim={m.embed_dim!r}: must be a positive integer")
    width = vit.size_from_config(m).width
    check(m.image_proj or m.embed_dim == width,
          f"model.embed_dim={m.embed_dim}: with model.image_proj=False it must equal the image width {width}")
    text_proj = m.get("text_proj", "linear")
    check(text_proj in clip_model.TEXT_PROJS, f"model.text_proj={text_proj!r}: allowed {clip_model.TEXT_PROJS}")
    check(text_proj == "linear" or not m.get("text_proj_bias", False),
          f"model.text_proj_bias=True: only with model.text_proj='linear' (not {text_proj!r})")
    with config_errors():
      t = text.text_size(m.text)
      spec = data_spec.resolve(d).tokenizer
      tok = spec.tokenizer() if spec is not None else None
    check(spec is not None, f"data.tokenizer={d.get('tokenizer')!r}: the CLIP objective needs one of {tokenizers.KINDS}")
    check(t.pooling in text.POOLINGS, f"model.text.pooling={t.pooling!r}: allowed {text.POOLINGS}")
    check(t.width % t.num_heads == 0, f"model.text.num_heads={t.num_heads}: must divide model.text.width={t.width}")
    check(text_proj != "none" or m.embed_dim == t.width,
          f"model.embed_dim={m.embed_dim}: with model.text_proj='none' it must equal model.text.width={t.width}")
    check(0 < spec.context_length <= t.context_length,
          f"data.context_length={spec.context_length}: must be in [1, model.text.context_length={t.context_length}]")
    check(tok.vocab_size <= t.vocab_size,
          f"model.text.vocab_size={t.vocab_size}: smaller than the {spec.kind!r} tokenizer's vocabulary ({tok.vocab_size})")
    check(t.pooling != "eot" or tok.eot_id is not None,
          f"model.text.pooling='eot': the {spec.kind!r} tokenizer has no end-of-text token")
    super().check_config(config)

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    o = config.objective
    self.kind = o.get("loss", "clip")
    self.text_spec = self.data.tokenizer
    self.model = build_model(config, self.text_spec)
    self.max_logit_scale = float(o.get("max_logit_scale", clip_losses.MAX_LOGIT_SCALE))
    self.lit = bool(o.get("lit_init_from", ""))
    self._pretrained = None
    if self.lit:
      self._pretrained = self.pretrained_encoder(self.model.image, o.lit_init_from,
                                                 o.get("lit_encoder_weights", "default"))
    self._jit_embedders()

  def init(self, rng, batch):
    params = dict(self.model.init(rng, batch["image"], batch["tokens"])["params"])
    if self._pretrained is not None:
      params["image"] = base.overwrite_params(params["image"], self._pretrained)
    return params, {}

  def trainable(self, params):
    """LiT: everything but the image tower (``params/image``); otherwise everything."""
    return {k: jax.tree.map(lambda _, k=k: not (self.lit and k == "image"), v)
            for k, v in params.items()}

  def _params(self, params):
    if not self.lit:
      return params
    return dict(params, image=jax.lax.stop_gradient(params["image"]))

  def loss(self, params, extra, batch, rng, step):
    del step
    p = self._params(params)
    img, txt = self.model.apply({"params": p}, batch["image"], batch["tokens"],
                                deterministic=False, rngs={"dropout": rng})
    scale, bias = p["logit_scale"], p.get("logit_bias")
    loss = clip_losses.contrastive_loss(img, txt, scale, bias, self.kind, self.max_logit_scale)
    metrics = {"logit_scale": clip_losses.clamp_logit_scale(scale, self.max_logit_scale)}
    if bias is not None:
      metrics["logit_bias"] = bias
    return loss, (metrics, extra)

  # ---- evaluation -------------------------------------------------------------------------

  def _embed_pairs_fn(self, params, images, tokens):
    return self.model.apply({"params": params}, images, tokens)

  def _embed_tokens_fn(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method=clip_model.ImageTextModel.encode_text)

def evaluate_image_text(objective: ImageTextObjective, params, mesh, split: str, num_examples: int,
                        labels=over_split.LABELS, detailed: bool = False) -> dict:
  """Zero-shot (``zero_shot_{label}_{accuracy,balanced_accuracy,macro_auroc}`` per label; phantom
  prompts, or class-name templates elsewhere) and retrieval (``i2t_r@k``, ``t2i_r@k``) scalars.
  With ``detailed`` also ``zero_shot_{label}`` = the full metrics dict (per-class rows)."""
  d = objective.config.data
  img, txt, y = objective.embed_split(params, mesh, split, num_examples)
  out = retrieval.recall_at_k(img, txt)
  embed = lambda texts: objective.embed_texts(params, texts, mesh)
  for label in labels:
    names = () if d.source == "phantoms" else _class_names(d, label)
    prompts = zero_shot.class_prompts(d.source, label, names)
    known = y[label] >= 0                     # file sources mark unlabelled rows with -1
    m = zero_shot.zero_shot_metrics(img[known], y[label][known], prompts, embed)
    for k in ("accuracy", "balanced_accuracy", "macro_auroc"):
      out[f"zero_shot_{label}_{k}"] = m[k]
    if detailed:
      out[f"zero_shot_{label}"] = m
  return out


def _class_names(data_cfg, label: str) -> tuple[str, ...]:
  """Class names of ``label`` for ``data_cfg``'s source (``supervised.class_names``)."""
  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  data_cfg.label = label
  return supervised.class_names(data_cfg)
