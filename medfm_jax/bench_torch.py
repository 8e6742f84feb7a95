"""PyTorch eager MAE train-step timing (Hugging Face ``ViTMAEForPreTraining``) for side-by-side benchmarks.

torch and transformers are imported lazily (the ``parity`` extra), so importing this module is free.
"""
from __future__ import annotations

import os
import statistics
import time

from medfm_jax.models import vit


def torch_mae_train_step_time(encoder: "str | vit.ViTSize", image_size: int = 224, channels: int = 3, batch_size: int = 32,
                              decoder_width: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                              steps: int = 10, warmup: int = 3, threads: int | None = None,
                              seed: int = 0) -> dict[str, float]:
  """Median wall time of a full train step (forward + backward + AdamW step), torch eager float32.

  ``encoder`` is a :data:`medfm_jax.models.vit.VARIANTS` string such as ``"B/16"``; MAE settings:
  mask ratio 0.75, norm_pix_loss, LayerNorm eps 1e-6, decoder MLP 4x; AdamW(lr 1e-4, betas
  (0.9, 0.95), weight decay 0.05 on >=2-D tensors only). Random images, fresh masking noise per step.
  Returns ``dict(step_time_median_s, images_per_s)``.
  """
  import torch  # optional: the 'parity' extra; pylint: disable=import-outside-toplevel
  import transformers  # optional: the 'parity' extra; pylint: disable=import-outside-toplevel

  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  size = encoder if isinstance(encoder, vit.ViTSize) else vit.parse_variant(encoder)
  config = transformers.ViTMAEConfig(
      hidden_size=size.width, num_hidden_layers=size.depth, num_attention_heads=size.num_heads,
      intermediate_size=size.mlp_dim, patch_size=size.patch_size, image_size=image_size,
      num_channels=channels, layer_norm_eps=1e-6, decoder_hidden_size=decoder_width,
      decoder_num_hidden_layers=decoder_depth, decoder_num_attention_heads=decoder_heads,
      decoder_intermediate_size=4 * decoder_width, mask_ratio=0.75, norm_pix_loss=True)
  prev_threads = torch.get_num_threads()
  torch.set_num_threads(threads or os.cpu_count() or 1)
  try:
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(config).float().train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95))
    pixels = torch.randn(batch_size, channels, image_size, image_size)
    times = []
    for i in range(warmup + steps):
      start = time.perf_counter()
      optimizer.zero_grad(set_to_none=True)
      loss = model(pixel_values=pixels).loss
      loss.backward()
      optimizer.step()
      elapsed = time.perf_counter() - start
      if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite torch MAE loss {loss.item()} at step {i}")
      if i >= warmup:
        times.append(elapsed)
  finally:
    torch.set_num_threads(prev_threads)
  median = statistics.median(times)
  return {"step_time_median_s": median, "images_per_s": batch_size / median}
