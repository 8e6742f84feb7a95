"""CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) image-text pretraining, and LiT.

Model: :class:`medfm_jax.models.clip.ImageTextModel` (ViT image tower ``params/image``, text
transformer ``params/text``, projections, ``logit_scale`` and for SigLIP ``logit_bias``). Batches:
``image [b, H, W, C]`` and ``tokens int32 [b, L]`` (captions tokenized in the grain workers, see
``data.tokenizer``). Loss: :func:`clip_losses.contrastive_loss` over the global batch (each device
builds only its ``[local, global]`` block of logits). Neither scale nor bias gets weight decay
(the optimizer decays only ``kernel`` leaves). With gradient accumulation the negatives are those
of each microbatch.

LiT (Zhai et al., 2022): ``objective.lit_init_from`` = a workdir/checkpoint of any objective with a
registered image encoder (MAE, DINO, supervised, CLIP): the image tower is initialised from it
(partial restore) and locked: no gradient, no update, no optimizer state; the text tower and both
projections train.

Eval hook (:meth:`ClipObjective.evaluate`): zero-shot classification of ``objective.zero_shot_labels``
(phantoms) and image<->text retrieval recall@1/5/10 on the first ``data.eval_examples`` of
``data.eval_split``. :func:`evaluate_image_text` runs the same evaluation standalone.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec

from medfm_jax.data import tokenizers
from medfm_jax.evaluate import over_split, retrieval, zero_shot
from medfm_jax.models import clip as clip_model
from medfm_jax.models import text, vit
from medfm_jax.objectives import base, clip_losses
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
      init_logit_scale=float(o.get("init_logit_scale", float(np.log(1 / 0.07)))),
      init_logit_bias=None if bias is None else float(bias))


class ImageTextObjective(base.Objective):
  """Shared by the objectives with an image and a text embedding (CLIP/SigLIP, FLAVA): zero-shot
  and retrieval evaluation. Subclasses set ``self.text_spec`` (the CaptionTokenizer) and define
  ``_embed_pairs_fn(params, images, tokens) -> (image emb, text emb)`` and
  ``_embed_tokens_fn(params, tokens) -> text emb``, then call :meth:`_jit_embedders`."""

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
    d = self.config.data
    (imgs, txts), labels = over_split.map_over_split(
        d, mesh, lambda batch: self._embed_pairs(params, batch["image"], batch["tokens"]), split,
        num_examples, d.eval_batch_size, keys=("image", "tokens"))
    return imgs, txts, labels

  def evaluate(self, params, extra, mesh, step):
    del extra, step
    c = self.config
    return evaluate_image_text(self, params, mesh, c.data.eval_split, c.data.eval_examples,
                               tuple(c.objective.get("zero_shot_labels", ("finding", "modality"))))


class ClipObjective(ImageTextObjective):
  """``config.objective``: loss ('clip' | 'siglip'), init_logit_scale, init_logit_bias,
  max_logit_scale, lit_init_from, lit_encoder_weights, zero_shot_labels;
  ``config.model``: the ViT fields + embed_dim, image_pool, image_proj, text_proj_bias, text.*;
  ``config.data``: tokenizer, tokenizer_path, context_length."""

  def __init__(self, config):
    super().__init__(config)
    o = config.objective
    self.kind = o.get("loss", "clip")
    if self.kind not in clip_losses.LOSSES:
      raise ValueError(f"objective.loss={self.kind!r}: allowed {clip_losses.LOSSES}")
    self.text_spec = tokenizers.from_config(config.data)
    if self.text_spec is None:
      raise ValueError("data.tokenizer: the CLIP objective needs a tokenizer ('bytes', 'hf', 'sentencepiece')")
    self.model = build_model(config, self.text_spec)
    self.max_logit_scale = float(o.get("max_logit_scale", clip_losses.MAX_LOGIT_SCALE))
    self.lit = bool(o.get("lit_init_from", ""))
    self._pretrained = None
    if self.lit:
      from medfm_jax.evaluate import restore  # pylint: disable=g-import-not-at-top
      self._pretrained = restore.pretrained_encoder(self.model.image, config.data, o.lit_init_from,
                                                    o.get("lit_encoder_weights", "default"))
    self._jit_embedders()

  def init(self, rng, batch):
    params = dict(self.model.init(rng, batch["image"], batch["tokens"])["params"])
    if self._pretrained is not None:
      from medfm_jax.evaluate import restore  # pylint: disable=g-import-not-at-top
      params["image"] = restore.overwrite_params(params["image"], self._pretrained)
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
                        labels=("finding", "modality"), detailed: bool = False) -> dict:
  """Zero-shot (``zero_shot_{label}_{accuracy,balanced_accuracy,macro_auroc}`` per label; phantom
  prompts, or class-name templates elsewhere) and retrieval (``i2t_r@k``, ``t2i_r@k``) scalars.
  With ``detailed`` also ``zero_shot_{label}`` = the full metrics dict (per-class rows)."""
  d = objective.config.data
  img, txt, y = objective.embed_split(params, mesh, split, num_examples)
  out = retrieval.recall_at_k(img, txt)
  embed = lambda texts: objective.embed_texts(params, texts, mesh)
  for label in labels:
    names = ()
    if d.source != "phantoms":
      import ml_collections  # pylint: disable=g-import-not-at-top
      from medfm_jax.objectives import supervised  # pylint: disable=g-import-not-at-top
      data_cfg = ml_collections.ConfigDict(d.to_dict())
      data_cfg.label = label
      names = supervised.class_names(data_cfg)
    prompts = zero_shot.class_prompts(d.source, label, names)
    known = y[label] >= 0                     # file sources mark unlabelled rows with -1
    m = zero_shot.zero_shot_metrics(img[known], y[label][known], prompts, embed)
    for k in ("accuracy", "balanced_accuracy", "macro_auroc"):
      out[f"zero_shot_{label}_{k}"] = m[k]
    if detailed:
      out[f"zero_shot_{label}"] = m
  return out


IMAGE_TEXT_OBJECTIVES = ("clip", "flava")   # objectives whose checkpoints zero-shot classify


def load_checkpoint(init_from: str, mesh, data_overrides: dict | None = None):
  """(objective built from the checkpoint's own config, its params replicated on ``mesh``) of a
  CLIP/SigLIP or FLAVA checkpoint; ``data_overrides`` replace ``data.*`` fields (eval split, sizes)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from medfm_jax.evaluate import restore  # pylint: disable=g-import-not-at-top
  from medfm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from medfm_jax import objectives  # pylint: disable=g-import-not-at-top
  name, saved = restore.checkpoint_objective(init_from)
  if name not in IMAGE_TEXT_OBJECTIVES:
    raise ckpt_lib.CheckpointError(f"init_from={init_from!r}: checkpoint of objective {name!r}, "
                                   f"not an image-text checkpoint ({', '.join(IMAGE_TEXT_OBJECTIVES)})")
  config = ml_collections.ConfigDict(saved)
  config.data.update(data_overrides or {})
  if "lit_init_from" in config.objective:
    config.objective.lit_init_from = ""      # the saved params already hold the image tower
  objective = objectives.build(config)
  params = ckpt_lib.restore_subtree(init_from, ("params",))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, PartitionSpec()))
  return objective, params


def zero_shot_from_checkpoint(eval_config, mesh) -> dict:
  """The ``zero_shot`` evaluation protocol: zero-shot classification of ``data.label`` (plus
  retrieval recall@k) on ``data.eval_split`` with the checkpoint ``init_from``; the results dict of
  :mod:`medfm_jax.evaluate.results`."""
  d = eval_config.data
  objective, params = load_checkpoint(eval_config.init_from, mesh, {
      "eval_split": d.eval_split, "eval_examples": d.eval_examples, "eval_batch_size": d.eval_batch_size})
  out = evaluate_image_text(objective, params, mesh, d.eval_split, d.eval_examples, (d.label,),
                            detailed=True)
  summary = out.pop(f"zero_shot_{d.label}")
  for k in ("accuracy", "balanced_accuracy", "macro_auroc"):
    out.pop(f"zero_shot_{d.label}_{k}")
  return {"protocol": "zero_shot", "init_from": eval_config.init_from, "label": d.label,
          "split": d.eval_split, "metrics": summary, "retrieval": out}
