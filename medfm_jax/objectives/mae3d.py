"""3D MAE (the OpenMind / nnssl recipe for volumes): a volumetric ViT encoder on the visible
patches, the MAE decoder, 75% of the volume masked in blocks of ``objective.mask_block`` voxels
(16^3: 2x2x2 patches of 8^3), MSE on the masked voxels, optionally against per-patch normalised
targets (``objective.norm_pix_loss``). The encoder sees only the visible tokens (MAE-style), so a
75% mask cuts its attention cost 16x.

Config: ``config.data.volume`` (crop size etc., see ``data.volumes.VolumeSpec``) and the
``configs/mae.py`` fields, plus ``objective.mask_block`` (voxels per block side: an int or three)
and ``model.patch_3d`` (anisotropic patches; empty = cubic from ``model.variant``).
"""
from __future__ import annotations

import io

import jax
import numpy as np
from PIL import Image

from medfm_jax import storage
from medfm_jax.errors import check, config_errors
from medfm_jax.models import mae as mae_model
from medfm_jax.models import vit
from medfm_jax.objectives import mae


def mask_block_of(config) -> tuple[int, int, int]:
  """``objective.mask_block`` voxels per block as (z, y, x)."""
  raw = config.objective.get("mask_block", 16)
  return tuple(int(v) for v in np.broadcast_to(np.asarray(raw), (3,)))


class Mae3dObjective(mae.MaeObjective):
  """``config.objective``: mask_ratio, mask_block, norm_pix_loss, recon_examples; ``config.model``:
  the ViT fields (+ patch_3d) + decoder_width, decoder_depth, decoder_heads; ``config.data.volume``."""
  name = "mae3d"

  @classmethod
  def check_config(cls, config):
    d, m, r = config.data, config.model, config.objective.mask_ratio
    check(bool(d.get("volume")), "objective.name='mae3d' needs data.volume (a dict with at least size)")
    with config_errors():
      size = vit.volume_size_from_config(d)
      patch = vit.patch_3d_from_config(m) or (vit.size_from_config(m).patch_size,) * 3
    block = mask_block_of(config)
    check(all(s % p == 0 for s, p in zip(size, patch)),
          f"data.volume.size={size}: must be divisible by the patch shape {patch}")
    check(all(b % p == 0 and s % b == 0 for b, p, s in zip(block, patch, size)),
          f"objective.mask_block={block}: must be a multiple of the patch shape {patch} and divide "
          f"data.volume.size={size}")
    check(0.0 < r < 1.0, f"objective.mask_ratio={r}: must be in the open interval (0, 1)")
    mae.check_loss_fields(config)
    num_blocks = int(np.prod([s // b for s, b in zip(size, block)]))
    check(int(num_blocks * (1 - r)) >= 1,
          f"objective.mask_ratio={r}: keeps no block of {num_blocks} (objective.mask_block={block})")
    check(m.decoder_width % m.decoder_heads == 0 and m.decoder_width >= 6,
          f"model.decoder_width={m.decoder_width}: must be >= 6 and divisible by model.decoder_heads={m.decoder_heads}")
    check(m.get("pos_embed", "sincos3d") in ("sincos3d", "learned"),
          f"model.pos_embed={m.get('pos_embed')!r}: volumes allow 'sincos3d' or 'learned'")
    check(m.get("patch_embed", "patch") == "patch", "model.patch_embed: volumes allow only 'patch'")
    check(not config.objective.get("knn_train_examples", 0), "objective.knn_train_examples: the "
          "frozen-feature monitor classifies 2D images; set 0 for volumes")

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    self.patch_shape = self.model.encoder.patch_shape(3)
    self.block = tuple(b // p for b, p in zip(mask_block_of(config), self.patch_shape))
    self.mask_block = int(np.prod(self.block))

  def _noise(self, rng, images):
    grid = vit.patch_grid(images.shape[1:-1], self.patch_shape)
    coarse = int(np.prod([g // k for g, k in zip(grid, self.block)]))
    return mae_model.block_noise(jax.random.uniform(rng, (images.shape[0], coarse)), grid, self.block)

  def eval_artifacts(self, params, extra, batch, rng, workdir, step):
    columns = self._recon_columns(params, batch["image"])
    if jax.process_index() != 0:
      return
    write_orthogonal_slices([np.asarray(x) for x in columns],
                            storage.path(workdir) / "recon" / f"step_{step:07d}.png")


def orthogonal_slices(volume: np.ndarray) -> np.ndarray:
  """``[D, H, W]`` -> the central axial, coronal and sagittal slices side by side ``[S, 3S]``
  (each resized to the largest side S, nearest neighbour)."""
  d, h, w = volume.shape
  planes = [volume[d // 2], volume[:, h // 2][::-1], volume[:, :, w // 2][::-1]]   # superior up
  side = max(d, h, w)
  resize = lambda p: p[np.arange(side) * p.shape[0] // side][:, np.arange(side) * p.shape[1] // side]
  return np.concatenate([resize(p) for p in planes], axis=1)


def write_orthogonal_slices(columns: list[np.ndarray], path, labels: list[np.ndarray] | None = None) -> None:
  """Writes one row per example of each column's ``[n, D, H, W, 1]`` volume as three orthogonal
  slices (columns side by side, e.g. image | masked input | reconstruction), each row windowed to
  the first column's 1st-99th percentile; ``labels`` (int ``[n, D, H, W]`` maps) add columns
  coloured by class. ``path`` local or URL."""
  rows = []
  for i in range(columns[0].shape[0]):
    lo, hi = np.percentile(columns[0][i], (1, 99))
    grey = [np.clip((orthogonal_slices(c[i, ..., 0]) - lo) / max(hi - lo, 1e-6), 0, 1) for c in columns]
    cells = [np.repeat(g[..., None], 3, -1) for g in grey]
    for lab in labels or []:
      palette = np.array([[0, 0, 0], [0.9, 0.3, 0.2], [0.2, 0.7, 0.9], [1.0, 0.9, 0.1], [0.5, 0.9, 0.3]])
      cells.append(palette[np.clip(orthogonal_slices(lab[i]), 0, len(palette) - 1)])
    rows.append(np.concatenate(cells, axis=1))
  grid = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
  png = io.BytesIO()
  Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(png, "PNG")
  storage.write_bytes(path, png.getvalue())
