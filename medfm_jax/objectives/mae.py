"""MAE objective: masked-patch reconstruction of (normalised) pixels, held-out loss, recon PNG."""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image

from medfm_jax import storage
from medfm_jax.errors import check
from medfm_jax.metrics import feature_monitor
from medfm_jax.models import heads
from medfm_jax.models import mae as mae_model
from medfm_jax.models import vit
from medfm_jax.objectives import base
from medfm_jax.parallel import programs

_EVAL_NOISE_SEED = 1234   # fixed masks make held-out losses comparable across evaluations


def check_loss_fields(config) -> None:
  """``objective.visible_loss_weight`` and ``objective.encoder_tokens`` (2D and 3D MAE)."""
  visible = config.objective.get("visible_loss_weight", 0.0)
  check(visible >= 0, f"objective.visible_loss_weight={visible}: must be >= 0 (0 = loss on the masked patches only)")
  tokens = config.objective.get("encoder_tokens", "visible")
  check(tokens in ("visible", "all"), f"objective.encoder_tokens={tokens!r}: allowed 'visible' (MAE), "
        "'all' (mask tokens in the encoder: SimMIM, nnssl)")
  check(tokens == "visible" or config.model.get("mask_token", False),
        "objective.encoder_tokens='all' needs model.mask_token=True (the encoder's learned mask token)")


class MaeObjective(base.Objective):
  """``config.objective``: mask_ratio, norm_pix_loss, visible_loss_weight, encoder_tokens,
  recon_examples, knn_train_examples (> 0: the frozen-feature monitor's bank, 0 = off);
  ``config.model``: the ViT fields + decoder_width, decoder_depth, decoder_heads (+ mask_token)."""
  name = "mae"
  image_encoders = {"encoder": ("params", "encoder")}
  hf_export = ("vitmae", ("params",))

  @classmethod
  def check_config(cls, config):
    m, r = config.model, config.objective.mask_ratio
    patch = vit.size_from_config(m).patch_size
    check(0.0 < r < 1.0, f"objective.mask_ratio={r}: must be in the open interval (0, 1)")
    num_patches = (config.data.image_size // patch) ** 2
    check(int(num_patches * (1 - r)) >= 1, f"objective.mask_ratio={r}: keeps no patch of {num_patches}")
    check(m.decoder_width % m.decoder_heads == 0 and m.decoder_width % 4 == 0,
          f"model.decoder_width={m.decoder_width}: must be divisible by 4 and by model.decoder_heads={m.decoder_heads}")
    check(m.get("patch_embed", "patch") != "conv", "model.patch_embed='conv' is not allowed with "
          "objective.name='mae': the stem's overlapping receptive fields would show masked patches' "
          "pixels to the encoder")
    check_loss_fields(config)
    bank = config.objective.get("knn_train_examples", 0)
    check(bank >= 0, f"objective.knn_train_examples={bank}: must be >= 0 (0 = no feature monitor)")

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    m = config.model
    self.model = mae_model.MaskedAutoencoder(vit.vit_from_config(config), m.decoder_width,
                                             m.decoder_depth, m.decoder_heads,
                                             encoder_tokens=config.objective.get("encoder_tokens", "visible"))
    self.patch = vit.parse_variant(m.variant).patch_size
    self.patch_shape = (self.patch, self.patch)   # per spatial axis (volumes: 3 axes)
    self.mask_block = 1                           # patches masked together (whole blocks)
    self.mask_ratio = config.objective.mask_ratio
    self.norm_pix = config.objective.norm_pix_loss
    self.visible_weight = float(config.objective.get("visible_loss_weight", 0.0))
    # Built once so every eval reuses the compiled program; replicated outputs are readable on
    # every process (the batch spans all processes). A few pictures per eval: compiled like a
    # run-once program (parallel.programs).
    self._recon_columns = programs.jit_once(self._recon_columns_fn, out_shardings=P())
    self._pooled_features = jax.jit(self._pooled_features_fn, out_shardings=P())

  def _noise(self, rng, images):
    num_patches = (images.shape[1] // self.patch) * (images.shape[2] // self.patch)
    return jax.random.uniform(rng, (images.shape[0], num_patches))

  def _forward(self, params, images, rng, deterministic=True):
    noise_rng, drop_rng = jax.random.split(rng)
    return self.model.apply({"params": params}, images, self._noise(noise_rng, images), self.mask_ratio,
                            deterministic=deterministic, mask_block=self.mask_block,
                            rngs={"dropout": drop_rng})

  def init(self, rng, batch):
    images = batch["image"]
    variables = self.model.init({"params": rng}, images, self._noise(rng, images), self.mask_ratio,
                                mask_block=self.mask_block)
    return variables["params"], {}

  def loss(self, params, extra, batch, rng, step):
    images = batch["image"]
    out = self._forward(params, images, rng, deterministic=False)
    loss = mae_model.mae_loss(images, out["pred"], out["mask"], self.patch_shape, self.norm_pix,
                              self.visible_weight)
    return loss, ({"mask_fraction": out["mask"].mean()}, extra)

  def eval_metrics(self, params, extra, batch, rng):
    images = batch["image"]
    out = self._forward(params, images, jax.random.PRNGKey(_EVAL_NOISE_SEED))
    per_patch = mae_model.patch_losses(images, out["pred"], self.patch_shape, self.norm_pix)
    per_example = (per_patch * out["mask"]).sum(1) / out["mask"].sum(1)
    return {"loss": base.masked_sum(per_example, batch["mask"])}

  def _pooled_features_fn(self, params, images):
    """The encoder on whole (unmasked) images, patch tokens mean-pooled: the features MAE's
    evaluations probe."""
    encoder = self.model.encoder
    tokens = encoder.apply({"params": params["encoder"]}, images)
    return heads.pool_tokens(tokens, "mean", encoder.num_prefix_tokens)

  def evaluate(self, params, extra, mesh, step):
    """With ``objective.knn_train_examples`` > 0: kNN and few-shot accuracy of the encoder's
    mean-pooled features (``metrics.feature_monitor``)."""
    del extra, step
    bank = self.config.objective.get("knn_train_examples", 0)
    if not bank:
      return {}
    return feature_monitor.frozen_feature_metrics(
        self.data, mesh, lambda images: self._pooled_features(params, images), bank)

  def reconstruct(self, params, images):
    """-> (masked input, reconstruction with visible patches pasted back), both shaped like
    ``images`` (``[b, H, W, C]``, volumes ``[b, D, H, W, C]``)."""
    out = self._forward(params, images, jax.random.PRNGKey(_EVAL_NOISE_SEED))
    target = vit.patchify_any(images.astype(jnp.float32), self.patch_shape)
    pred = out["pred"]
    if self.norm_pix:   # undo the per-patch normalisation with the true patch statistics
      mean = target.mean(-1, keepdims=True)
      std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    m = out["mask"][..., None]
    grid = vit.patch_grid(images.shape[1:-1], self.patch_shape)
    unpatch = lambda x: vit.unpatchify_any(x, self.patch_shape, grid, images.shape[-1])
    return unpatch(target * (1 - m)), unpatch(target * (1 - m) + pred * m)

  def _recon_columns_fn(self, params, images):
    images = images[:min(self.config.objective.recon_examples, images.shape[0])]
    return (images, *self.reconstruct(params, images))

  def eval_artifacts(self, params, extra, batch, rng, workdir, step):
    columns = self._recon_columns(params, batch["image"])
    if jax.process_index() != 0:
      return
    rows = [np.asarray(x) for x in columns]
    write_image_grid(rows, self.config.data, storage.path(workdir) / "recon" / f"step_{step:07d}.png")


def write_image_grid(columns: list[np.ndarray], data_cfg, path) -> None:
  """Writes normalised images ``[n, H, W, C]`` side by side per example (one row each) as a PNG
  (``path`` local or URL)."""
  mean = np.asarray(data_cfg.mean, np.float32)
  std = np.asarray(data_cfg.std, np.float32)
  pixels = [np.clip((c * std + mean) * 255.0, 0, 255).astype(np.uint8) for c in columns]
  grid = np.concatenate([np.concatenate(list(row), axis=1) for row in zip(*pixels)], axis=0)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  png = io.BytesIO()
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(png, "PNG")
  storage.write_bytes(path, png.getvalue())
