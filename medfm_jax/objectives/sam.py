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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfm_jax import storage
from medfm_jax.data import image_files, phantoms
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
  return sam_lib.build_sam(cfg, dtype=vit.COMPUTE_DTYPES[config.dtype], remat=config.model.get("remat", "none") != "none",
                           attention_chunk=config.model.get("attention_chunk", 0))


def dice_loss(logits, target, smooth: float = 1.0):
  """``1 - soft Dice`` per example of ``logits [B, H, W]`` against a 0/1 ``target``; ``smooth``
  is added to numerator and denominator (MONAI's DiceLoss, which MedSAM uses: 1e-5)."""
  p = jax.nn.sigmoid(logits)
  inter = (p * target).sum((-2, -1))
  return 1 - (2 * inter + smooth) / (p.sum((-2, -1)) + target.sum((-2, -1)) + smooth)


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


def center_points(logits, target):
  """One evaluation click per example (the interactive-segmentation protocol of SAM and RITM):
  the pixel deepest inside the larger error region of ``logits [B, H, W] > 0`` against ``target``
  (missed pixels -> label 1, false positives -> label 0); the deepest target pixel when there is
  no error. Depth = the number of 3x3 erosions a pixel survives (the outside of the image counts
  as background), ties broken towards the region's middle by heat diffusion inside it.
  -> ``(points float32 [B, 2] as (x, y), labels int32 [B])``."""
  b, h, w = target.shape
  gt, pred = target > 0.5, logits > 0

  def depth(m):
    def neighbours(x):
      pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
      return jnp.stack([pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)])

    def step(_, carry):
      cur, total, heat = carry
      cur = neighbours(cur).min(0)
      return cur, total + cur, neighbours(heat).mean(0) * m
    m = m.astype(jnp.float32)
    _, total, heat = jax.lax.fori_loop(0, (max(h, w) + 1) // 2, step, (m, m, m))
    heat = heat / jnp.maximum(heat.max((-2, -1), keepdims=True), 1e-30)
    return (total + 0.5 * heat).reshape(b, -1)       # heat < 1: orders only equal depths
  missed, extra, inside = depth(gt & ~pred), depth(pred & ~gt), depth(gt)
  use_missed = missed.max(-1) >= extra.max(-1)
  no_error = jnp.maximum(missed.max(-1), extra.max(-1)) == 0
  d = jnp.where(no_error[:, None], inside, jnp.where(use_missed[:, None], missed, extra))
  idx = jnp.argmax(d, -1)
  label = (use_missed | no_error).astype(jnp.int32)
  return jnp.stack([idx % w, idx // w], -1).astype(jnp.float32), label


class SamObjective(base.Objective):
  """``config.objective``: recipe, encoder, freeze, freeze_prompt_encoder, rounds, eval_point_rounds, box_prob, dice_smooth,
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
    check(isinstance(o.get("eval_point_rounds", -1), int) and o.get("eval_point_rounds", -1) >= -1,
          f"objective.eval_point_rounds={o.get('eval_point_rounds')!r}: an integer >= 0, or -1 (the recipe's)")
    check(o.get("dice_smooth", 1.0) > 0, f"objective.dice_smooth={o.get('dice_smooth')}: must be > 0")
    check(0.0 <= o.get("box_prob", 0.5) <= 1.0, f"objective.box_prob={o.get('box_prob')}: allowed [0, 1]")
    check(config.data.get("segment") is not None,
          "objective.name='sam' needs data.segment (target masks and prompts, see data/prompts.py)")
    check(not (o.get("encoder", "vit") == "vitdet" and config.get("init_from")),
          "init_from restores one of our ViTs: use objective.encoder='vit' (or objective.sam_checkpoint for "
          "official SAM weights)")
    chunk = config.model.get("attention_chunk", 0)
    check(isinstance(chunk, int) and chunk >= 0,
          f"model.attention_chunk={chunk!r}: an integer >= 0 (0: whole attention; N: N queries at a time)")
    check(not (chunk and o.get("encoder", "vit") != "vitdet"),
          "model.attention_chunk applies to SAM's own image encoder: set objective.encoder='vitdet' or leave it 0")
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
    # Point rounds the evals report: objective.eval_point_rounds, or -1 = objective.rounds for
    # recipe 'sam' and none for 'medsam' (box prompts only).
    eval_rounds = int(o.get("eval_point_rounds", -1))
    self.eval_point_rounds = eval_rounds if eval_rounds >= 0 else (self.rounds if self.recipe == "sam" else 0)
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
    smooth = float(o.get("dice_smooth", 1.0))
    if self.recipe == "medsam":
      bce = optax.sigmoid_binary_cross_entropy(up, jnp.broadcast_to(target, up.shape)).mean((-2, -1))
      return o.get("dice_weight", 1.0) * dice_loss(up, target, smooth) + o.get("bce_weight", 1.0) * bce
    return o.get("focal_weight", 20.0) * focal_loss(up, target) + o.get("dice_weight", 1.0) * dice_loss(up, target, smooth)

  def _first_prompt(self, batch, rng, first: str):
    """Round-0 prompt as two tokens, per example: the box corners (labels 2, 3: the same tokens as
    a box prompt) or one positive point and SAM's 'not a point' padding; ``first`` 'box', 'point'
    or 'random' (a box with probability ``objective.box_prob``). Encoded with ``pad_points=False``,
    so each matches SAM's own encoding of that prompt (later clicks are appended; token order does
    not matter to the decoder). -> points, labels, is_box."""
    b = batch["box"].shape[0]
    if first == "random":
      is_box = jax.random.uniform(rng, (b,)) < self.config.objective.get("box_prob", 0.5)
    else:
      is_box = jnp.full((b,), first == "box")
    corners = batch["box"].reshape(b, 2, 2)
    point = jnp.concatenate([batch["points"][:, :1], jnp.zeros((b, 1, 2))], axis=1)
    points = jnp.where(is_box[:, None, None], corners, point)
    labels = jnp.where(is_box[:, None], jnp.array([2, 3]), jnp.array([1, -1])).astype(jnp.int32)
    return points, labels, is_box

  def _interact(self, v, emb, batch, rng, first: str, rounds: int, train: bool):
    """``rounds`` prompt rounds on image embeddings ``emb``: round 0 the first prompt
    (:meth:`_first_prompt`), then one correction click per round from the error region of the
    previous prediction, whose low-res logits go back in as the mask prompt (SAM's interactive
    training). An ambiguous one-point prompt predicts 3 masks: training keeps the one with the
    lowest loss (only it is backpropagated), evaluation the one the IoU head rates best. Training
    clicks are uniform over the error region (:func:`correction_points`), evaluation clicks at its
    centre (:func:`center_points`). -> (mean loss over rounds [B], upsampled logits [B, H, W] of
    the used mask per round, final points [B, N, 2], final labels [B, N])."""
    o = self.config.objective
    iou_weight = o.get("iou_weight", 1.0 if self.recipe == "sam" else 0.0)
    target = batch["target"]
    first_rng, *click_rngs = jax.random.split(rng, 1 + rounds)
    points, labels, is_box = self._first_prompt(batch, first_rng, first)
    logits, iou_pred = self.model.apply(v, emb, points[:, None], labels[:, None], multimask_output=None,
                                        pad_points=False, method="predict")
    logits, iou_pred = logits[:, 0], iou_pred[:, 0]                          # [B, K+1, h, w], [B, K+1]
    up = self._upsample(logits)
    per_mask = self._mask_loss(up, target[:, None])                         # [B, K+1]
    score = -per_mask[:, 1:] if train else iou_pred[:, 1:]
    best = jnp.where(~is_box, 1 + jnp.argmax(score, -1), 0)
    pick = lambda x: jnp.take_along_axis(x, best.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]
    actual = jax.lax.stop_gradient(hard_scores(up, target[:, None])[1])    # [B, K+1]
    loss = pick(per_mask) + iou_weight * ((iou_pred - actual) ** 2).mean(-1)
    chosen = pick(logits)
    ups = [pick(up)]
    for r in range(1, rounds):
      prev = jax.lax.stop_gradient(chosen)
      if train:
        click, click_label = correction_points(click_rngs[r], ups[-1], target)
      else:
        click, click_label = center_points(ups[-1], target)
      points = jnp.concatenate([points, click[:, None]], axis=1)
      labels = jnp.concatenate([labels, click_label[:, None]], axis=1)
      logits, iou_pred = self.model.apply(v, emb, points[:, None], labels[:, None], masks=prev[:, None],
                                          multimask_output=False, pad_points=False, method="predict")
      chosen, iou_pred = logits[:, 0, 0], iou_pred[:, 0, 0]
      up = self._upsample(chosen)
      actual = jax.lax.stop_gradient(hard_scores(up, target)[1])
      loss = loss + self._mask_loss(up, target) + iou_weight * (iou_pred - actual) ** 2
      ups.append(up)
    return loss / rounds, ups, points, labels

  def loss(self, params, extra, batch, rng, step):
    del step
    v = {"params": self.effective_params(params)}
    drop_rng, rng = jax.random.split(rng)
    emb = self.model.apply(v, batch["image"], deterministic=False, method="embed_image", rngs={"dropout": drop_rng})
    first = "box" if self.recipe == "medsam" else "random"
    loss, ups, _, _ = self._interact(v, emb, batch, rng, first, self.rounds, train=True)
    dice_first, dice_last, iou_last = (hard_scores(ups[0], batch["target"])[0],
                                       *hard_scores(ups[-1], batch["target"]))
    metrics = {"dice_first": dice_first.mean(), "dice_last": dice_last.mean(), "iou_last": iou_last.mean()}
    return loss.mean(), (metrics, extra)

  def predictions(self, params, batch, point_rounds: int) -> dict[str, tuple]:
    """Deterministic predictions per prompt type: ``'box'`` (single mask) and, for ``k`` in
    ``1..point_rounds``, ``'points_k'``: one positive point (the best of 3 masks by the IoU head)
    followed by ``k - 1`` correction clicks at the centre of the error region. -> prompt type ->
    (upsampled logits [B, H, W], points [B, N, 2], labels [B, N]; box corners carry labels 2 / 3)."""
    v = {"params": self.effective_params(params)}
    emb = self.model.apply(v, batch["image"], method="embed_image")
    rng = jax.random.key(0)     # unused: evaluation prompts are deterministic
    _, ups, pts, labs = self._interact(v, emb, batch, rng, "box", 1, train=False)
    out = {"box": (ups[0], pts, labs)}
    if point_rounds:
      _, ups, pts, labs = self._interact(v, emb, batch, rng, "point", point_rounds, train=False)
      for k, up in enumerate(ups, 1):
        n = 1 + k                 # the first point, its 'not a point' padding, k - 1 clicks
        out[f"points_{k}"] = (up, pts[:, :n], labs[:, :n])
    return out

  @functools.cached_property
  def _jit_predictions(self):
    return jax.jit(self.predictions, static_argnums=2)

  def eval_metrics(self, params, extra, batch, rng):
    """``dice_<prompt>`` and ``iou_<prompt>`` for every prompt type of :meth:`predictions`
    (``objective.eval_point_rounds`` point rounds), and per target class (``.../<class>``: those of
    ``data.segment.classes`` and 'body', the fallback target) when there are several."""
    del extra, rng
    mask = batch["mask"]
    # Targets come from data.segment.classes, or the body of an image that has none of them.
    classes = [c for c in phantoms.MASK_CLASSES if c in self.data.segment.classes or c == "body"]
    out = {}
    for prompt, (logits, _, _) in self.predictions(params, batch, self.eval_point_rounds).items():
      dice, iou = hard_scores(logits, batch["target"])
      out[f"dice_{prompt}"], out[f"iou_{prompt}"] = base.masked_sum(dice, mask), base.masked_sum(iou, mask)
      for name in classes if len(classes) > 1 else ():
        rows = mask & (batch["target_class"] == phantoms.MASK_CLASSES.index(name))
        out[f"dice_{prompt}/{name}"], out[f"iou_{prompt}/{name}"] = base.masked_sum(dice, rows), base.masked_sum(iou, rows)
    return out

  def overlay(self, params, batch, n: int = 8) -> np.ndarray:
    """uint8 RGB picture of up to ``n`` examples of ``batch``: the box-prompted prediction (top
    row) and, with point rounds, the prediction after the last click (bottom row, clicks drawn);
    target green, prediction red, box blue, positive clicks yellow, negative magenta."""
    n = min(n, batch["image"].shape[0])
    head = {k: v[:n] for k, v in batch.items()}
    preds = jax.device_get(self._jit_predictions(params, head, self.eval_point_rounds))
    d = self.config.data
    img = np.asarray(head["image"], np.float32) * np.asarray(d.std, np.float32) + np.asarray(d.mean, np.float32)
    target, box = np.asarray(head["target"]) > 0.5, np.asarray(head["box"])
    rows = [overlay_grid(img, target, preds["box"][0] > 0, box)]
    if self.eval_point_rounds:
      logits, pts, labs = preds[f"points_{self.eval_point_rounds}"]
      rows.append(overlay_grid(img, target, logits > 0, None, pts, labs))
    return np.concatenate(rows, axis=0)

  def eval_artifacts(self, params, extra, batch, rng, workdir, step):
    """``WORKDIR/overlays/step_N.png`` (:meth:`overlay`)."""
    del extra, rng
    picture = self.overlay(params, batch)
    if jax.process_index() == 0:
      storage.write_bytes(storage.path(workdir) / "overlays" / f"step_{step:07d}.png", image_files.encode_png(picture))


def overlay_grid(images, targets, preds, boxes=None, points=None, labels=None, scale: int = 4) -> np.ndarray:
  """Images in [0, 1] ``[n, H, W, C]`` with target (green), prediction (red) and box (blue,
  ``boxes [n, 4]``) outlines and clicks (``points [n, N, 2]`` with ``labels [n, N]``: 1 yellow,
  0 magenta, others not drawn), side by side, enlarged ``scale`` times -> uint8 ``[H*s, n*W*s, 3]``."""
  def edge(m):
    m = np.kron(m, np.ones((scale, scale), bool))
    return m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
  tiles = []
  for i, (img, t, p) in enumerate(zip(images, targets, preds)):
    rgb = np.repeat(np.clip(img, 0, 1), 3 // img.shape[-1], -1)[..., :3]
    rgb = np.kron(rgb, np.ones((scale, scale, 1))) * 0.8
    box = np.zeros(t.shape, bool)
    if boxes is not None:
      x0, y0, x1, y1 = np.clip(np.round(boxes[i]).astype(int), 0, [t.shape[1] - 1, t.shape[0] - 1] * 2)
      box[y0:y1 + 1, x0:x1 + 1] = True
    for m, color in ((box, (0.2, 0.4, 1.0)), (t, (0.1, 1.0, 0.1)), (p, (1.0, 0.1, 0.1))):
      rgb[edge(m)] = color
    for (x, y), label in zip(points[i] if points is not None else (), labels[i] if labels is not None else ()):
      if label in (0, 1):
        x, y = int(np.clip(x, 0, t.shape[1] - 1)), int(np.clip(y, 0, t.shape[0] - 1))
        rgb[y * scale:(y + 1) * scale, x * scale:(x + 1) * scale] = (1.0, 1.0, 0.0) if label == 1 else (1.0, 0.0, 1.0)
    tiles.append(rgb)
  return (np.concatenate(tiles, axis=1) * 255).astype(np.uint8)
