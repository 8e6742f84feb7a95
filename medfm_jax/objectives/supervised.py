"""Supervised fine-tuning of a (pretrained) ViT classifier in the shared trainer.

Classifier = ViT encoder (``params/backbone``) + :class:`heads.ClassifierHead` (``params/head``),
cross-entropy on ``batch[data.label]``, held-out loss and accuracy. ``objective.scheme`` picks what
trains (the rest gets no update, no weight decay, no optimizer state and no gradient):

  full          everything (optionally with MAE layer-wise lr decay, ``objective.layer_decay``)
  last_n        the last ``objective.last_n`` blocks, the final norm and the head
  linear_probe  the head
  lora          LoRA adapters (``params/lora``, applied with ``peft.lora.apply`` inside the step)
                and the head; :meth:`export` folds them into plain weights
  prompt        learned prompt tokens (``model.num_prompts``) and the head
  adapter       bottleneck adapters (``model.adapter_dim``) and the head

With ``config.init_from`` (a workdir or checkpoint of any objective that declares
``image_encoders``) the encoder starts from the checkpoint's image encoder, restored by the loader
the trainer hands in (``train.restore.pretrained_encoder``); empty = random init.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medfm_jax.data import phantoms, pipeline
from medfm_jax.errors import check, config_errors
from medfm_jax.models import heads, vit
from medfm_jax.objectives import base
from medfm_jax.peft import freeze, lora

SCHEMES = ("full", "last_n", "linear_probe", "lora", "prompt", "adapter")
LABELS = {"phantoms": {"finding": phantoms.FINDINGS, "modality": phantoms.MODALITIES,
                        **phantoms.LESION_LABELS}}


def class_names(data_cfg) -> tuple[str, ...]:
  """Class names of ``data.label`` for ``data.source``: the phantom findings/modalities, or the
  names a file/TFDS source reads (``class_names`` for 'finding', ``modality_names`` for 'modality')."""
  label = data_cfg.get("label", "finding")
  if data_cfg.source in LABELS:
    table = LABELS[data_cfg.source]
  else:
    source = pipeline.make_source(data_cfg, data_cfg.train_split)
    table = {k: tuple(getattr(source, attr, ()) or ()) for k, attr in
             (("finding", "class_names"), ("modality", "modality_names"))}
    table = {k: v for k, v in table.items() if v}
  if label not in table:
    raise ValueError(f"data.label={label!r}: allowed for data.source={data_cfg.source!r}: {sorted(table)}")
  return tuple(table[label])



def _lora_spec(o) -> lora.LoraSpec | None:
  """The LoRA spec of ``config.objective`` (None unless ``scheme == 'lora'``)."""
  if o.scheme != "lora":
    return None
  return lora.LoraSpec(o.lora_rank, float(o.lora_alpha), bool(o.lora_rslora), tuple(o.lora_targets))

class Classifier(nn.Module):
  """``images [b, H, W, C]`` -> logits ``[b, num_classes]`` float32."""
  backbone: vit.VisionTransformer
  head: heads.ClassifierHead

  def __call__(self, images, deterministic: bool = True):
    return self.head(self.backbone(images, deterministic=deterministic), self.backbone.num_prefix_tokens)


def scheme_mask(scheme: str, params, last_n: int = 1):
  """Trainable mask (tree of bools) of ``scheme`` over a classifier param tree."""
  if scheme == "full":
    return freeze.full(params)
  if scheme == "last_n":
    return freeze.last_n_blocks(params, last_n)
  if scheme == "linear_probe":
    return freeze.linear_probe(params)
  if scheme in freeze.PEFT_KEYS:
    return freeze.only_keys(params, freeze.PEFT_KEYS[scheme])
  raise ValueError(f"objective.scheme={scheme!r}: allowed {SCHEMES}")


class SupervisedObjective(base.Objective):
  """``config.objective``: scheme, last_n, layer_decay, pool, head_init_std, label_smoothing,
  lora_rank, lora_alpha, lora_rslora, lora_dropout, lora_targets; ``config.data.label``;
  ``config.init_from``, ``config.encoder_weights``."""
  name = "supervised"
  image_encoders = {"backbone": ("params", "backbone")}
  hf_export = ("dinov2", ("params", "backbone"))   # the fine-tuned encoder (no head)
  trainer_init_from = False                          # init_from: the backbone only, read in __init__

  @classmethod
  def check_config(cls, config):
    o, m = config.objective, config.model
    with config_errors():
      class_names(config.data)
    check(o.scheme in SCHEMES, f"objective.scheme={o.scheme!r}: allowed {SCHEMES}")
    depth = vit.size_from_config(m).depth
    check(isinstance(o.last_n, int) and 0 <= o.last_n <= depth,
          f"objective.last_n={o.last_n!r}: must be an integer in [0, depth={depth}]")
    check(0.0 <= o.layer_decay <= 1.0, f"objective.layer_decay={o.layer_decay}: allowed [0, 1] (0 = off)")
    check(o.pool in heads.POOLS, f"objective.pool={o.pool!r}: allowed {heads.POOLS}")
    check(0.0 <= o.label_smoothing < 1.0, f"objective.label_smoothing={o.label_smoothing}: allowed [0, 1)")
    check(isinstance(o.lora_rank, int) and o.lora_rank > 0,
          f"objective.lora_rank={o.lora_rank!r}: must be a positive integer")
    check(0.0 <= o.lora_dropout < 1.0, f"objective.lora_dropout={o.lora_dropout}: allowed [0, 1)")
    check(o.scheme != "prompt" or m.get("num_prompts", 0) > 0,
          "objective.scheme='prompt' needs model.num_prompts > 0")
    check(o.scheme != "adapter" or m.get("adapter_dim", 0) > 0,
          "objective.scheme='adapter' needs model.adapter_dim > 0")

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    o = config.objective
    self.scheme = o.scheme
    self.label = config.data.get("label", "finding")
    self.num_classes = len(class_names(config.data))
    backbone = vit.vit_from_config(config)
    self.model = Classifier(backbone, heads.ClassifierHead(
        self.num_classes, o.pool, o.head_init_std, backbone.layer_norm_eps, backbone.dtype))
    self.lora_spec = _lora_spec(o)
    self._pretrained = None
    if config.get("init_from"):
      self._pretrained = self.pretrained_encoder(self.model.backbone, config.init_from,
                                                 config.get("encoder_weights", "default"))

  def init(self, rng, batch):
    model_rng, lora_rng = jax.random.split(rng)
    params = dict(self.model.init(model_rng, batch["image"][:1])["params"])
    if self._pretrained is not None:
      params["backbone"] = base.overwrite_params(params["backbone"], self._pretrained)
    if self.lora_spec is not None:
      s = self.lora_spec
      params["lora"], _ = lora.init(nn.unbox(params["backbone"]), s.targets, s.rank, s.alpha,
                                    lora_rng, s.rslora)
    return params, {}

  def trainable(self, params):
    return scheme_mask(self.scheme, params, self.config.objective.last_n)

  def optimizer_kwargs(self):
    decay = self.config.objective.layer_decay
    if not decay:
      return {}
    depth = vit.size_from_config(self.config.model).depth
    return {"lr_multipliers": lambda p: freeze.layerwise_lr_decay(p, decay, depth)}

  def effective_params(self, params, rng=None, train: bool = False):
    """Classifier params the model consumes: frozen leaves behind ``stop_gradient`` (no backward
    pass through them), LoRA adapters applied to the backbone."""
    mask = self.trainable(params)
    params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), mask, params)
    backbone = params["backbone"]
    if self.lora_spec is not None:
      rate = float(self.config.objective.lora_dropout) if train else 0.0
      backbone = lora.apply(backbone, params["lora"], self.lora_spec, dropout_rate=rate, rng=rng)
    return {"backbone": backbone, "head": params["head"]}

  def logits(self, params, images):
    """Deterministic logits ``[b, num_classes]``."""
    return self.model.apply({"params": self.effective_params(params)}, images)

  def export(self, params):
    """Plain classifier params (LoRA merged in float32; no adapter tree) for a standalone checkpoint."""
    return self.standalone_params(self.config, params)

  @classmethod
  def standalone_params(cls, config, params):
    """``{backbone, head}`` with LoRA adapters (``params/lora``) merged into the backbone."""
    spec = _lora_spec(config.objective)
    if spec is None:
      return {"backbone": params["backbone"], "head": params["head"]}
    return {"backbone": lora.merge(params["backbone"], params["lora"], spec), "head": params["head"]}

  def _ce(self, logits, labels, smoothing: float = 0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), smoothing) if smoothing \
        else jax.nn.one_hot(labels, self.num_classes)
    return optax.softmax_cross_entropy(logits, targets)

  def loss(self, params, extra, batch, rng, step):
    del step
    drop_rng, lora_rng = jax.random.split(rng)
    logits = self.model.apply({"params": self.effective_params(params, lora_rng, train=True)},
                              batch["image"], deterministic=False, rngs={"dropout": drop_rng})
    labels = batch[self.label]
    valid = (labels >= 0).astype(jnp.float32)          # -1 = unlabelled: no loss, not counted
    n = jnp.maximum(valid.sum(), 1.0)
    loss = (self._ce(logits, labels, self.config.objective.label_smoothing) * valid).sum() / n
    accuracy = ((logits.argmax(-1) == labels) * valid).sum() / n
    return loss, ({"accuracy": accuracy}, extra)

  def eval_metrics(self, params, extra, batch, rng):
    del extra, rng
    logits = self.logits(params, batch["image"])
    labels = batch[self.label]
    mask = batch["mask"] & (labels >= 0)
    return {"loss": base.masked_sum(self._ce(logits, labels), mask),
            "accuracy": base.masked_sum((logits.argmax(-1) == labels).astype(jnp.float32), mask)}
