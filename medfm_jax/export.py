r"""Publish a run's weights in a PyTorch format:

  python -m medfm_jax.export --workdir=RUN --format=hf|open_clip|timm --out=DIR [--step=N]

``--format=hf`` writes ``DIR/config.json`` and ``DIR/model.safetensors`` that ``transformers`` loads with
``from_pretrained(DIR)``. What is written follows the objective that trained the run
(``Objective.hf_export``): MAE -> ``ViTMAEForPreTraining``; DINO -> the teacher as ``Dinov2Model``
(``Dinov2WithRegistersModel`` with registers); CLIP -> ``CLIPModel`` (SigLIP loss ->
``SiglipModel``); FLAVA -> ``FlavaForPreTraining``; a supervised fine-tune -> its encoder as
``Dinov2Model`` (LoRA adapters merged first; the classifier head is not part of it).
``--format=open_clip``: a CLIP run as open_clip's standard CLIP, or with a timm ViT trunk (runs without
``model.ln_pre``) and a BERT text tower (``model.text.post_ln``) as BiomedCLIP has, and a SigLIP run
in open_clip's SigLIP layout (``open_clip.create_model('local-dir:DIR')``);
``--format=timm``: any run's (default) image encoder as a timm ViT (``timm.create_model('local-dir:DIR',
pretrained=True)``). ``--step``:
the checkpoint to export (default: the latest). Options a format cannot express (the conv stem,
``cls_pool`` other than 'token', ...) are refused in one line before anything is written.
"""
from __future__ import annotations

import sys

import ml_collections
from absl import app, flags, logging

from medfm_jax import objectives
from medfm_jax.errors import ConfigError
from medfm_jax.interop import FAMILIES, openclip, timm_vit
from medfm_jax.storage import path as storage_path
from medfm_jax.train import checkpoint as ckpt_lib

FORMATS = ("hf", "open_clip", "timm")

def checkpoint_path(workdir: str, step: int | None) -> str:
  """The checkpoint of ``workdir`` at ``step`` (None: the latest)."""
  if step is None:
    return workdir
  root = storage_path(workdir)
  for candidate in (root / "checkpoints" / str(step), root / str(step)):
    if (candidate / "state").is_dir():
      return str(candidate)
  raise ckpt_lib.CheckpointError(f"--step={step}: {workdir} has no checkpoints/{step}")


def _target(cls, name: str, fmt: str):
  """(exporter module, state path) of format ``fmt`` for objective class ``cls``."""
  if fmt == "timm":          # the default image encoder, as a timm ViT
    if not cls.image_encoders:
      raise ConfigError(f"--format=timm: objective {name!r} declares no image encoder")
    return timm_vit, next(iter(cls.image_encoders.values()))
  if cls.hf_export is None:
    raise ConfigError(f"--format={fmt}: objective {name!r} declares no export (Objective.hf_export)")
  family, keys = cls.hf_export
  if fmt == "open_clip":
    if family != "clip":
      raise ConfigError(f"--format=open_clip: only CLIP runs (objective 'clip'), not {name!r}")
    return openclip, keys
  return FAMILIES[family], keys


def export_run(workdir: str, out: str, step: int | None = None, fmt: str = "hf") -> str:
  """Writes the run's model at ``step`` to ``out`` in format ``fmt``; returns ``out``."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: allowed {FORMATS}")
  path = checkpoint_path(workdir, step)
  config = ml_collections.ConfigDict(ckpt_lib.read_meta(path)["config"])
  name = config.get("objective", {}).get("name", "")
  try:
    cls = objectives.resolve(name)
  except ConfigError as e:
    raise ckpt_lib.CheckpointError(f"{workdir}: the checkpoint's {e}") from None
  exporter, keys = _target(cls, name, fmt)
  if keys[0] == "params":   # training-time transforms folded in first (LoRA merged)
    tree = cls.standalone_params(config, ckpt_lib.restore_subtree(path, ("params",)))
    for k in keys[1:]:
      tree = tree[k]
  else:
    tree = ckpt_lib.restore_subtree(path, keys)
  try:
    exporter.export(tree, config, out)
  except ValueError as e:   # what the format cannot express, or params that do not fit it
    raise ConfigError(str(e)) from None
  logging.info("exported the %s run %s as %s (%s) to %s", name, path, fmt, exporter.__name__, out)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  try:
    export_run(_WORKDIR.value, _OUT.value, _STEP.value, _FORMAT.value)
  except (ConfigError, ckpt_lib.CheckpointError) as e:
    sys.stderr.write(f"medfm_jax: export error: {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (tests, other CLIs
  # such as medfm_jax.main with its own --workdir) never clashes with their flags.
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (or its checkpoints/<step> directory).")
  _FORMAT = flags.DEFINE_enum("format", "hf", FORMATS, "hf: a transformers directory (config.json, "
                              "model.safetensors); open_clip: a CLIP run for open_clip.create_model('local-dir:DIR'); "
                              "timm: the run's image encoder for timm.create_model('local-dir:DIR').")
  _OUT = flags.DEFINE_string("out", None, "Output directory (created).")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  app.run(main)
