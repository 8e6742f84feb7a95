"""DINO self-distillation (Caron et al., 2021): student ViT + head vs an EMA teacher.

State outside the optimizer (``extra``): ``teacher`` (EMA of the student params, sharded like
them) and ``center`` (``[K]``). Batches are multi-crop: ``global [b, n_g, G, G, C]`` and
``local [b, n_l, L, L, C]`` (``data.multicrop``). Not yet here (see the DINO issue): DINOv2's
iBOT/KoLeo/Sinkhorn wiring, kNN evaluation and attention maps.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from medfm_jax.data import phantoms, pipeline
from medfm_jax.evaluate import knn
from medfm_jax.models import heads, vit
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.objectives import base
from medfm_jax.objectives import dino_losses


class DinoModel(nn.Module):
  """Backbone cls token -> DINO head logits ``[b, K]``."""
  backbone: vit.VisionTransformer
  head: heads.DinoHead

  def __call__(self, images, deterministic: bool = True):
    return self.head(self.backbone(images, deterministic=deterministic)[:, 0])


def _views(x):
  """``[b, n, H, W, C] -> [n*b, H, W, C]`` (view-major, so logits reshape to ``[n, b, K]``)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


class DinoObjective(base.Objective):
  """``config.objective``: out_dim, head_hidden_dim, head_bottleneck_dim, norm_last_layer,
  student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps, center_momentum,
  momentum_teacher (-> 1 on a cosine), freeze_last_layer_steps."""

  def __init__(self, config):
    super().__init__(config)
    o = config.objective
    self.model = DinoModel(vit.vit_from_config(config), heads.DinoHead(
        o.out_dim, o.head_hidden_dim, o.head_bottleneck_dim, norm_last_layer=o.norm_last_layer))
    # cls features, replicated so every process can read them; built once, reused every eval.
    self._cls_features = jax.jit(lambda p, x: self.model.backbone.apply({"params": p}, x)[:, 0],
                                 out_shardings=PartitionSpec())

  def init(self, rng, batch):
    params = self.model.init(rng, batch["global"][:, 0])["params"]
    teacher = jax.tree.map(jnp.copy, nn.unbox(params))
    return params, {"teacher": teacher, "center": jnp.zeros((self.config.objective.out_dim,), jnp.float32)}

  def optimizer_kwargs(self):
    return {"frozen_for_steps": (heads.last_layer_mask, self.config.objective.freeze_last_layer_steps)}

  def loss(self, params, extra, batch, rng, step):
    o = self.config.objective
    n_g, b = batch["global"].shape[1], batch["global"].shape[0]
    # The teacher runs deterministically: no drop-path (that is for the student only).
    teacher_logits = self.model.apply({"params": extra["teacher"]}, _views(batch["global"]))
    teacher_logits = jax.lax.stop_gradient(teacher_logits).reshape(n_g, b, -1)
    student = lambda x, r: self.model.apply({"params": params}, _views(x), deterministic=False,
                                            rngs={"dropout": r})
    rng_g, rng_l = jax.random.split(rng)
    logits = [student(batch["global"], rng_g)]
    if batch.get("local") is not None and batch["local"].shape[1]:
      logits.append(student(batch["local"], rng_l))
    student_logits = jnp.concatenate(logits).reshape(-1, b, o.out_dim)
    teacher_temp = dino_losses.teacher_temp_schedule(step, o.warmup_teacher_temp_steps,
                                                     o.warmup_teacher_temp, o.teacher_temp)
    loss, metrics = dino_losses.dino_loss(student_logits, teacher_logits, extra["center"],
                                          o.student_temp, teacher_temp, n_g)
    center = dino_losses.update_center(extra["center"], teacher_logits, o.center_momentum)
    metrics.update(teacher_temp=teacher_temp, center_norm=jnp.linalg.norm(center))
    return loss, (metrics, dict(extra, center=center))

  def evaluate(self, params, extra, mesh, step):
    """kNN (k=20, T=0.07) top-1 accuracy of teacher cls features on phantom labels: a bank of
    ``objective.knn_train_examples`` train images, queried with ``data.eval_examples`` val images."""
    del params, step
    c = self.config

    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # global rows

    def embed(split, n):
      feats, labels = [], {"modality": [], "finding": []}
      for local in pipeline.make_eval_batches(c.data, split, c.data.eval_batch_size, n,
                                              jax.process_index(), jax.process_count()):
        images = mesh_lib.to_global_batch({"image": local["image"]}, mesh)["image"]
        keep = gather(local["mask"])
        feats.append(np.asarray(self._cls_features(extra["teacher"]["backbone"], images))[keep])
        for k in labels:
          labels[k].append(gather(local[k])[keep])
      return np.concatenate(feats), {k: np.concatenate(v) for k, v in labels.items()}

    train_x, train_y = embed(c.data.train_split, c.objective.knn_train_examples)
    val_x, val_y = embed(c.data.eval_split, c.data.eval_examples)
    k = min(20, len(train_x))
    return {f"knn_{name}_acc": knn.knn_accuracy(train_x, train_y[name], val_x, val_y[name],
                                                 num_classes, k=k)
            for name, num_classes in (("finding", len(phantoms.FINDINGS)),
                                      ("modality", len(phantoms.MODALITIES)))}

  def warnings(self, scalars):
    if dino_losses.collapse_warning(scalars["loss"], self.config.objective.out_dim):
      return [f"DINO loss {scalars['loss']:.3f} sits at ln K = {math.log(self.config.objective.out_dim):.3f}: "
              f"the teacher output may have collapsed (teacher entropy "
              f"{scalars.get('teacher_entropy', float('nan')):.3f}); check teacher temperature and centering"]
    return []

  def after_update(self, params, extra, step):
    m = dino_losses.cosine_schedule(step, self.config.total_steps, self.config.objective.momentum_teacher, 1.0)
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, extra["teacher"], params)
    return dict(extra, teacher=teacher)
