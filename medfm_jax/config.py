"""The shared config contract: optimizer and schedule, model, data, mesh. Fails fast, before any
compile, with one line naming the field (:class:`ConfigError`).

Each objective checks its own fields (``Objective.check_config``, next to the objective's code);
:func:`validate` runs those after the shared checks. Sets of allowed values live next to the code
that uses them (``vit.REMATS``, ``optim.LR_SCALINGS``, ...); messages quote them from there.
"""
from __future__ import annotations

import os
import tempfile

import jax
from ml_collections import config_flags

from medfm_jax import objectives
from medfm_jax.data import decode, sources, tokenizers
from medfm_jax.data import spec as data_spec
from medfm_jax.errors import ConfigError, check as _check, config_errors
from medfm_jax.models import layers, vit
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import optim

__all__ = ["ConfigError", "validate", "explicit_keys"]


def explicit_keys(config_flag) -> set[str]:
  """Dotted keys the command line set (``FLAGS['config']``): the ``k=v`` pairs after the variant
  of ``--config=FILE:VARIANT,k=v`` and the ``--config.k=v`` flags."""
  _, _, arg = config_flags.get_config_filename(config_flag).partition(":")
  return {p.split("=", 1)[0] for p in arg.split(",") if "=" in p} | set(
      config_flags.get_override_values(config_flag))


def _writable(path: str) -> bool:
  """True if ``path`` exists and is writable, or could be created (leaves nothing behind).

  The nearest existing ancestor must be a directory in which a file can really be created:
  ``os.access`` answers yes to root for any directory (root ignores permission bits), also on
  pseudo filesystems such as /proc where nothing can be created.
  """
  if "://" in path:   # bucket URLs: checked by the storage layer at first write
    return True
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return False
    path = parent
  if not os.path.isdir(path):
    return False
  try:
    with tempfile.TemporaryFile(dir=path):   # unnamed (O_TMPFILE) where supported, else unlinked
      return True
  except OSError:
    return False


def _validate_real_data(d) -> None:
  """data.source and the folder/manifest/tfds fields (files are opened later, by the source)."""
  _check(d.source in data_spec.SOURCES, f"data.source={d.source!r}: allowed {', '.join(data_spec.SOURCES)}")
  _check(d.get("on_error", "raise") in sources.ON_ERROR,
         f"data.on_error={d.get('on_error')!r}: allowed {', '.join(sources.ON_ERROR)}")
  _check(d.get("resize", "none") in decode.RESIZE_POLICIES,
         f"data.resize={d.get('resize')!r}: allowed {', '.join(decode.RESIZE_POLICIES)}")
  _check(d.get("load_size", 0) >= 0, f"data.load_size={d.get('load_size')}: must be >= 0 (0 = image_size)")
  for parse in (lambda: decode.parse_window(d.get("window", "auto")),
                lambda: sources.parse_splits(d.get("splits", "train:1"))):
    with config_errors():
      parse()
  if d.source in ("folder", "manifest"):
    path = d.get("path", "")
    exists = os.path.isdir if d.source == "folder" else os.path.isfile
    _check(bool(path) and ("://" in path or exists(path)),
           f"data.path={path!r}: data.source={d.source!r} needs an existing "
           f"{'directory' if d.source == 'folder' else 'CSV/JSONL manifest file'}")
  if d.source == "tfds":
    _check(bool(d.get("name")), "data.name='': data.source='tfds' needs a dataset name ('name[:version]')")


def validate(config, workdir: str | None = None, num_devices: int | None = None) -> dict[str, int]:
  """Checks the shared contract, then the objective's own fields; returns the resolved mesh shape.
  Raises ConfigError on the first problem."""
  num_devices = num_devices or jax.device_count()
  c = config
  objective = objectives.resolve(c.objective.get("name"))
  _check(c.dtype in vit.COMPUTE_DTYPES, f"dtype={c.dtype!r}: allowed {sorted(vit.COMPUTE_DTYPES)}")
  for field in ("total_steps", "batch_size", "grad_accum_steps", "log_every",
                "checkpoint_every", "keep_checkpoints", "stop_check_every"):
    _check(isinstance(c[field], int) and c[field] > 0, f"{field}={c[field]!r}: must be a positive integer")
  _check(isinstance(c.eval_every, int) and c.eval_every >= 0,
         f"eval_every={c.eval_every!r}: must be a positive integer (or 0: no in-training evaluation)")

  # Optimizer and schedule (train/optim.py).
  _check(0 <= c.warmup_steps, f"warmup_steps={c.warmup_steps}: must be >= 0")
  _check(c.lr > 0, f"lr={c.lr}: must be > 0")
  _check(c.lr_scaling in optim.LR_SCALINGS, f"lr_scaling={c.lr_scaling!r}: allowed {optim.LR_SCALINGS}")
  _check(c.weight_decay >= 0, f"weight_decay={c.weight_decay}: must be >= 0")
  _check(c.grad_clip >= 0, f"grad_clip={c.grad_clip}: must be >= 0 (0 disables)")
  _check(c.get("grad_clip_mode", "global") in optim.GRAD_CLIP_MODES,
         f"grad_clip_mode={c.get('grad_clip_mode')!r}: allowed {optim.GRAD_CLIP_MODES}")
  _check(c.optim.get("name", "adamw") in optim.OPTIMIZERS,
         f"optim.name={c.optim.get('name')!r}: allowed {optim.OPTIMIZERS}")
  _check(0.0 <= c.optim.get("momentum", 0.0) < 1.0, f"optim.momentum={c.optim.get('momentum')}: allowed [0, 1)")
  _check(c.get("weight_decay_end") is None or c.weight_decay_end >= 0,
         f"weight_decay_end={c.get('weight_decay_end')}: must be >= 0 (or unset)")

  # Model (models/vit.py, models/layers.py).
  with config_errors():
    size = vit.size_from_config(c.model)
  m = c.model
  _check(size.width % size.num_heads == 0,
         f"model.num_heads={size.num_heads}: must divide the width {size.width}")
  _check(m.get("remat", "none") in vit.REMATS, f"model.remat={m.get('remat')!r}: allowed {vit.REMATS}")
  _check(m.get("pos_embed", "sincos2d") in vit.POS_EMBEDS,
         f"model.pos_embed={m.get('pos_embed')!r}: allowed {vit.POS_EMBEDS}")
  _check(m.get("patch_embed", "patch") in vit.PATCH_EMBEDS,
         f"model.patch_embed={m.get('patch_embed')!r}: allowed {vit.PATCH_EMBEDS}")
  if m.get("patch_embed", "patch") == "conv":
    with config_errors():
      vit.conv_stem_depth(size.patch_size, size.width)
  _check(m.get("cls_pool", "token") in vit.CLS_POOLS,
         f"model.cls_pool={m.get('cls_pool')!r}: allowed {vit.CLS_POOLS}")
  _check(m.get("cls_pool", "token") == "token" or m.get("class_token", True),
         f"model.cls_pool={m.get('cls_pool')!r} needs model.class_token=True (its output slot)")
  with config_errors():   # a known name, and 'pallas' only for a TPU
    vit.resolve_attention_impl(m.get("attention_impl", "auto"), vit.COMPUTE_DTYPES[c.dtype])
  _check(0.0 <= m.get("drop_path", 0.0) < 1.0, f"model.drop_path={m.get('drop_path')}: allowed [0, 1)")
  _check(m.get("num_prompts", 0) >= 0 and m.get("adapter_dim", 0) >= 0,
         f"model.num_prompts={m.get('num_prompts')}, model.adapter_dim={m.get('adapter_dim')}: must be >= 0")
  _check(m.get("adapter_where", "both") in layers.ADAPTER_PLACES,
         f"model.adapter_where={m.get('adapter_where')!r}: allowed {layers.ADAPTER_PLACES}")

  # Data (data/).
  _check(c.data.image_size > 0 and c.data.image_size % size.patch_size == 0,
         f"data.image_size={c.data.image_size}: must be a positive multiple of the patch size "
         f"{size.patch_size} of model.variant={m.variant!r}")
  _check(c.data.channels in (1, 3), f"data.channels={c.data.channels}: allowed 1 or 3")
  _check(len(c.data.mean) in (1, c.data.channels) and len(c.data.std) in (1, c.data.channels),
         f"data.mean/data.std: need 1 or data.channels={c.data.channels} values")
  _check(all(s > 0 for s in c.data.std), f"data.std={c.data.std}: must be positive")
  lo, hi = c.data.crop_scale
  _check(0 < lo <= hi <= 1, f"data.crop_scale={tuple(c.data.crop_scale)}: need 0 < min <= max <= 1")
  _check(c.data.num_workers >= 0, f"data.num_workers={c.data.num_workers}: must be >= 0")
  _validate_real_data(c.data)
  _validate_data_spec(c, size.patch_size)

  # Mesh and batch (parallel/mesh.py).
  here = num_devices == jax.device_count()
  try:
    granules = mesh_lib.dcn_granules(jax.devices()) if here else (1, True)
    ici, dcn = mesh_lib.resolve_hybrid_shape(c.mesh, num_devices, granules[0], not granules[1])
    shape = {a: ici[a] * dcn[a] for a in mesh_lib.MESH_AXES}
  except ValueError as e:
    raise ConfigError(str(e).replace("mesh=", "mesh.{data,fsdp,tensor}=")) from None
  if here:   # arranging the devices can still fail (physical topology): say so before any write
    try:
      mesh_lib.make_mesh(c.mesh)
    except (ValueError, AssertionError, NotImplementedError) as e:
      raise ConfigError(f"mesh={dict(shape)} (mesh.dcn={dcn}): cannot arrange the "
                        f"{num_devices} devices: {' '.join(str(e).split())}") from None
  _check(size.num_heads % shape["tensor"] == 0 and size.mlp_dim % shape["tensor"] == 0,
         f"mesh.tensor={shape['tensor']}: must divide the heads ({size.num_heads}) and MLP width "
         f"({size.mlp_dim}) of model.variant={m.variant!r}")
  shards = shape["data"] * shape["fsdp"]
  per_step = shards * c.grad_accum_steps
  _check(c.batch_size % per_step == 0,
         f"batch_size={c.batch_size}: must be divisible by mesh.data*mesh.fsdp*grad_accum_steps "
         f"= {shape['data']}*{shape['fsdp']}*{c.grad_accum_steps} = {per_step}")
  _check(c.batch_size % jax.process_count() == 0,
         f"batch_size={c.batch_size}: must be divisible by the process count {jax.process_count()}")
  if workdir is not None:
    _check(bool(workdir) and _writable(workdir), f"--workdir={workdir!r}: not a writable directory")

  objective.check_config(c)   # the objective's own fields (objectives/<name>.py)
  return shape


def _validate_data_spec(c, patch_size: int) -> None:
  """The resolved data spec (``data.spec.resolve``: multi-crop, patch masks, tokenizer, MLM,
  mixing) and what single-view patch masks and MLM need of the model."""
  with config_errors():
    d = data_spec.resolve(c.data)
  if d.patch_masks is not None and d.multicrop is None:
    _check(d.mask_patch_size == patch_size,
           f"data.patch_masks.patch_size={d.mask_patch_size}: must equal the model's patch "
           f"size {patch_size}")
  if d.mlm is not None and c.model.get("text") is not None:
    needed = tokenizers.mlm_vocab_size(d.tokenizer.tokenizer())
    _check(c.model.text.vocab_size >= needed,
           f"model.text.vocab_size={c.model.text.vocab_size}: data.mlm needs {needed} (the "
           f"{d.tokenizer.kind!r} vocabulary and its mask id {d.mlm.mask_id})")
