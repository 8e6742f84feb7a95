"""Shared config defaults and the ``VARIANT[,key=value...]`` argument parsing.

Every objective's config file builds on :func:`base_config` and exposes
``get_config(arg)``, where ``arg`` is what follows the ``:`` in
``--config=configs/NAME.py:VARIANT,key=value,...``.
"""
from __future__ import annotations

import ast

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Fields every objective shares (the documented config contract)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256            # global, across all devices and processes
  c.lr = 1e-4                   # base lr; effective lr = lr * batch_size / 256 (see lr_scaling)
  c.lr_scaling = "linear"       # 'linear' (x B/256) | 'sqrt' (x sqrt(B/1024)) | 'none'
  c.min_lr = 0.0
  c.warmup_steps = 100
  c.weight_decay = 0.05         # decoupled; only on >=2-D kernels
  c.weight_decay_end = ml_collections.config_dict.placeholder(float)  # set: cosine to it (DINO)
  c.grad_clip = 1.0             # 0 disables
  c.grad_clip_mode = "global"   # 'global' (one norm over all grads) | 'per_param' (DINO)
  c.grad_accum_steps = 1
  c.dtype = "float32"           # compute dtype: 'float32' | 'bfloat16'; params stay float32
  # 'adamw' (b1, b2, eps; decoupled decay) | 'sgd' (momentum; L2 decay added to the gradient)
  c.optim = ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, momentum=0.9))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = fill
  # Across slices (TPU multi-slice; processes elsewhere): mesh axis = in-slice size x dcn size.
  # data=-1: every slice/process on the data axis (1 on one process); all 1: span every device.
  c.mesh.dcn = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.peak_tflops_per_device = 0.0  # 0 = look up the device table

  c.log_every = 50
  c.eval_every = 500                      # 0: no in-training evaluation
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # Several processes agree on a SIGTERM/SIGINT (a tiny all-gather) every this many steps and at
  # checkpoint steps; one process checks after every step.
  c.stop_check_every = 10

  c.data = ml_collections.ConfigDict()
  c.data.source = "phantoms"
  c.data.image_size = 224
  c.data.channels = 3
  c.data.num_workers = 0        # grain worker processes (0 = in-process)
  c.data.prefetch = 2           # batches buffered per worker
  c.data.crop_scale = (0.2, 1.0)
  c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.flip = True
  c.data.mean = (0.5,)          # per channel (one value broadcasts)
  c.data.std = (0.25,)
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.eval_examples = 512
  c.data.eval_batch_size = 128
  # Real data (medfm_jax/data/sources.py): source 'folder' | 'manifest' | 'tfds'.
  c.data.path = ""              # folder root (ROOT/<class>/... or ROOT/<split>/<class>/...) or CSV/JSONL manifest
  c.data.name = ""              # tfds: 'name' or 'name:version'
  c.data.data_dir = ""          # tfds: data_dir (local path or bucket URL; '' = TFDS default)
  c.data.image_key = "image"    # tfds feature names
  c.data.label_key = "label"
  c.data.caption_key = "caption"
  c.data.splits = "train:0.9,val:0.05,test:0.05"   # patient-level split when the data has none
  c.data.split_seed = 0
  c.data.window = "auto"        # auto | minmax | full | lung | mediastinum | soft_tissue | bone | brain | 'center,width'
  c.data.resize = "none"        # none | shortest_side | center_crop | pad (aspect-preserving, before crops)
  c.data.load_size = 0          # target of data.resize (0 = image_size)
  c.data.lesion_scale = 1.0     # phantoms: multiplies every lesion's axes (benchmark tiny: 2, docs/benchmark.md)
  c.data.on_error = "raise"     # raise | skip (skipped files -> WORKDIR/skipped_files.txt, metric data/skipped)

  # Start from pretrained weights: one of our workdirs/checkpoints or a local Hugging Face model
  # directory / weights file (ViTMAEForPreTraining, Dinov2Model, CLIPModel, SiglipModel, FLAVA);
  # its model fields replace config.model's (docs/interop.md). '' = random init.
  c.init_from = ""
  # The closing table of `python -m medfm_jax.main` (medfm_jax/evaluate/closing.py): the pretrained
  # encoder vs its architecture at random init under an eval config ('configs/eval/P.py:VARIANT[,k=v]',
  # P = linear_probe | fewshot | seg_probe) on `labels` (seg_probe: its mask); '' = off. The tiny
  # variants turn it on (tiny_final_eval; docs/benchmark.md).
  c.final_eval = ml_collections.ConfigDict(dict(config="", labels=("lesion_location",)))
  c.model = ml_collections.ConfigDict()
  c.objective = ml_collections.ConfigDict()
  return c


TINY_FINAL_EVAL = ("configs/eval/linear_probe.py:tiny,features.pool=mean,features.train_examples=2048,"
                   "data.eval_examples=1024")


def tiny_final_eval(c: ml_collections.ConfigDict) -> None:
  """The tiny configs' closing table: a linear probe (mean-pooled tokens; MAE trains no cls token)
  of the benchmark tasks at lesion_scale 2, 2048 train / 1024 test images."""
  c.final_eval.config = TINY_FINAL_EVAL
  c.final_eval.labels = ("lesion_location", "lesion_size")


def tiny_image_text(c: ml_collections.ConfigDict) -> None:
  """The CPU demo setup shared by the tiny image-text configs (CLIP/SigLIP, FLAVA): 64-px 1-channel
  phantoms with their captions (byte tokenizer, context 80 = longest caption of 77 bytes + bos/eot),
  mild crops, 512 eval images, batch 128, AdamW lr 1e-3 (0.9, 0.98, eps 1e-6), wd 0.1."""
  c.data.tokenizer = "bytes"
  c.model.text.context_length = c.data.context_length = 80
  c.data.image_size, c.data.channels, c.data.num_workers = 64, 1, 0
  c.data.mean, c.data.std = (0.5,), (0.25,)
  c.data.crop_scale = (0.8, 1.0)
  c.data.eval_examples, c.data.eval_batch_size = 512, 128
  c.batch_size, c.lr, c.weight_decay = 128, 1e-3, 0.1
  c.optim.b2, c.optim.eps = 0.98, 1e-6


def parse_arg(arg: str | None, default_variant: str) -> tuple[str, dict]:
  """Splits ``"variant,k=v,a.b=w"`` into the variant and a dict of overrides."""
  parts = [p for p in (arg or "").split(",") if p]
  variant = default_variant
  if parts and "=" not in parts[0]:
    variant = parts.pop(0)
  overrides = {}
  for part in parts:
    if "=" not in part:
      raise ValueError(f"config argument {part!r}: expected key=value after the variant")
    key, value = part.split("=", 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return variant, overrides


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict, allow_new=()) -> None:
  """Sets dotted ``key=value`` overrides, refusing unknown keys except those in ``allow_new``
  (dotted keys that may be created; their parents must exist)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"config argument {key!r}: unknown field {p!r}")
      node = node[p]
    if leaf not in node and key not in allow_new:
      raise ValueError(f"config argument {key!r}: unknown field {leaf!r}")
    node[leaf] = value
