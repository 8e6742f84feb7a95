"""DINO (Caron et al., 2021) and DINOv2 (Oquab et al., 2023) self-distillation.

Student ViT + DINO head vs an EMA teacher. State outside the optimizer (``extra``): ``teacher``
(EMA of the student params, sharded like them), ``center`` (``[K]``) and, with iBOT centering,
``ibot_center`` (``[K_ibot]``). Batches are multi-crop: ``global [b, n_g, G, G, C]``, ``local
[b, n_l, L, L, C]`` and, with iBOT, ``global_masks [b, n_g, N]`` (``data.patch_masks``).

DINOv2 options (``config.objective``): ``ibot_loss_weight`` (masked-patch loss of the student's
masked global crops against the teacher's patch tokens; shared or separate head, own center),
``koleo_loss_weight`` (KoLeo on the student's backbone cls tokens of each global crop, summed over
crops; computed over the GLOBAL batch so results do not depend on the mesh, where dinov2 uses each
GPU's batch), ``centering`` = 'center' (DINO) | 'sinkhorn_knopp' (DINOv2).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from medfm_jax import storage
from medfm_jax.data import spec as data_spec
from medfm_jax.errors import check, config_errors
from medfm_jax.metrics import attention_maps, feature_monitor
from medfm_jax.models import heads, layers, vit
from medfm_jax.objectives import base
from medfm_jax.objectives import dino_losses
from medfm_jax.parallel import programs
from medfm_jax.peft import freeze

CENTERINGS = ("center", "sinkhorn_knopp")


class DinoModel(nn.Module):
  """Backbone -> ``{'cls': backbone cls token, 'logits': head(cls)}``; with ``patch_ids [b, M]``
  also ``'patch_logits' [b, M, K']``: the iBOT head (or the shared DINO head) on those patches."""
  backbone: vit.VisionTransformer
  head: heads.DinoHead
  ibot_head: heads.DinoHead | None = None

  def __call__(self, images, deterministic: bool = True, patch_mask=None, patch_ids=None):
    tokens = self.backbone(images, deterministic=deterministic, patch_mask=patch_mask)
    out = {"cls": tokens[:, 0], "logits": self.head(tokens[:, 0])}
    if patch_ids is not None:
      patches = layers.gather_tokens(tokens[:, 1 + self.backbone.num_registers:], patch_ids)
      out["patch_logits"] = (self.ibot_head or self.head)(patches)
    return out


def _views(x):
  """``[b, n, ...] -> [n*b, ...]`` (view-major, so outputs reshape to ``[n, b, ...]``)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _head(o, prefix: str = "") -> heads.DinoHead:
  return heads.DinoHead(o[prefix + "out_dim"], o[prefix + "head_hidden_dim"],
                        o[prefix + "head_bottleneck_dim"], norm_last_layer=o.norm_last_layer,
                        norm_eps=o.get("head_norm_eps", 1e-12))


def lr_multipliers(params, layerwise_decay: float, patch_embed_mult: float, depth: int):
  """DINOv2 per-parameter lr factors: ``layerwise_decay ** (depth + 1 - layer_id)`` (heads get 1),
  times ``patch_embed_mult`` under ``patch_embed``."""
  scales = freeze.layerwise_lr_decay(params, layerwise_decay, depth)
  is_patch = jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "patch_embed" for k in path), params)
  return jax.tree.map(lambda m, p: m * patch_embed_mult if p else m, scales, is_patch)


class DinoObjective(base.Objective):
  """``config.objective``: out_dim, head_hidden_dim, head_bottleneck_dim, norm_last_layer,
  student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps, center_momentum,
  momentum_teacher (-> 1 on a cosine), freeze_last_layer_steps, centering, dino_loss_weight,
  koleo_loss_weight, ibot_loss_weight, ibot_separate_head (+ ibot_out_dim,
  ibot_head_hidden_dim, ibot_head_bottleneck_dim), layerwise_decay, patch_embed_lr_mult.
  ``config.data``: multicrop (required) and, with iBOT, patch_masks (checked here, as only this
  objective needs them)."""
  name = "dino"
  image_encoders = {"teacher": ("extra", "teacher", "backbone"), "student": ("params", "backbone")}
  hf_export = ("dinov2", ("extra", "teacher", "backbone"))

  @classmethod
  def check_config(cls, config):
    o = config.objective
    patch_size = vit.size_from_config(config.model).patch_size
    check(o.get("centering", "center") in CENTERINGS,
          f"objective.centering={o.get('centering')!r}: allowed {', '.join(CENTERINGS)}")
    for field in ("dino_loss_weight", "koleo_loss_weight", "ibot_loss_weight"):
      check(o.get(field, 0.0) >= 0, f"objective.{field}={o.get(field)}: must be >= 0")
    check(0.0 < o.get("layerwise_decay", 1.0) <= 1.0,
          f"objective.layerwise_decay={o.get('layerwise_decay')}: allowed (0, 1] (1 = off)")
    with config_errors():
      d = data_spec.resolve(config.data)
    spec = d.multicrop
    check(spec is not None, "data.multicrop: the DINO objective needs multi-crop views")
    for field in ("global_size", "local_size"):
      check(getattr(spec, field) % patch_size == 0,
            f"data.multicrop.{field}={getattr(spec, field)}: must be a multiple of the patch size {patch_size}")
    if o.get("ibot_loss_weight", 0.0) > 0:
      check(d.patch_masks is not None, "objective.ibot_loss_weight > 0 needs data.patch_masks "
            "(dict(patch_size, probability, ratio)) for the iBOT block masks")
      check(d.mask_patch_size == patch_size,
            f"data.patch_masks.patch_size={d.mask_patch_size}: must equal the model's "
            f"patch size {patch_size}")
      check(config.model.get("mask_token", False), "objective.ibot_loss_weight > 0 needs model.mask_token=True")

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    o = config.objective
    self.centering = o.get("centering", "center")
    self.ibot = o.get("ibot_loss_weight", 0.0) > 0
    self.mask_spec = self.data.patch_masks
    separate = self.ibot and o.get("ibot_separate_head", False)
    self.model = DinoModel(vit.vit_from_config(config), _head(o),
                           _head(o, "ibot_") if separate else None)
    # Patch slots per global view: masks never exceed int(N * max ratio) patches.
    self.slots = max(1, int(self.mask_spec.num_patches * self.mask_spec.ratio[1])) if self.ibot else 0
    # cls features, replicated so every process can read them; built once, reused every eval.
    self._cls_features = jax.jit(lambda p, x: self.model.backbone.apply({"params": p}, x)[:, 0],
                                 out_shardings=PartitionSpec())
    self._attention = programs.jit_once(  # (maps, images), replicated: process 0 writes them; pictures only
        lambda p, x: (attention_maps.cls_attention(self.model.backbone, p, x[:4]), x[:4]),
        out_shardings=PartitionSpec())

  @property
  def ibot_out_dim(self) -> int:
    return (self.model.ibot_head or self.model.head).out_dim

  def init(self, rng, batch):
    images = batch["global"][:, 0]
    ids = jnp.zeros((images.shape[0], max(self.slots, 1)), jnp.int32) if self.ibot else None
    params = self.model.init(rng, images, patch_ids=ids)["params"]
    teacher = jax.tree.map(jnp.copy, params)   # keeps the params' logical names: sharded alike
    extra = {"teacher": teacher, "center": jnp.zeros((self.config.objective.out_dim,), jnp.float32)}
    if self.ibot:
      extra["ibot_center"] = jnp.zeros((self.ibot_out_dim,), jnp.float32)
    return params, extra

  def optimizer_kwargs(self):
    o = self.config.objective
    kwargs = {"frozen_for_steps": (heads.last_layer_mask, o.freeze_last_layer_steps)}
    decay, patch_mult = o.get("layerwise_decay", 1.0), o.get("patch_embed_lr_mult", 1.0)
    if decay != 1.0 or patch_mult != 1.0:
      kwargs["lr_multipliers"] = lambda params: lr_multipliers(params, decay, patch_mult,
                                                               self.model.backbone.size.depth)
    return kwargs

  def _teacher_probs(self, logits, center, temp, valid=None):
    """Centred + sharpened (or Sinkhorn-Knopp) teacher targets, gradient stopped."""
    if self.centering == "sinkhorn_knopp":
      return dino_losses.sinkhorn_knopp(logits, temp, valid=valid)
    return jax.nn.softmax(jax.lax.stop_gradient(logits - center) / temp, axis=-1)

  def loss(self, params, extra, batch, rng, step):
    o = self.config.objective
    n_g, b = batch["global"].shape[1], batch["global"].shape[0]
    images = _views(batch["global"])
    masks = ids = valid = None
    if self.ibot:
      masks = _views(batch["global_masks"])                                  # [n_g*b, N]
      ids = jnp.argsort(~masks, axis=1, stable=True)[:, :self.slots].astype(jnp.int32)
      valid = jnp.take_along_axis(masks, ids, axis=1)                         # [n_g*b, M]
    # The teacher sees unmasked crops and runs deterministically (drop-path is student-only).
    teacher = jax.lax.stop_gradient(self.model.apply({"params": extra["teacher"]}, images, patch_ids=ids))
    rng_g, rng_l = jax.random.split(rng)
    student = self.model.apply({"params": params}, images, deterministic=False, patch_mask=masks,
                               patch_ids=ids, rngs={"dropout": rng_g})
    logits = [student["logits"]]
    if batch.get("local") is not None and batch["local"].shape[1]:
      logits.append(self.model.apply({"params": params}, _views(batch["local"]), deterministic=False,
                                     rngs={"dropout": rng_l})["logits"])
    student_logits = jnp.concatenate(logits).reshape(-1, b, o.out_dim)
    teacher_logits = teacher["logits"].reshape(n_g, b, -1)
    temp = dino_losses.teacher_temp_schedule(step, o.warmup_teacher_temp_steps,
                                             o.warmup_teacher_temp, o.teacher_temp)
    probs = self._teacher_probs(teacher_logits, extra["center"], temp)
    dino = dino_losses.dino_cross_entropy(student_logits, probs, o.student_temp, n_g)
    metrics = dino_losses.teacher_metrics(probs)
    metrics.update(dino_loss=dino, teacher_temp=temp,
                   loss_over_ln_k=jax.lax.stop_gradient(dino) / math.log(o.out_dim))
    loss = o.get("dino_loss_weight", 1.0) * dino
    new_extra = dict(extra)
    if self.centering == "center":
      new_extra["center"] = dino_losses.update_center(extra["center"], teacher_logits, o.center_momentum)
    metrics["center_norm"] = jnp.linalg.norm(new_extra["center"])
    if o.get("koleo_loss_weight", 0.0) > 0:
      koleo = sum(dino_losses.koleo_loss(c) for c in student["cls"].reshape(n_g, b, -1))
      metrics["koleo_loss"] = koleo
      loss = loss + o.koleo_loss_weight * koleo
    if self.ibot:
      patch_probs = self._teacher_probs(teacher["patch_logits"], extra["ibot_center"], temp, valid)
      ibot = dino_losses.ibot_patch_loss(student["patch_logits"], patch_probs, valid, o.student_temp)
      metrics.update(ibot_loss=ibot, masked_fraction=jnp.mean(masks.astype(jnp.float32)))
      metrics.update({f"ibot_{k}": v for k, v in dino_losses.teacher_metrics(patch_probs, valid).items()})
      loss = loss + o.ibot_loss_weight * ibot
      if self.centering == "center":
        new_extra["ibot_center"] = dino_losses.update_center(
            extra["ibot_center"], teacher["patch_logits"], o.center_momentum, weights=valid)
        metrics["ibot_center_norm"] = jnp.linalg.norm(new_extra["ibot_center"])
    return loss, (metrics, new_extra)

  def evaluate(self, params, extra, mesh, step):
    """kNN and few-shot accuracy of the teacher's cls features (``metrics.feature_monitor``): a
    bank of ``objective.knn_train_examples`` train images, queried with ``data.eval_examples``."""
    del params, step
    teacher = extra["teacher"]["backbone"]
    return feature_monitor.frozen_feature_metrics(
        self.data, mesh, lambda images: self._cls_features(teacher, images),
        self.config.objective.knn_train_examples)

  def eval_artifacts(self, params, extra, batch, rng, workdir, step):
    """PNG of the teacher's last-layer cls attention per head on the first eval images."""
    del params, rng
    maps, images = self._attention(extra["teacher"]["backbone"], batch["image"])
    if jax.process_index() == 0:
      attention_maps.write_attention_png(
          storage.path(workdir) / "attention" / f"step_{step:07d}.png", np.asarray(images),
          np.asarray(maps), self.data.mean, self.data.std)

  def warnings(self, scalars):
    loss = scalars.get("dino_loss", scalars["loss"])
    if dino_losses.collapse_warning(loss, self.config.objective.out_dim):
      return [f"DINO loss {loss:.3f} sits at ln K = {math.log(self.config.objective.out_dim):.3f}: "
              f"the teacher output may have collapsed (teacher entropy "
              f"{scalars.get('teacher_entropy', float('nan')):.3f}); check teacher temperature and centering"]
    return []

  def after_update(self, params, extra, step):
    m = dino_losses.cosine_schedule(step, self.config.total_steps, self.config.objective.momentum_teacher, 1.0)
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, extra["teacher"], params)
    return dict(extra, teacher=teacher)
