"""PyTorch MAE train-step timing (Hugging Face ``ViTMAEForPreTraining``) for side-by-side benchmarks.

CPU or CUDA, float32 or bf16 autocast, eager or ``torch.compile``, SDPA or eager attention.
torch and transformers are imported lazily (the ``parity`` / ``gpu`` extras), so importing this
module is free.
"""
from __future__ import annotations

import os
import statistics
import time

from medfm_jax.models import vit


def torch_mae_train_step_time(encoder: "str | vit.ViTSize", image_size: int = 224, channels: int = 3, batch_size: int = 32,
                              decoder_width: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                              steps: int = 10, warmup: int = 3, threads: int | None = None,
                              seed: int = 0, device: str = "cpu", bf16: bool = False,
                              attention: str = "sdpa", compile_backend: str | None = None) -> dict[str, float]:
  """Median wall time of a full train step (forward + backward + AdamW step).

  ``encoder`` is a :data:`medfm_jax.models.vit.VARIANTS` string such as ``"B/16"``; MAE settings:
  mask ratio 0.75, norm_pix_loss, LayerNorm eps 1e-6, decoder MLP 4x; AdamW(lr 1e-4, betas
  (0.9, 0.95), weight decay 0.05 on >=2-D tensors only; the fused CUDA kernel on GPU). Random
  images, fresh masking noise per step. ``device`` 'cpu' or 'cuda'; ``bf16`` runs forward and
  loss under ``torch.autocast(bfloat16)`` with float32 weights (the usual mixed precision);
  ``attention`` is HF's ``attn_implementation`` ('sdpa' | 'eager'); ``compile_backend`` wraps the
  model in ``torch.compile(backend=...)`` ('inductor' on GPU; 'aot_eager' is a cheap CPU check).

  Returns ``step_time_median_s``, ``images_per_s``, ``first_step_s`` (includes compilation for a
  compiled model) and, on CUDA, ``peak_memory_gib``.
  """
  import torch  # optional: the 'parity'/'gpu' extras; pylint: disable=import-outside-toplevel
  import transformers  # optional: the 'parity'/'gpu' extras; pylint: disable=import-outside-toplevel

  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  if attention not in ("sdpa", "eager"):
    raise ValueError(f"attention={attention!r}: allowed 'sdpa', 'eager'")
  size = encoder if isinstance(encoder, vit.ViTSize) else vit.parse_variant(encoder)
  config = transformers.ViTMAEConfig(
      hidden_size=size.width, num_hidden_layers=size.depth, num_attention_heads=size.num_heads,
      intermediate_size=size.mlp_dim, patch_size=size.patch_size, image_size=image_size,
      num_channels=channels, layer_norm_eps=1e-6, decoder_hidden_size=decoder_width,
      decoder_num_hidden_layers=decoder_depth, decoder_num_attention_heads=decoder_heads,
      decoder_intermediate_size=4 * decoder_width, mask_ratio=0.75, norm_pix_loss=True,
      attn_implementation=attention)
  cuda = device.startswith("cuda")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  prev_threads = torch.get_num_threads()
  if not cuda:
    torch.set_num_threads(threads or os.cpu_count() or 1)
  try:
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(config).float().train().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if cuda else {}))
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    pixels = torch.randn(batch_size, channels, image_size, image_size, device=device)
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + 1 + steps):
      sync()
      start = time.perf_counter()
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = forward(pixel_values=pixels).loss
      loss.backward()
      optimizer.step()
      sync()
      times.append(time.perf_counter() - start)
      if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite torch MAE loss {loss.item()} at step {i}")
  finally:
    torch.set_num_threads(prev_threads)
  out_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
  del model, optimizer, forward, pixels
  if cuda:
    torch.cuda.empty_cache()   # hand the memory back for the JAX cases that follow in this process
  median = statistics.median(times[warmup + 1:])
  out = {"step_time_median_s": median, "images_per_s": batch_size / median, "first_step_s": times[0]}
  if cuda:
    out["peak_memory_gib"] = out_peak
  return out
