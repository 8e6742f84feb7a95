r"""Segments a folder of images from box or point prompts in a CSV; writes PNG masks and IoU scores.

  python -m medfm_jax.segment --weights=medsam_vit_b.pth --images=DIR --prompts=prompts.csv --out=OUT
  python -m medfm_jax.segment --weights=runs/sam_tiny --images=DIR --prompts=prompts.csv --out=OUT

``--weights``: a SAM / MedSAM checkpoint (HF ``SamModel`` directory, ``segment_anything`` ``.pth``,
``*.safetensors``; normalised with ImageNet mean/std, 3 channels) or a workdir / checkpoint of
objective ``sam`` (its own data normalisation and channels). ``--prompts`` CSV, one prompt per row:
``image`` (file name under ``--images``) and either ``box`` = ``"x0 y0 x1 y1"`` or ``points`` =
``"x y label; x y label ..."`` (label 1 foreground, 0 background), in pixels of the original image.

Images are resized so the longest side is the model's input size and padded at the bottom / right
(SAM's preprocessing); the low-res logits are upsampled back, cropped and resized to the original
size. Writes ``OUT/<image stem>_<row>.png`` (0 / 255) and ``OUT/scores.csv`` with the predicted
IoU (single-mask output for boxes and several points, the best of 3 by predicted IoU for one point).
"""
from __future__ import annotations

import csv
import io
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from medfm_jax import storage
from medfm_jax.interop import sam as sam_io
from medfm_jax.objectives import sam as sam_objective
from medfm_jax.train import checkpoint

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

flags.DEFINE_string("weights", None, "SAM/MedSAM checkpoint (HF dir, .pth, .safetensors) or a workdir of objective 'sam'")
flags.DEFINE_string("images", None, "folder of the images named in --prompts")
flags.DEFINE_string("prompts", None, "CSV: image, box ('x0 y0 x1 y1') or points ('x y label; ...')")
flags.DEFINE_string("out", None, "output folder: PNG masks and scores.csv")


class Segmenter:
  """A SAM model with its params and preprocessing: ``(image uint8 [H, W, C], prompt) -> (mask, iou)``."""

  def __init__(self, weights: str):
    if _is_run(weights):
      config = checkpoint.read_meta(weights)["config"]
      if config.get("objective", {}).get("name") != "sam":
        raise ValueError(f"--weights={weights!r}: a run of objective {config.get('objective', {}).get('name')!r}, "
                         "not 'sam'")
      config = ml_collections.ConfigDict(config)
      config.init_from = ""                       # the run's own params replace the encoder anyway
      config.objective.sam_checkpoint = ""
      objective = sam_objective.SamObjective(config)
      self.model = objective.model
      self.params = objective.effective_params(jax.tree.map(jnp.asarray, checkpoint.restore_params(weights)))
      self.size, self.channels = int(config.data.image_size), int(config.data.channels)
      self.mean, self.std = tuple(config.data.mean), tuple(config.data.std)
    else:
      self.model, self.params, cfg = sam_io.load(weights)
      self.size, self.channels = int(cfg["image_size"]), int(cfg["channels"])
      self.mean, self.std = IMAGENET
    self._embed = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="embed_image"))
    self._predict = jax.jit(lambda p, e, pts, lab, mm: self.model.apply(
        {"params": p}, e, pts, lab, multimask_output=mm, method="predict"), static_argnums=4)

  def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, float]:
    """uint8 [H, W, C] -> (normalised, resized, padded [S, S, channels], scale)."""
    if image.ndim == 2:
      image = image[..., None]
    image = image[..., :1] if self.channels == 1 else np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]
    h, w = image.shape[:2]
    scale = self.size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).resize((nw, nh), Image.BILINEAR)
    x = np.asarray(pil, np.float32).reshape(nh, nw, -1) / 255.0
    x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    out = np.zeros((self.size, self.size, self.channels), np.float32)
    out[:nh, :nw] = x
    return out, scale

  def __call__(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """``points [N, 2]`` with ``labels [N]`` (a box: its corners with labels 2, 3), original pixels
    -> (bool mask [H, W], predicted IoU)."""
    h, w = image.shape[:2]
    x, scale = self.preprocess(image)
    emb = self._embed(self.params, jnp.asarray(x[None]))
    single_point = len(labels) == 1
    pts = np.concatenate([points * scale, np.zeros((1, 2))]) if single_point else points * scale
    lab = np.concatenate([labels, [-1]]) if single_point else labels
    logits, iou = self._predict(self.params, emb, jnp.asarray(pts[None, None], jnp.float32),
                                jnp.asarray(lab[None, None], jnp.int32), single_point)
    best = int(np.argmax(np.asarray(iou[0, 0])))
    low = np.asarray(logits[0, 0, best])
    up = np.asarray(jax.image.resize(low, (self.size, self.size), "bilinear"))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    full = np.asarray(jax.image.resize(up[:nh, :nw], (h, w), "bilinear"))
    return full > 0, float(iou[0, 0, best])


def _is_run(path: str) -> bool:
  p = storage.path(path)
  return p.is_dir() and ((p / "checkpoints").exists() or (p / "meta").exists() or p.name.isdigit()
                         or p.name == "checkpoints")


def parse_prompt(row: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
  """A CSV row -> (points [N, 2], labels [N]); a box becomes its two corners (labels 2, 3)."""
  box, points = (row.get("box") or "").strip(), (row.get("points") or "").strip()
  if bool(box) == bool(points):
    raise ValueError(f"{where}: give exactly one of 'box' ('x0 y0 x1 y1') and 'points' ('x y label; ...')")
  try:
    if box:
      v = np.array([float(t) for t in box.replace(",", " ").split()], np.float32)
      if v.shape != (4,):
        raise ValueError
      return v.reshape(2, 2), np.array([2, 3], np.int32)
    triples = [[float(t) for t in p.replace(",", " ").split()] for p in points.split(";") if p.strip()]
    if not triples or any(len(t) != 3 or t[2] not in (0, 1) for t in triples):
      raise ValueError
  except ValueError:
    raise ValueError(f"{where}: cannot parse box={box!r} / points={points!r}") from None
  arr = np.array(triples, np.float32)
  return arr[:, :2], arr[:, 2].astype(np.int32)


def run(weights: str | Segmenter, images: str, prompts: str, out: str) -> str:
  """Segments every prompt row; returns the scores CSV path. ``weights``: a path or a :class:`Segmenter`."""
  seg = weights if isinstance(weights, Segmenter) else Segmenter(weights)
  rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.path(prompts)), newline="")))
  if not rows or "image" not in rows[0]:
    raise ValueError(f"--prompts={prompts!r}: needs a header with 'image' and 'box' or 'points'")
  out_dir = storage.path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  results, cache = [], {}
  for i, row in enumerate(rows):
    where = f"{prompts}: row {i + 1}"
    name = row["image"].strip()
    if name not in cache:
      path = storage.path(images) / name
      if not path.exists():
        raise ValueError(f"{where}: image {str(path)!r} does not exist")
      with path.open("rb") as f:
        cache = {name: np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))}
    points, labels = parse_prompt(row, where)
    mask, iou = seg(cache[name], points, labels)
    png = f"{os.path.splitext(os.path.basename(name))[0]}_{i}.png"
    buf = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).save(buf, format="PNG")
    (out_dir / png).write_bytes(buf.getvalue())
    results.append({"image": name, "row": i, "mask": png, "predicted_iou": f"{iou:.6f}"})
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=["image", "row", "mask", "predicted_iou"])
  writer.writeheader()
  writer.writerows(results)
  (out_dir / "scores.csv").write_text(buf.getvalue())
  return str(out_dir / "scores.csv")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  missing = [n for n in ("weights", "images", "prompts", "out") if not getattr(f, n)]
  if missing:
    sys.stderr.write(f"medfm_jax.segment: missing --{', --'.join(missing)}\n")
    sys.exit(2)
  try:
    print(run(f.weights, f.images, f.prompts, f.out))
  except (ValueError, checkpoint.CheckpointError) as e:
    sys.stderr.write(f"medfm_jax.segment: {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
