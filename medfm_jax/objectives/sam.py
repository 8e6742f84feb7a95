"""Promptable segmentation (SAM / MedSAM) through the one trainer.

Model (``params``): ``image_encoder`` (``objective.encoder``: 'vit' = our ViT from ``config.model``
behind a conv neck, params ``image_encoder/encoder`` + ``image_encoder/neck``; 'vitdet' = SAM's
own encoder sized by ``config.model`` + ``config.model.sam``), ``prompt_encoder``, ``mask_decoder``,
and ``lora`` with ``objective.freeze='lora'``. Batches come from ``data.segment``
(:mod:`medfm_jax.data.prompts`): ``target`` [B, H, W], ``box`` [B, 4], ``points`` [B, P, 2].

Recipes (``objective.recipe``):

  medsam  box prompt, one mask, Dice + BCE; the prompt encoder frozen (Ma et al., 2024)
  sam     a box or one positive point (``objective.box_prob``), then ``objective.rounds - 1``
          simulated interaction rounds, each adding a correction point drawn from the error
          region of the previous prediction (positive where the target was missed) and feeding
          the previous low-res logits back as the mask prompt; per round
          ``focal_weight * focal + dice_weight * dice`` (20:1) plus ``iou_weight`` * MSE between
          predicted and actual IoU; an ambiguous one-point prompt predicts 3 masks and only the
          best (lowest loss) is backpropagated (Kirillov et al., 2023)

Logits are bilinearly upsampled to the image size for the losses. ``objective.freeze``:
'frozen' (image encoder fixed; a 'vit' encoder's new neck still trains), 'lora' (LoRA on the
encoder's attention kernels, ``objective.lora_*``), 'full'. ``config.init_from`` starts a 'vit'
encoder from any of our checkpoints with an image encoder (MAE, DINO, CLIP image tower);
``objective.sam_checkpoint`` loads official SAM / MedSAM weights (HF directory or
``segment_anything`` ``.pth``) into a 'vitdet' model whose sizes match.
"""
from __future__ import annotations

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from medfm_jax import storage
from medfm_jax.data import phantoms
from medfm_jax.errors import check, config_errors
from medfm_jax.interop import sam as sam_io
from medfm_jax.models import sam as sam_lib
from medfm_jax.models import vit
from medfm_jax.objectives import base
from medfm_jax.peft import lora
from medfm_jax.peft.lora import path_str

RECIPES = ("medsam", "sam")
ENCODERS = ("vit", "vitdet")
FREEZES = ("frozen", "lora", "full")
_ENCODER_FIELDS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads", "mlp_dim")


def sam_fields(config) -> dict:
  """The :data:`medfm_jax.models.sam.DEFAULTS` fields of a run: encoder sizes from ``config.model``
  and ``config.data``, the rest from ``config.model.sam``."""
  size = vit.size_from_config(config.model)
  own = dict(config.model.get("sam", {}) or {})
  return sam_lib.full_config(own, image_size=config.data.image_size, patch_size=size.patch_size,
                             channels=config.data.channels, width=size.width, depth=size.depth,
                             num_heads=size.num_heads, mlp_dim=size.mlp_dim)


def build_model(config) -> sam_lib.SegmentAnything:
  cfg = sam_fields(config)
  if config.objective.get("encoder", "vit") == "vit":
    return sam_lib.build_sam_on_vit(vit.vit_from_config(config), config.data.image_size,
                                    {k: v for k, v in cfg.items() if k not in _ENCODER_FIELDS})
  return sam_lib.build_sam(cfg, dtype=vit.COMPUTE_DTYPES[config.dtype], remat=config.model.get("remat", "none") != "none")


def dice_loss(logits, target):
  """``1 - soft Dice`` per example of ``logits [B, H, W]`` against a 0/1 ``target``."""
  p = jax.nn.sigmoid(logits)
  inter = (p * target).sum((-2, -1))
  return 1 - (2 * inter + 1) / (p.sum((-2, -1)) + target.sum((-2, -1)) + 1)


def focal_loss(logits, target, alpha: float = 0.25, gamma: float = 2.0):
  """Sigmoid focal loss (Lin et al., 2017), mean over pixels, per example."""
  p = jax.nn.sigmoid(logits)
  ce = optax.sigmoid_binary_cross_entropy(logits, target)
  pt = p * target + (1 - p) * (1 - target)
  weight = alpha * target + (1 - alpha) * (1 - target)
  return (weight * ce * (1 - pt) ** gamma).mean((-2, -1))


def hard_scores(logits, target):
  """(Dice, IoU) per example of ``logits > 0`` against ``target``; 1 when both are empty."""
  pred, gt = logits > 0, target > 0.5
  inter = (pred & gt).sum((-2, -1))
  union = (pred | gt).sum((-2, -1))
  total = pred.sum((-2, -1)) + gt.sum((-2, -1))
  return (jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1), 1.0),
          jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0))


def correction_points(key, logits, target):
  """One correction click per example (SAM's interactive training): a pixel drawn uniformly from
  the error region of ``logits [B, H, W] > 0`` against ``target``, labelled 1 where the target
  was missed and 0 on a false positive; inside the target when there is no error.
  -> ``(points float32 [B, 2] as (x, y), labels int32 [B])``."""
  b, h, w = target.shape
  gt = (target > 0.5).reshape(b, -1)
  err = ((logits > 0).reshape(b, -1)) != gt
  pool = jnp.where(err.any(-1, keepdims=True), err, gt | ~gt.any(-1, keepdims=True))
  idx = jnp.argmax(jnp.where(pool, jax.random.gumbel(key, pool.shape), -jnp.inf), axis=-1)
  label = jnp.take_along_axis(gt, idx[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.stack([idx % w, idx // w], -1).astype(jnp.float32), label


class SamObjective(base.Objective):
  """``config.objective``: recipe, encoder, freeze, freeze_prompt_encoder, rounds, box_prob,
  focal_weight, dice_weight, bce_weight, iou_weight, lora_rank, lora_alpha, lora_targets,
  sam_checkpoint; ``config.model.sam`` (prompt / decoder sizes); ``config.data.segment``."""
  name = "sam"
  image_encoders = {"image_encoder": ("params", "image_encoder", "encoder")}

  @classmethod
  def check_config(cls, config):
    o = config.objective
    check(o.get("recipe") in RECIPES, f"objective.recipe={o.get('recipe')!r}: allowed {RECIPES}")
    check(o.get("encoder", "vit") in ENCODERS, f"objective.encoder={o.get('encoder')!r}: allowed {ENCODERS}")
    check(o.get("freeze", "full") in FREEZES, f"objective.freeze={o.get('freeze')!r}: allowed {FREEZES}")
    check(isinstance(o.get("rounds", 1), int) and o.get("rounds", 1) >= 1,
          f"objective.rounds={o.get('rounds')!r}: must be an integer >= 1")
    check(0.0 <= o.get("box_prob", 0.5) <= 1.0, f"objective.box_prob={o.get('box_prob')}: allowed [0, 1]")
    check(config.data.get("segment") is not None,
          "objective.name='sam' needs data.segment (target masks and prompts, see data/prompts.py)")
    check(not (o.get("encoder", "vit") == "vitdet" and config.get("init_from")),
          "init_from restores one of our ViTs: use objective.encoder='vit' (or objective.sam_checkpoint for "
          "official SAM weights)")
    check(not (o.get("sam_checkpoint") and o.get("encoder", "vit") != "vitdet"),
          "objective.sam_checkpoint needs objective.encoder='vitdet' (SAM's own image encoder)")
    with config_errors():
      sam_fields(config)

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    o = config.objective
    self.recipe, self.encoder_kind = o.recipe, o.get("encoder", "vit")
    self.freeze = o.get("freeze", "full")
    self.rounds = int(o.get("rounds", 1)) if self.recipe == "sam" else 1
    self.model = build_model(config)
    self.lora_spec = lora.LoraSpec(int(o.get("lora_rank", 8)), float(o.get("lora_alpha", 16.0)), False,
                                   tuple(o.get("lora_targets", lora.DEFAULT_TARGETS))) if self.freeze == "lora" else None
    self._pretrained = None
    if config.get("init_from"):
      self._pretrained = self.pretrained_encoder(self.model.image_encoder.encoder, config.init_from,
                                                 config.get("encoder_weights", "default"))
    self._official = None
    if o.get("sam_checkpoint"):
      _, self._official, _ = sam_io.load(o.sam_checkpoint, **{k: v for k, v in sam_fields(config).items()})

  # ---- params -------------------------------------------------------------------------------

  def init(self, rng, batch):
    model_rng, lora_rng = jax.random.split(rng)
    p = self.data.segment.num_prompt_points
    params = dict(self.model.init(model_rng, batch["image"][:1], jnp.zeros((1, 1, p, 2)),
                                  jnp.ones((1, 1, p), jnp.int32))["params"])
    if self._official is not None:
      flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(self._official)[0]}
      params = base.overwrite_params(params, flat)
    if self._pretrained is not None:
      params["image_encoder"] = dict(params["image_encoder"])
      params["image_encoder"]["encoder"] = base.overwrite_params(params["image_encoder"]["encoder"], self._pretrained)
    if self.lora_spec is not None:
      s = self.lora_spec
      params["lora"], _ = lora.init(nn.unbox(self._encoder_tree(params)), s.targets, s.rank, s.alpha, lora_rng)
    return params, {}

  def _encoder_tree(self, params):
    """The subtree LoRA adapts: the ViT for 'vit', the whole SAM encoder for 'vitdet'."""
    enc = params["image_encoder"]
    return enc["encoder"] if self.encoder_kind == "vit" else enc

  def trainable(self, params):
    o = self.config.objective
    frozen_prompt = bool(o.get("freeze_prompt_encoder", self.recipe == "medsam"))

    def one(path, _):
      parts = [getattr(k, "key", str(k)) for k in path]
      top = parts[0]
      if top == "image_encoder":
        if self.freeze == "full":
          return True
        return self.encoder_kind == "vit" and parts[1] == "neck"
      if top == "prompt_encoder":
        return not frozen_prompt and parts[1] != "pe_gaussian"   # a fixed buffer in SAM
      return True                                                 # mask_decoder, lora
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

  def effective_params(self, params):
    """Frozen leaves behind ``stop_gradient``; LoRA applied to the encoder."""
    mask = self.trainable(params)
    params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), mask, params)
    out = {k: params[k] for k in ("image_encoder", "prompt_encoder", "mask_decoder")}
    if self.lora_spec is not None:
      adapted = lora.apply(self._encoder_tree(params), params["lora"], self.lora_spec)
      out["image_encoder"] = {**params["image_encoder"], "encoder": adapted} if self.encoder_kind == "vit" else adapted
    return out

  # ---- forward ------------------------------------------------------------------------------

  def _upsample(self, logits):
    s = self.config.data.image_size
    return jax.image.resize(logits, (*logits.shape[:-2], s, s), "bilinear")

  def _mask_loss(self, up, target):
    o = self.config.objective
    if self.recipe == "medsam":
      bce = optax.sigmoid_binary_cross_entropy(up, jnp.broadcast_to(target, up.shape)).mean((-2, -1))
      return o.get("dice_weight", 1.0) * dice_loss(up, target) + o.get("bce_weight", 1.0) * bce
    return o.get("focal_weight", 20.0) * focal_loss(up, target) + o.get("dice_weight", 1.0) * dice_loss(up, target)

  def _first_prompt(self, batch, rng):
    """Round-0 prompt as two tokens, per example (``objective.box_prob``): the box corners (labels
    2, 3: the same tokens as a box prompt) or one positive point and SAM's 'not a point' padding.
    Encoded with ``pad_points=False``, so each matches SAM's own encoding of that prompt (later
    clicks are appended; token order does not matter to the decoder). -> points, labels, is_box."""
    b = batch["box"].shape[0]
    if self.recipe == "medsam":
      is_box = jnp.ones((b,), bool)
    else:
      is_box = jax.random.uniform(rng, (b,)) < self.config.objective.get("box_prob", 0.5)
    corners = batch["box"].reshape(b, 2, 2)
    point = jnp.concatenate([batch["points"][:, :1], jnp.zeros((b, 1, 2))], axis=1)
    points = jnp.where(is_box[:, None, None], corners, point)
    labels = jnp.where(is_box[:, None], jnp.array([2, 3]), jnp.array([1, -1])).astype(jnp.int32)
    return points, labels, is_box

  def _rounds(self, params, batch, rng, deterministic: bool):
    """Runs the prompt rounds -> (loss, per-round (dice, iou) of the used mask, ...)."""
    o = self.config.objective
    v = {"params": params}
    first_rng, drop_rng, *click_rngs = jax.random.split(rng, 2 + self.rounds)
    emb = self.model.apply(v, batch["image"], deterministic=deterministic, method="embed_image",
                           rngs={"dropout": drop_rng})
    target = batch["target"]
    points, labels, is_box = self._first_prompt(batch, first_rng)
    logits, iou_pred = self.model.apply(v, emb, points[:, None], labels[:, None], multimask_output=None,
                                        pad_points=False, method="predict")
    logits, iou_pred = logits[:, 0], iou_pred[:, 0]                          # [B, K+1, h, w], [B, K+1]
    up = self._upsample(logits)
    per_mask = self._mask_loss(up, target[:, None])                         # [B, K+1]
    ambiguous = (~is_box) & (self.recipe == "sam")
    best = jnp.where(ambiguous, 1 + jnp.argmin(per_mask[:, 1:], -1), 0)     # backward on the best
    pick = lambda x: jnp.take_along_axis(x, best.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]
    actual = jax.lax.stop_gradient(hard_scores(up, target[:, None])[1])    # [B, K+1]
    loss = pick(per_mask) + o.get("iou_weight", 1.0 if self.recipe == "sam" else 0.0) * (
        (iou_pred - actual) ** 2).mean(-1)
    chosen = pick(logits)
    scores = [hard_scores(self._upsample(chosen), target)]
    for r in range(1, self.rounds):
      prev = jax.lax.stop_gradient(chosen)
      click, click_label = correction_points(click_rngs[r], self._upsample(prev), target)
      points = jnp.concatenate([points, click[:, None]], axis=1)
      labels = jnp.concatenate([labels, click_label[:, None]], axis=1)
      logits, iou_pred = self.model.apply(v, emb, points[:, None], labels[:, None], masks=prev[:, None],
                                          multimask_output=False, pad_points=False, method="predict")
      chosen, iou_pred = logits[:, 0, 0], iou_pred[:, 0, 0]
      up = self._upsample(chosen)
      actual = jax.lax.stop_gradient(hard_scores(up, target)[1])
      loss = loss + self._mask_loss(up, target) + o.get("iou_weight", 1.0) * (iou_pred - actual) ** 2
      scores.append(hard_scores(up, target))
    return loss / self.rounds, scores, is_box

  def loss(self, params, extra, batch, rng, step):
    del step
    loss, scores, _ = self._rounds(self.effective_params(params), batch, rng, deterministic=False)
    metrics = {"dice_first": scores[0][0].mean(), "dice_last": scores[-1][0].mean(), "iou_last": scores[-1][1].mean()}
    return loss.mean(), (metrics, extra)

  def predict_box(self, params, images, boxes):
    """Deterministic single-mask logits ``[B, H, W]`` for box prompts ``[B, 4]``."""
    v = {"params": self.effective_params(params)}
    emb = self.model.apply(v, images, method="embed_image")
    logits, _ = self.model.apply(v, emb, boxes=boxes[:, None], multimask_output=False, method="predict")
    return self._upsample(logits[:, 0, 0])

  def eval_metrics(self, params, extra, batch, rng):
    """Dice / IoU with a box prompt; with ``recipe='sam'`` also one point (mask picked by the IoU
    head) and after the interaction rounds (deterministic clicks)."""
    del extra
    mask = batch["mask"]
    dice, iou = hard_scores(self.predict_box(params, batch["image"], batch["box"]), batch["target"])
    out = {"dice_box": base.masked_sum(dice, mask), "iou_box": base.masked_sum(iou, mask)}
    for k, name in enumerate(phantoms.MASK_CLASSES):   # per target class
      if name in self.data.segment.classes and len(self.data.segment.classes) > 1:
        out[f"dice_box/{name}"] = base.masked_sum(dice, mask & (batch["target_class"] == k))
    if self.recipe == "sam":
      p = self.effective_params(params)
      v = {"params": p}
      emb = self.model.apply(v, batch["image"], method="embed_image")
      pts = jnp.concatenate([batch["points"][:, :1], jnp.zeros_like(batch["points"][:, :1])], axis=1)
      lab = jnp.broadcast_to(jnp.array([1, -1], jnp.int32), pts.shape[:2])
      logits, iou_pred = self.model.apply(v, emb, pts[:, None], lab[:, None], multimask_output=True,
                                          pad_points=False, method="predict")
      best = jnp.argmax(iou_pred[:, 0], -1)
      chosen = jnp.take_along_axis(logits[:, 0], best[:, None, None, None], axis=1)[:, 0]
      out["dice_point"] = base.masked_sum(hard_scores(self._upsample(chosen), batch["target"])[0], mask)
      forced = {**batch, "box": batch["box"]}
      _, scores, _ = self._rounds(p, forced, rng, deterministic=True)
      out[f"dice_{self.rounds}_rounds"] = base.masked_sum(scores[-1][0], mask)
    return out

  def eval_artifacts(self, params, extra, batch, rng, workdir, step):
    """``WORKDIR/overlays/step_N.png``: up to 8 eval images with the target (green) and the
    box-prompted prediction (red), the box in blue."""
    del extra, rng
    n = min(8, batch["image"].shape[0])
    pred = np.asarray(self.predict_box(params, batch["image"][:n], batch["box"][:n]) > 0)
    if jax.process_index() != 0:
      return
    d = self.config.data
    img = np.asarray(batch["image"][:n], np.float32) * np.asarray(d.std, np.float32) + np.asarray(d.mean, np.float32)
    png = io.BytesIO()
    Image.fromarray(overlay_grid(img, np.asarray(batch["target"][:n]) > 0.5, pred,
                                 np.asarray(batch["box"][:n]))).save(png, "PNG")
    storage.write_bytes(storage.path(workdir) / "overlays" / f"step_{step:07d}.png", png.getvalue())


def overlay_grid(images, targets, preds, boxes, scale: int = 4) -> np.ndarray:
  """Images in [0, 1] ``[n, H, W, C]`` with target (green), prediction (red) and box (blue)
  outlines, side by side, enlarged ``scale`` times -> uint8 ``[H*s, n*W*s, 3]``."""
  def edge(m):
    m = np.kron(m, np.ones((scale, scale), bool))
    return m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
  tiles = []
  for img, t, p, b in zip(images, targets, preds, boxes):
    rgb = np.repeat(np.clip(img, 0, 1), 3 // img.shape[-1], -1)[..., :3]
    rgb = np.kron(rgb, np.ones((scale, scale, 1))) * 0.8
    box = np.zeros(t.shape, bool)
    x0, y0, x1, y1 = np.clip(np.round(b).astype(int), 0, [t.shape[1] - 1, t.shape[0] - 1] * 2)
    box[y0:y1 + 1, x0:x1 + 1] = True
    for m, color in ((box, (0.2, 0.4, 1.0)), (t, (0.1, 1.0, 0.1)), (p, (1.0, 0.1, 0.1))):
      rgb[edge(m)] = color
    tiles.append(rgb)
  return (np.concatenate(tiles, axis=1) * 255).astype(np.uint8)
