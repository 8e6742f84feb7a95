"""3D segmentation fine-tuning: a volumetric ViT encoder + a UNETR (``models.unetr``) or Primus
tokens-only (``models.patch_decoder``) decoder trained with Dice + cross-entropy on ``data.volume`` crops with label maps (``data.volume.labels=True``).

With ``config.init_from`` (e.g. a ``mae3d`` run) the encoder starts from the checkpoint's encoder
(the trainer's loader, as for the supervised objective); empty = random init. Held-out metrics:
the loss and the hard Dice per structure (``dice_<name>``) on the eval crops; whole-volume
sliding-window Dice and HD95 are the ``segment3d`` protocol's (``python -m medfm_jax.evaluate``).

Config: ``objective.decoder`` (``patch_decoder.DECODERS``: 'unetr' has a skip from the input volume
and conv skips from encoder blocks; 'primus' decodes the final tokens alone, so the result depends on
the encoder's features), ``objective.num_classes``, ``objective.feature_size`` (UNETR's width at
full resolution),
``objective.dice_weight`` (loss = CE + w * (1 - mean soft Dice over the foreground classes)),
``objective.structures`` (class names, background first), ``objective.encoder_lr_mult`` (the
encoder's lr relative to the decoder's; 0 freezes it: no update and no backward pass through it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfm_jax.errors import check, config_errors
from medfm_jax.models import patch_decoder, unetr, vit
from medfm_jax.objectives import base


def dice_ce_loss(logits, labels, num_classes: int, dice_weight: float = 1.0, smooth: float = 1e-5):
  """``logits [b, D, H, W, K]``, int ``labels [b, D, H, W]`` -> (CE mean over voxels + dice_weight *
  (1 - soft Dice averaged over the foreground classes, each pooled over the batch), metrics)."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  probs = jax.nn.softmax(logits, -1)[..., 1:]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[..., 1:]
  axes = tuple(range(probs.ndim - 1))
  inter = (probs * onehot).sum(axes)
  dice = (2 * inter + smooth) / (probs.sum(axes) + onehot.sum(axes) + smooth)
  return ce + dice_weight * (1 - dice.mean()), {"ce": ce, "soft_dice": dice.mean()}


def hard_dice(pred, labels, cls: int):
  """Per-example hard Dice of class ``cls`` ``[b]`` and whether the class is present ``[b]``."""
  p, t = pred == cls, labels == cls
  axes = tuple(range(1, p.ndim))
  denom = p.sum(axes) + t.sum(axes)
  return jnp.where(denom > 0, 2.0 * (p & t).sum(axes) / jnp.maximum(denom, 1), 0.0), denom > 0


class Seg3dObjective(base.Objective):
  """``config.objective``: decoder, num_classes, feature_size, dice_weight, structures; ``config.model``: the
  ViT fields (cubic power-of-two patches); ``config.data.volume`` with ``labels=True``."""
  name = "seg3d"
  image_encoders = {"encoder": ("params", "encoder")}

  @classmethod
  def check_config(cls, config):
    d, m, o = config.data, config.model, config.objective
    check(bool(d.get("volume")) and d.volume.get("labels", False),
          "objective.name='seg3d' needs data.volume with labels=True (label maps)")
    with config_errors():
      patch = vit.patch_3d_from_config(m) or (vit.size_from_config(m).patch_size,) * 3
      if len(set(patch)) != 1:
        raise ValueError(f"model.patch_3d={patch}: the 3D segmentation decoders need cubic patches")
      unetr.num_levels(patch[0])
      size = vit.volume_size_from_config(d)
    check(all(s % patch[0] == 0 for s in size),
          f"data.volume.size={size}: must be divisible by the patch size {patch[0]}")
    decoder = o.get("decoder", "unetr")
    check(decoder in patch_decoder.DECODERS,
          f"objective.decoder={decoder!r}: allowed: {', '.join(patch_decoder.DECODERS)}")
    check(o.num_classes >= 2, f"objective.num_classes={o.num_classes}: must be >= 2 (background + structures)")
    check(len(o.structures) == o.num_classes,
          f"objective.structures={tuple(o.structures)}: needs objective.num_classes={o.num_classes} names")
    check(o.feature_size > 0 and o.dice_weight >= 0,
          f"objective.feature_size={o.feature_size}, objective.dice_weight={o.dice_weight}: must be > 0 / >= 0")
    check(o.get("encoder_lr_mult", 1.0) >= 0,
          f"objective.encoder_lr_mult={o.get('encoder_lr_mult')}: must be >= 0 (0 freezes the encoder)")

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    o = config.objective
    self.num_classes, self.dice_weight = int(o.num_classes), float(o.dice_weight)
    self.structures = tuple(o.structures)
    self.encoder_lr_mult = float(o.get("encoder_lr_mult", 1.0))
    self.model = patch_decoder.segmentation_model(o.get("decoder", "unetr"), vit.vit_from_config(config),
                                                  self.num_classes, int(o.feature_size))
    self._pretrained = None
    if config.get("init_from"):
      self._pretrained = self.pretrained_encoder(self.model.encoder, config.init_from,
                                                 config.get("encoder_weights", "default"))

  def init(self, rng, batch):
    params = dict(self.model.init(rng, batch["image"][:1])["params"])
    if self._pretrained is not None:
      params["encoder"] = base.overwrite_params(params["encoder"], self._pretrained)
    return params, {}

  def optimizer_kwargs(self):
    """The encoder's steps (Adam and weight decay) scaled by ``encoder_lr_mult`` (0: none)."""
    if self.encoder_lr_mult == 1.0:
      return {}
    mult = self.encoder_lr_mult
    return {"lr_multipliers": lambda p: {k: jax.tree.map(lambda _: mult if k == "encoder" else 1.0, v)
                                         for k, v in p.items()}}

  def logits(self, params, volumes, deterministic: bool = True, rng=None):
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, volumes, deterministic=deterministic, rngs=rngs)

  def loss(self, params, extra, batch, rng, step):
    del step
    if self.encoder_lr_mult == 0:
      params = {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}
    logits = self.logits(params, batch["image"], deterministic=False, rng=rng)
    loss, metrics = dice_ce_loss(logits, batch["label_map"], self.num_classes, self.dice_weight)
    return loss, (metrics, extra)

  def eval_metrics(self, params, extra, batch, rng):
    del extra, rng
    logits = self.logits(params, batch["image"])
    labels = batch["label_map"]
    per_voxel = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    out = {"loss": base.masked_sum(per_voxel.mean((1, 2, 3)), batch["mask"])}
    pred = logits.argmax(-1)
    for c in range(1, self.num_classes):
      d, present = hard_dice(pred, labels, c)
      out[f"dice_{self.structures[c]}"] = base.masked_sum(d, batch["mask"] & present)
    return out

  def predict_fn(self, params):
    """A jitted ``volumes [n, *roi, c] -> softmax probabilities [n, *roi, K]`` for sliding windows."""
    fn = jax.jit(lambda p, x: jax.nn.softmax(self.logits(p, x), -1))
    return lambda x: np.asarray(fn(params, jnp.asarray(x)))
