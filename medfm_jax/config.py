"""Config validation: fails fast, before any compile, with one line naming the field."""
from __future__ import annotations

import os
import tempfile

import jax

from medfm_jax import objectives
from medfm_jax.models import vit
from medfm_jax.parallel import mesh as mesh_lib


class ConfigError(ValueError):
  """A config value a user set is not allowed; the message names the field."""


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


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
  from medfm_jax.data import decode, pipeline, sources  # pylint: disable=g-import-not-at-top
  _check(d.source in pipeline.SOURCES, f"data.source={d.source!r}: allowed {', '.join(pipeline.SOURCES)}")
  _check(d.get("on_error", "raise") in sources.ON_ERROR,
         f"data.on_error={d.get('on_error')!r}: allowed {', '.join(sources.ON_ERROR)}")
  _check(d.get("resize", "none") in decode.RESIZE_POLICIES,
         f"data.resize={d.get('resize')!r}: allowed {', '.join(decode.RESIZE_POLICIES)}")
  _check(d.get("load_size", 0) >= 0, f"data.load_size={d.get('load_size')}: must be >= 0 (0 = image_size)")
  for parse in (lambda: decode.parse_window(d.get("window", "auto")),
                lambda: sources.parse_splits(d.get("splits", "train:1"))):
    try:
      parse()
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if d.source in ("folder", "manifest"):
    path = d.get("path", "")
    exists = os.path.isdir if d.source == "folder" else os.path.isfile
    _check(bool(path) and ("://" in path or exists(path)),
           f"data.path={path!r}: data.source={d.source!r} needs an existing "
           f"{'directory' if d.source == 'folder' else 'CSV/JSONL manifest file'}")
  if d.source == "tfds":
    _check(bool(d.get("name")), "data.name='': data.source='tfds' needs a dataset name ('name[:version]')")


def validate(config, workdir: str | None = None, num_devices: int | None = None) -> dict[str, int]:
  """Checks the config; returns the resolved mesh shape. Raises ConfigError on the first problem."""
  num_devices = num_devices or jax.device_count()
  c = config
  _check(c.objective.get("name") in objectives.names(),
         f"objective.name={c.objective.get('name')!r}: allowed {objectives.names()}")
  _check(c.dtype in vit.COMPUTE_DTYPES, f"dtype={c.dtype!r}: allowed {sorted(vit.COMPUTE_DTYPES)}")
  for field in ("total_steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints"):
    _check(isinstance(c[field], int) and c[field] > 0, f"{field}={c[field]!r}: must be a positive integer")
  _check(0 <= c.warmup_steps, f"warmup_steps={c.warmup_steps}: must be >= 0")
  _check(c.lr > 0, f"lr={c.lr}: must be > 0")
  _check(c.lr_scaling in ("linear", "sqrt", "none"), f"lr_scaling={c.lr_scaling!r}: allowed 'linear', 'sqrt', 'none'")
  _check(c.weight_decay >= 0, f"weight_decay={c.weight_decay}: must be >= 0")
  _check(c.grad_clip >= 0, f"grad_clip={c.grad_clip}: must be >= 0 (0 disables)")
  _check(c.get("grad_clip_mode", "global") in ("global", "per_param"),
         f"grad_clip_mode={c.get('grad_clip_mode')!r}: allowed 'global', 'per_param'")
  _check(c.get("weight_decay_end") is None or c.weight_decay_end >= 0,
         f"weight_decay_end={c.get('weight_decay_end')}: must be >= 0 (or unset)")

  try:
    size = vit.size_from_config(c.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  m = c.model
  _check(size.width % size.num_heads == 0,
         f"model.num_heads={size.num_heads}: must divide the width {size.width}")
  _check(m.get("remat", "none") in ("none", "full", "dots"), f"model.remat={m.get('remat')!r}: allowed 'none', 'full', 'dots'")
  _check(m.get("pos_embed", "sincos2d") in ("sincos2d", "learned"),
         f"model.pos_embed={m.get('pos_embed')!r}: allowed 'sincos2d', 'learned'")
  _check(m.get("patch_embed", "patch") in vit.PATCH_EMBEDS,
         f"model.patch_embed={m.get('patch_embed')!r}: allowed {vit.PATCH_EMBEDS}")
  if m.get("patch_embed", "patch") == "conv":
    try:
      vit.conv_stem_depth(size.patch_size, size.width)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _check(c.objective.name != "mae", "model.patch_embed='conv' is not allowed with objective.name='mae': "
           "the stem's overlapping receptive fields would show masked patches' pixels to the encoder")
  _check(m.get("cls_pool", "token") in vit.CLS_POOLS,
         f"model.cls_pool={m.get('cls_pool')!r}: allowed {vit.CLS_POOLS}")
  _check(m.get("cls_pool", "token") == "token" or m.get("class_token", True),
         f"model.cls_pool={m.get('cls_pool')!r} needs model.class_token=True (its output slot)")
  _check(m.get("attention_impl", "auto") in ("auto", "xla", "cudnn"),
         f"model.attention_impl={m.get('attention_impl')!r}: allowed 'auto', 'xla', 'cudnn'")
  _check(0.0 <= m.get("drop_path", 0.0) < 1.0, f"model.drop_path={m.get('drop_path')}: allowed [0, 1)")
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
  _validate_masked_inputs(c, size.patch_size)

  if c.objective.name == "mae":
    r = c.objective.mask_ratio
    _check(0.0 < r < 1.0, f"objective.mask_ratio={r}: must be in the open interval (0, 1)")
    num_patches = (c.data.image_size // size.patch_size) ** 2
    _check(int(num_patches * (1 - r)) >= 1, f"objective.mask_ratio={r}: keeps no patch of {num_patches}")
    _check(m.decoder_width % m.decoder_heads == 0 and m.decoder_width % 4 == 0,
           f"model.decoder_width={m.decoder_width}: must be divisible by 4 and by model.decoder_heads={m.decoder_heads}")

  if c.objective.name == "supervised":
    _validate_supervised(c)

  if c.objective.name == "dino":
    _validate_dino(c, size.patch_size)

  if c.objective.name == "clip":
    _validate_clip(c)

  try:
    granules = mesh_lib.dcn_granules(jax.devices()) if num_devices == jax.device_count() else (1, True)
    ici, dcn = mesh_lib.resolve_hybrid_shape(c.mesh, num_devices, granules[0], not granules[1])
    shape = {a: ici[a] * dcn[a] for a in mesh_lib.MESH_AXES}
  except ValueError as e:
    raise ConfigError(str(e).replace("mesh=", "mesh.{data,fsdp,tensor}=")) from None
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
  return shape


def _validate_masked_inputs(c, patch_size: int) -> None:
  """``data.mlm``, ``data.mix`` and single-view ``data.patch_masks`` (``pipeline.masked_inputs``)."""
  from medfm_jax.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top
  d = c.data
  try:
    extras = pipeline.masked_inputs(d, c.batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if extras is None:
    return
  if extras.patch_masks is not None:
    _check(d.patch_masks.patch_size == patch_size,
           f"data.patch_masks.patch_size={d.patch_masks.patch_size}: must equal the model's patch "
           f"size {patch_size}")
  if extras.mlm is not None and c.model.get("text") is not None:
    needed = tokenizers.mlm_vocab_size(tokenizers.from_config(d).tokenizer())
    _check(c.model.text.vocab_size >= needed,
           f"model.text.vocab_size={c.model.text.vocab_size}: data.mlm needs {needed} (the "
           f"{d.tokenizer!r} vocabulary and its mask id {extras.mlm.mask_id})")


def _validate_dino(c, patch_size: int) -> None:
  """DINO / DINOv2 fields (``objectives/dino.py``) and the multi-crop/iBOT-mask data they need."""
  from medfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from medfm_jax.objectives import dino  # pylint: disable=g-import-not-at-top
  o = c.objective
  _check(o.get("centering", "center") in dino.CENTERINGS,
         f"objective.centering={o.get('centering')!r}: allowed {', '.join(dino.CENTERINGS)}")
  for field in ("dino_loss_weight", "koleo_loss_weight", "ibot_loss_weight"):
    _check(o.get(field, 0.0) >= 0, f"objective.{field}={o.get(field)}: must be >= 0")
  _check(0.0 < o.get("layerwise_decay", 1.0) <= 1.0,
         f"objective.layerwise_decay={o.get('layerwise_decay')}: allowed (0, 1] (1 = off)")
  try:
    spec = pipeline.multicrop_spec(c.data)
    masks = pipeline.patch_mask_spec(c.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(spec is not None, "data.multicrop: the DINO objective needs multi-crop views")
  for name in ("global_size", "local_size"):
    _check(getattr(spec, name) % patch_size == 0,
           f"data.multicrop.{name}={getattr(spec, name)}: must be a multiple of the patch size {patch_size}")
  if o.get("ibot_loss_weight", 0.0) > 0:
    _check(masks is not None, "objective.ibot_loss_weight > 0 needs data.patch_masks "
           "(dict(patch_size, probability, ratio)) for the iBOT block masks")
    _check(c.data.patch_masks.patch_size == patch_size,
           f"data.patch_masks.patch_size={c.data.patch_masks.patch_size}: must equal the model's "
           f"patch size {patch_size}")
    _check(c.model.get("mask_token", False), "objective.ibot_loss_weight > 0 needs model.mask_token=True")


def _validate_clip(c) -> None:
  """CLIP / SigLIP / LiT fields (``objectives/clip.py``), the text tower and the tokenizer."""
  from medfm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from medfm_jax.models import clip as clip_model, text  # pylint: disable=g-import-not-at-top
  from medfm_jax.objectives import clip_losses  # pylint: disable=g-import-not-at-top
  o, m, d = c.objective, c.model, c.data
  _check(o.loss in clip_losses.LOSSES, f"objective.loss={o.loss!r}: allowed {clip_losses.LOSSES}")
  _check(0 < o.max_logit_scale, f"objective.max_logit_scale={o.max_logit_scale}: must be > 0")
  _check(m.image_pool in clip_model.IMAGE_POOLS, f"model.image_pool={m.image_pool!r}: allowed {clip_model.IMAGE_POOLS}")
  _check(m.image_pool == "map" or m.get("class_token", True),
         "model.class_token=False needs model.image_pool='map' (no cls token to pool)")
  _check(isinstance(m.embed_dim, int) and m.embed_dim > 0, f"model.embed_dim={m.embed_dim!r}: must be a positive integer")
  _check(m.image_proj or m.embed_dim == vit.size_from_config(m).width,
         f"model.embed_dim={m.embed_dim}: with model.image_proj=False it must equal the image width "
         f"{vit.size_from_config(m).width}")
  try:
    t = text.text_size(m.text)
    spec = tokenizers.from_config(d)
    tok = spec.tokenizer() if spec is not None else None
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(spec is not None, f"data.tokenizer={d.get('tokenizer')!r}: the CLIP objective needs one of {tokenizers.KINDS}")
  _check(t.pooling in text.POOLINGS, f"model.text.pooling={t.pooling!r}: allowed {text.POOLINGS}")
  _check(t.width % t.num_heads == 0, f"model.text.num_heads={t.num_heads}: must divide model.text.width={t.width}")
  _check(m.get("remat", "none") in ("none", "full", "dots"), f"model.remat={m.get('remat')!r}: allowed 'none', 'full', 'dots'")
  _check(0 < d.context_length <= t.context_length,
         f"data.context_length={d.context_length}: must be in [1, model.text.context_length={t.context_length}]")
  _check(tok.vocab_size <= t.vocab_size,
         f"model.text.vocab_size={t.vocab_size}: smaller than the {d.tokenizer!r} tokenizer's vocabulary ({tok.vocab_size})")
  _check(t.pooling != "eot" or tok.eot_id is not None,
         f"model.text.pooling='eot': the {d.tokenizer!r} tokenizer has no end-of-text token")
  for label in o.get("zero_shot_labels", ()):
    _check(label in ("finding", "modality"),
           f"objective.zero_shot_labels={tuple(o.zero_shot_labels)}: allowed labels 'finding', 'modality'")
    if d.source != "phantoms":   # class names come from the source (as for fine-tuning)
      from medfm_jax.objectives import supervised  # pylint: disable=g-import-not-at-top
      import ml_collections  # pylint: disable=g-import-not-at-top
      data_cfg = ml_collections.ConfigDict(d.to_dict())
      data_cfg.label = label
      try:
        supervised.class_names(data_cfg)
      except ValueError as e:
        raise ConfigError(f"objective.zero_shot_labels: {e} (set objective.zero_shot_labels=() "
                          "for caption-only data)") from None


def _validate_supervised(c) -> None:
  """Fine-tuning fields (``objectives/supervised.py``)."""
  from medfm_jax.objectives import supervised  # pylint: disable=g-import-not-at-top
  o, m = c.objective, c.model
  try:
    supervised.class_names(c.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(o.scheme in supervised.SCHEMES, f"objective.scheme={o.scheme!r}: allowed {supervised.SCHEMES}")
  depth = vit.size_from_config(m).depth
  _check(isinstance(o.last_n, int) and 0 <= o.last_n <= depth,
         f"objective.last_n={o.last_n!r}: must be an integer in [0, depth={depth}]")
  _check(0.0 <= o.layer_decay <= 1.0, f"objective.layer_decay={o.layer_decay}: allowed [0, 1] (0 = off)")
  _check(o.pool in ("cls", "mean"), f"objective.pool={o.pool!r}: allowed 'cls', 'mean'")
  _check(0.0 <= o.label_smoothing < 1.0, f"objective.label_smoothing={o.label_smoothing}: allowed [0, 1)")
  _check(isinstance(o.lora_rank, int) and o.lora_rank > 0,
         f"objective.lora_rank={o.lora_rank!r}: must be a positive integer")
  _check(0.0 <= o.lora_dropout < 1.0, f"objective.lora_dropout={o.lora_dropout}: allowed [0, 1)")
  _check(m.get("num_prompts", 0) >= 0 and m.get("adapter_dim", 0) >= 0,
         f"model.num_prompts={m.get('num_prompts')}, model.adapter_dim={m.get('adapter_dim')}: must be >= 0")
  _check(m.get("adapter_where", "both") in ("attn", "mlp", "both"),
         f"model.adapter_where={m.get('adapter_where')!r}: allowed 'attn', 'mlp', 'both'")
  _check(o.scheme != "prompt" or m.get("num_prompts", 0) > 0,
         "objective.scheme='prompt' needs model.num_prompts > 0")
  _check(o.scheme != "adapter" or m.get("adapter_dim", 0) > 0,
         "objective.scheme='adapter' needs model.adapter_dim > 0")


def validate_eval(config) -> None:
  """Eval-protocol fields (``configs/eval/*.py``); call after :func:`validate`."""
  from medfm_jax.evaluate import protocols  # pylint: disable=g-import-not-at-top
  c = config
  _check(c.protocol in protocols.PROTOCOLS, f"protocol={c.protocol!r}: allowed {protocols.PROTOCOLS}")
  _check(c.features.pool in ("cls", "mean"), f"features.pool={c.features.pool!r}: allowed 'cls', 'mean'")
  _check(c.features.batch_size > 0 and c.features.batch_size % jax.process_count() == 0,
         f"features.batch_size={c.features.batch_size}: must be a positive multiple of the process count")
  _check(c.features.train_examples > 0, f"features.train_examples={c.features.train_examples}: must be > 0")
  _check(c.probe.optimizer in ("adam", "sgd"), f"probe.optimizer={c.probe.optimizer!r}: allowed 'adam', 'sgd'")
  _check(c.probe.epochs > 0 and c.probe.batch_size > 0 and c.probe.lr > 0,
         f"probe.epochs={c.probe.epochs}, probe.batch_size={c.probe.batch_size}, probe.lr={c.probe.lr}: must be > 0")
  _check(c.knn.k > 0 and c.knn.temperature > 0,
         f"knn.k={c.knn.k}, knn.temperature={c.knn.temperature}: must be > 0")
  _check(c.fewshot.shots > 0 and c.fewshot.seeds > 0,
         f"fewshot.shots={c.fewshot.shots}, fewshot.seeds={c.fewshot.seeds}: must be > 0")
  _check(c.fewshot.classifier in ("ridge", "logistic"),
         f"fewshot.classifier={c.fewshot.classifier!r}: allowed 'ridge', 'logistic'")
  _check(c.encoder_weights in ("default", "teacher", "student", "encoder", "backbone"),
         f"encoder_weights={c.encoder_weights!r}: allowed 'default', 'teacher', 'student' (DINO), "
         "'encoder' (MAE), 'backbone' (fine-tuned classifier)")
