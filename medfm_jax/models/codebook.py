"""Discrete masked-image-modelling targets: a VQ codebook of image patches (FLAVA's MIM ids).

FLAVA predicts the ids a pretrained image tokenizer (DALL-E's dVAE) gives each patch. Here the
tokenizer is a user-supplied ``.npz`` checkpoint: ``codebook [K, P]`` float32 centroids over
patches of ``P = patch_size**2 * channels`` values of the (data.mean/std-normalised) images, plus
``patch_size``, ``channels`` and ``norm_pix`` (whether each patch is first normalised to zero mean
and unit unbiased variance, MAE-style). A patch's id is its nearest centroid (squared L2).

Fit one with k-means on the configured train data (k-means++ init, Lloyd iterations, seeded)::

  python -m medfm_jax.models.codebook --config=configs/flava.py:tiny --out=codebook.npz --size=512
"""
from __future__ import annotations

import dataclasses
import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from medfm_jax import storage
from medfm_jax.data import pipeline
from medfm_jax.models import vit
from medfm_jax.models.mae import normalize_patches


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """``centroids [K, P]`` over ``patch_size x patch_size x channels`` patches."""
  centroids: np.ndarray
  patch_size: int
  channels: int
  norm_pix: bool = True

  @property
  def size(self) -> int:
    return int(self.centroids.shape[0])


def save_codebook(path: str, codebook: Codebook) -> None:
  """Writes ``codebook`` as a ``.npz`` at ``path`` (local or URL)."""
  buf = io.BytesIO()
  np.savez(buf, codebook=codebook.centroids.astype(np.float32), patch_size=codebook.patch_size,
             channels=codebook.channels, norm_pix=codebook.norm_pix)
  storage.write_bytes(path, buf.getvalue())


def load_codebook(path: str) -> Codebook:
  """Reads a codebook ``.npz``; a missing or malformed file raises one ValueError naming it."""
  if not storage.path(path).is_file():
    raise ValueError(f"codebook {path!r}: no such file (make one with python -m medfm_jax.models.codebook)")
  try:
    with np.load(io.BytesIO(storage.path(path).read_bytes()), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"codebook {path!r}: not a .npz file ({e})") from None
  missing = [k for k in ("codebook", "patch_size", "channels", "norm_pix") if k not in arrays]
  if missing:
    raise ValueError(f"codebook {path!r}: missing {missing} (has {sorted(arrays)})")
  centroids = arrays["codebook"]
  patch, channels = int(arrays["patch_size"]), int(arrays["channels"])
  if centroids.ndim != 2 or centroids.shape[0] < 2 or centroids.shape[1] != patch * patch * channels:
    raise ValueError(f"codebook {path!r}: 'codebook' has shape {centroids.shape}, expected [K >= 2, "
                     f"patch_size**2 * channels = {patch * patch * channels}]")
  return Codebook(centroids.astype(np.float32), patch, channels, bool(arrays["norm_pix"]))


def image_patches(images, codebook_or_patch: Codebook | int, norm_pix: bool | None = None):
  """``images [b, H, W, C]`` -> ``[b, N, P]`` float32 patches, normalised per patch if ``norm_pix``
  (by default the codebook's setting)."""
  if isinstance(codebook_or_patch, Codebook):
    patch = codebook_or_patch.patch_size
    norm_pix = codebook_or_patch.norm_pix if norm_pix is None else norm_pix
  else:
    patch = int(codebook_or_patch)
  patches = vit.patchify(jnp.asarray(images, jnp.float32), patch)
  return normalize_patches(patches) if norm_pix else patches


def nearest(x, centroids):
  """Index of the nearest centroid (squared L2) of each row of ``x [..., P]``: int32 ``[...]``."""
  c = jnp.asarray(centroids, jnp.float32)
  cross = jnp.einsum("...p,kp->...k", x, c, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmin(jnp.sum(c * c, -1) - 2.0 * cross, axis=-1).astype(jnp.int32)


def patch_ids(images, codebook: Codebook):
  """MIM target ids ``int32 [b, N]`` of ``images [b, H, W, C]`` (jnp; usable inside ``jit``)."""
  if images.shape[-1] != codebook.channels:
    raise ValueError(f"images have {images.shape[-1]} channels, the codebook {codebook.channels}")
  return nearest(image_patches(images, codebook), codebook.centroids)


def quantisation_error(patches: np.ndarray, centroids: np.ndarray) -> float:
  """Mean squared distance of ``patches [n, P]`` to their nearest centroid."""
  ids = np.asarray(nearest(jnp.asarray(patches), centroids))
  return float(np.mean(np.sum((patches - centroids[ids]) ** 2, -1)))


def fit_kmeans(patches: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
  """``k`` centroids ``[k, P]`` of ``patches [n, P]``: k-means++ init, then ``iters`` Lloyd
  steps (an empty cluster keeps its centroid)."""
  x = np.asarray(patches, np.float32)
  if not 2 <= k <= len(x):
    raise ValueError(f"--size={k}: must be in [2, number of patches {len(x)}]")
  rng = np.random.default_rng(seed)
  centroids = np.empty((k, x.shape[1]), np.float32)
  centroids[0] = x[rng.integers(len(x))]
  d2 = np.sum((x - centroids[0]) ** 2, -1)
  for i in range(1, k):                    # k-means++: next centre with probability ~ d^2
    centroids[i] = x[rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))]
    d2 = np.minimum(d2, np.sum((x - centroids[i]) ** 2, -1))
  for _ in range(iters):
    ids = np.asarray(nearest(jnp.asarray(x), centroids))
    sums = np.zeros_like(centroids)
    np.add.at(sums, ids, x)
    counts = np.bincount(ids, minlength=k)
    filled = counts > 0
    centroids[filled] = sums[filled] / counts[filled, None]
  return centroids


def train_patches(config, num_images: int, patch_size: int, norm_pix: bool, seed: int = 0) -> np.ndarray:
  """``[num_images * N, P]`` patches of augmented train images of ``config.data`` (the images of
  text-only examples of mixed batches are skipped)."""
  batch = min(num_images, 64)
  it = pipeline.make_train_iterator(config.data, batch, seed=seed)
  images, count = [], 0
  try:
    while count < num_images:
      b = next(it)
      images.append(b["image"][b.get("has_image", np.ones(len(b["image"]), bool))])
      count += len(images[-1])
  finally:
    if hasattr(it, "close"):
      it.close()
  patches = np.asarray(image_patches(np.concatenate(images)[:num_images], patch_size, norm_pix))
  return patches.reshape(-1, patches.shape[-1])


def main(argv):
  del argv
  config = _CONFIG.value
  patch = _PATCH.value or vit.size_from_config(config.model).patch_size
  if config.data.image_size % patch:
    raise app.UsageError(f"--patch_size={patch}: must divide data.image_size={config.data.image_size}")
  patches = train_patches(config, _IMAGES.value, patch, _NORM_PIX.value, _SEED.value)
  centroids = fit_kmeans(patches, _SIZE.value, _ITERS.value, _SEED.value)
  save_codebook(_OUT.value, Codebook(centroids, patch, int(config.data.channels), _NORM_PIX.value))
  logging.info("codebook %s: %d x %d from %d patches, quantisation error %.4f", _OUT.value,
               *centroids.shape, len(patches), quantisation_error(patches, centroids))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose train data is used.")
  _OUT = flags.DEFINE_string("out", None, "Output .npz codebook.")
  _SIZE = flags.DEFINE_integer("size", 512, "Number of codes K.")
  _IMAGES = flags.DEFINE_integer("images", 1024, "Train images whose patches are clustered.")
  _ITERS = flags.DEFINE_integer("iters", 20, "Lloyd iterations.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the data stream and the k-means++ init.")
  _PATCH = flags.DEFINE_integer("patch_size", 0, "Patch size (0 = the model's).")
  _NORM_PIX = flags.DEFINE_bool("norm_pix", True, "Normalise each patch (mean 0, unit variance) first.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
