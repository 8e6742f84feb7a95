"""Evaluation protocols over any checkpoint (or a random-init baseline): linear probe, kNN,
few-shot, fine-tune (through the shared trainer and the supervised objective), zero-shot, promptable
segmentation of a ``sam`` run, 3D segmentation and the linear segmentation probe of the phantom
masks on frozen patch tokens (``seg_probe``).

:func:`run` takes an eval config (``configs/eval/*.py``) and a workdir, and returns the results
that :mod:`medfm_jax.evaluate.results` writes as JSON and Markdown. :func:`check_config` checks the
eval config's own fields (after ``config.validate``).
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from medfm_jax import objectives as objectives_lib
from medfm_jax import storage
from medfm_jax.errors import check
from medfm_jax.data import image_files, phantoms, pipeline, volumes
from medfm_jax.data import spec as data_spec
from medfm_jax.evaluate import features, probe, sliding_window
from medfm_jax.metrics import classification, fewshot, knn
from medfm_jax.metrics import segmentation as seg_metrics
from medfm_jax.models import heads
from medfm_jax.objectives import clip, mae3d, supervised
from medfm_jax.objectives import sam as sam_objective
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import assemble, loop, restore
from medfm_jax.train import state as state_lib

PROTOCOLS = ("linear_probe", "knn", "fewshot", "finetune", "zero_shot", "segment", "segment3d",
             "seg_probe")
FEWSHOT_CLASSIFIERS = ("ridge", "logistic", "centroid")
FEATURE_INPUTS = ("encoder", "pixels")   # features.input: frozen encoder features | raw pixels
# Labels that training-time geometry changes while the label stays (fine-tuning would learn from
# wrong labels): the lesion's quadrant moves under a horizontal flip or a random crop; its size
# class (area as a fraction of the image) grows when a random crop is resized to the full image.
FLIP_CHANGES = ("lesion_location",)
CROP_CHANGES = ("lesion_location", "lesion_size")
# Protocols that run the encoder on the eval config's data.*: they take the checkpoint's image
# geometry (adopt_checkpoint); zero_shot / segment read the run's own data, segment3d volumes.
ADOPTS_DATA = ("linear_probe", "knn", "fewshot", "finetune", "seg_probe")


class EvalError(ValueError):
  """The requested evaluation cannot run on this checkpoint/config."""


def adopt_checkpoint(config, explicit=()) -> None:
  """What the eval CLIs take from ``config.init_from``: its encoder architecture
  (``restore.adopt_architecture``) and, for ``ADOPTS_DATA`` protocols, its image geometry
  (``restore.DATA_FIELDS``: image size, channels, normalisation) except the dotted keys the user set
  (``explicit``, ``config_lib.explicit_keys``). No-op without ``init_from``."""
  saved = restore.adopt_architecture(config)
  if saved and config.get("protocol") in ADOPTS_DATA:
    restore.adopt_data(config, saved, explicit)


def _check_label_geometry(d) -> None:
  """Fine-tuning augmentations must not change the label: no flips for ``FLIP_CHANGES``, no random
  crops for ``CROP_CHANGES`` (unset fields: the pipeline's defaults, ``DataSpec``)."""
  default = data_spec.DataSpec
  flips = d.get("flip", default.flip)
  crops = (tuple(d.get("crop_scale", default.crop_scale)) != (1.0, 1.0)
           or tuple(d.get("crop_ratio", default.crop_ratio)) != (1.0, 1.0))
  if d.label in FLIP_CHANGES:
    check(not flips and not crops, f"data.label={d.label!r} is the lesion's image quadrant, which flips and "
          "random crops change: set data.flip=False, data.crop_scale=(1.0, 1.0) and data.crop_ratio=(1.0, 1.0) "
          "(configs/eval/finetune.py:full_spatial / lora_spatial)")
  elif d.label in CROP_CHANGES:
    check(not crops, f"data.label={d.label!r} is the lesion's area as a fraction of the image, which a random "
          "crop resized to the full image changes: set data.crop_scale=(1.0, 1.0) and data.crop_ratio=(1.0, 1.0) "
          "(configs/eval/finetune.py:full_spatial / lora_spatial)")


def check_config(config) -> None:
  """Eval-protocol fields (``configs/eval/*.py``); call after ``config.validate``. With
  ``init_from``, ``encoder_weights`` must name a tower the checkpoint's objective declares
  (``Objective.image_encoders``; a CheckpointError otherwise)."""
  c = config
  check(c.protocol in PROTOCOLS, f"protocol={c.protocol!r}: allowed {PROTOCOLS}")
  check(c.features.get("input", "encoder") in FEATURE_INPUTS,
        f"features.input={c.features.get('input')!r}: allowed {FEATURE_INPUTS}")
  check(c.features.pool in heads.POOLS, f"features.pool={c.features.pool!r}: allowed {heads.POOLS}")
  check(c.features.batch_size > 0 and c.features.batch_size % jax.process_count() == 0,
        f"features.batch_size={c.features.batch_size}: must be a positive multiple of the process count")
  check(c.features.train_examples > 0, f"features.train_examples={c.features.train_examples}: must be > 0")
  check(c.probe.optimizer in probe.OPTIMIZERS, f"probe.optimizer={c.probe.optimizer!r}: allowed {probe.OPTIMIZERS}")
  check(c.probe.get("labels_per_class", 0) >= 0,
        f"probe.labels_per_class={c.probe.get('labels_per_class')}: must be >= 0 (0 = every train row)")
  check(c.probe.epochs > 0 and c.probe.batch_size > 0 and c.probe.lr > 0,
        f"probe.epochs={c.probe.epochs}, probe.batch_size={c.probe.batch_size}, probe.lr={c.probe.lr}: must be > 0")
  if c.protocol == "finetune":
    _check_label_geometry(c.data)
  if c.protocol == "seg_probe":
    check(c.seg_probe.mask in phantoms.MASK_CLASSES,
          f"seg_probe.mask={c.seg_probe.mask!r}: allowed {phantoms.MASK_CLASSES}")
  check(c.knn.k > 0 and c.knn.temperature > 0,
        f"knn.k={c.knn.k}, knn.temperature={c.knn.temperature}: must be > 0")
  check(c.fewshot.shots > 0 and c.fewshot.seeds > 0,
        f"fewshot.shots={c.fewshot.shots}, fewshot.seeds={c.fewshot.seeds}: must be > 0")
  check(c.fewshot.classifier in FEWSHOT_CLASSIFIERS,
        f"fewshot.classifier={c.fewshot.classifier!r}: allowed {FEWSHOT_CLASSIFIERS}")
  if c.protocol == "segment":
    check(isinstance(c.segment.point_rounds, int) and c.segment.point_rounds >= 0,
          f"segment.point_rounds={c.segment.point_rounds!r}: an integer >= 0")
    bad = [k for k in c.segment.classes if k not in phantoms.MASK_CLASSES]
    check(c.segment.classes and not bad, f"segment.classes={tuple(c.segment.classes)}: each one of {phantoms.MASK_CLASSES}")
    check(c.segment.overlay_examples >= 0, f"segment.overlay_examples={c.segment.overlay_examples}: must be >= 0")
  if c.init_from and c.protocol != "zero_shot" and restore.hf_family(c.init_from) is None:
    name, _ = restore.checkpoint_objective(c.init_from)
    restore.encoder_path(name, c.encoder_weights, c.init_from)


def _labelled(x, labels, label: str):
  """Drops unlabelled rows (label -1)."""
  keep = labels[label] >= 0
  if not keep.all():
    logging.info("dropping %d unlabelled rows of %d", int((~keep).sum()), len(keep))
  return x[keep], {k: v[keep] for k, v in labels.items()}


def _unlabelled_features(config, mesh):
  """((train features, labels), (eval features, labels)) of the encoder (``features.input``
  'encoder') or of the raw pixels ('pixels'), every label kept."""
  if config.features.get("input", "encoder") == "pixels":
    extract = lambda split, n: features.pixels(config, mesh, split, n)
  else:
    objective, params = features.build_classifier(config, mesh)
    fn = features.pooled_fn(config, objective)   # one compile for both splits
    extract = lambda split, n: features.extract(config, mesh, objective, params, split, n, fn)
  return (extract(config.data.train_split, config.features.train_examples),
          extract(config.data.eval_split, config.data.eval_examples))


def _frozen_features(config, mesh):
  train, test = _unlabelled_features(config, mesh)
  return _labelled(*train, config.data.label), _labelled(*test, config.data.label)


def class_names(config, label: str) -> tuple[str, ...]:
  """Class names of ``label`` for ``config.data`` (ValueError naming the allowed labels)."""
  return supervised.class_names(ml_collections.ConfigDict(dict(config.data.to_dict(), label=label)))


def budget_rows(config, pool_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Rows of the pool (labels ``pool_labels``, -1 = unlabelled) in the label budget:
  ``probe.labels_per_class`` rows per class drawn with ``probe.seed`` (linear probe and fine-tune
  alike; a one-line ValueError when a class has fewer)."""
  return fewshot.sample_shots(pool_labels, config.probe.labels_per_class, num_classes,
                              config.probe.seed, field="probe.labels_per_class")


def finetune_source(config, num_classes: int) -> pipeline.SubsetSource | None:
  """The fine-tuning train records under the label budget (None: ``probe.labels_per_class`` 0,
  the whole train split): the probe's pool, the first ``features.train_examples`` records of
  ``data.train_split``, then :func:`budget_rows` of it, so that fine-tune and linear probe see the
  same labelled rows at the same ``probe.seed``."""
  if not config.probe.get("labels_per_class", 0):
    return None
  pool = pipeline.make_source(config.data, config.data.train_split, config.features.train_examples)
  labels = np.array([pool[i][config.data.label] for i in range(len(pool))], np.int64)
  return pipeline.SubsetSource(pool, tuple(int(i) for i in budget_rows(config, labels, num_classes)))


def linear_probe_labels(config, mesh, labels) -> dict[str, dict]:
  """Linear probe of each of ``labels`` on one extraction of the frozen features:
  {label: classification metrics (+ ``chance``: the majority-class rate of the eval rows)}.
  ``probe.labels_per_class`` > 0 fits on that many train rows per class (the label budget), drawn
  with ``probe.seed`` from the ``features.train_examples`` pool."""
  train, test = _unlabelled_features(config, mesh)
  budget = config.probe.get("labels_per_class", 0)
  out = {}
  for label in labels:
    names = class_names(config, label)
    (tx, ty), (vx, vy) = _labelled(*train, label), _labelled(*test, label)
    if budget:
      idx = budget_rows(config, ty[label], len(names))
      tx, ty = tx[idx], {k: v[idx] for k, v in ty.items()}
    scores = probe.linear_probe(tx, ty[label], vx, len(names), config.probe)
    out[label] = dict(classification.classification_metrics(scores, vy[label], names),
                      chance=float(np.bincount(vy[label]).max() / len(vy[label])))
  return out


def _linear_probe(config, mesh, names):
  metrics = linear_probe_labels(config, mesh, (config.data.label,))[config.data.label]
  return {k: v for k, v in metrics.items() if k != "chance"}, {"chance": metrics["chance"]}


def _knn(config, mesh, names):
  (tx, ty), (vx, vy) = _frozen_features(config, mesh)
  label = config.data.label
  k = min(config.knn.k, len(tx))
  scores = knn.knn_predict(tx, ty[label], vx, len(names), k=k, temperature=config.knn.temperature)
  return classification.classification_metrics(scores, vy[label], names), {"k": k}


def _fewshot(config, mesh, names):
  """k-shot (``fewshot.shots`` per class) classifiers, one support draw per seed 0..``fewshot.seeds``
  - 1 from the labelled feature pool: ridge, logistic regression, or nearest centroid (centred on
  the whole pool's mean, ``metrics.fewshot``)."""
  (tx, ty), (vx, vy) = _frozen_features(config, mesh)
  f, label = config.fewshot, config.data.label
  centre = tx.astype(np.float64).mean(0)
  per_seed = []
  for seed in range(f.seeds):
    idx = fewshot.sample_shots(ty[label], f.shots, len(names), seed)
    if f.classifier == "ridge":
      scores = probe.ridge_scores(tx[idx], ty[label][idx], vx, len(names), f.ridge_lambda)
    elif f.classifier == "centroid":
      scores = fewshot.centroid_scores(tx[idx], ty[label][idx], vx, len(names), centre)
    else:
      stats = probe.batchnorm_stats(tx[idx])
      params = probe.train_linear(probe.normalize(tx[idx], stats), ty[label][idx], len(names),
                                  epochs=f.logistic_steps, batch_size=len(idx), lr=f.logistic_lr,
                                  weight_decay=f.logistic_weight_decay, seed=seed)
      scores = probe.linear_scores(params, probe.normalize(vx, stats))
    per_seed.append(classification.classification_metrics(scores, vy[label], names))
  mean = {k: float(np.mean([m[k] for m in per_seed])) for k in metrics_keys()}
  std = {k: float(np.std([m[k] for m in per_seed])) for k in metrics_keys()}
  summary = dict(per_seed[0], **mean)   # per-class table of seed 0, summary = mean over seeds
  return summary, {"std": std, "seeds": [{k: m[k] for k in metrics_keys()} for m in per_seed],
                   "shots": f.shots, "classifier": f.classifier}


def metrics_keys() -> tuple[str, ...]:
  return ("accuracy", "balanced_accuracy", "macro_auroc")


def _finetune(config, mesh, names, workdir):
  train_dir = os.path.join(workdir, "finetune")
  source = finetune_source(config, len(names))
  state = loop.train(config, train_dir, mesh, source=source)
  objective, _ = assemble.build_objective(config)
  scores, labels = _labelled(*features.apply_over_split(
      config, mesh, objective.logits, state.params, config.data.eval_split,
      config.data.eval_examples), config.data.label)
  step = int(jax.device_get(state.step))
  # Sharded arrays: every process writes its own shards.
  export_dir = ckpt_lib.export_params(os.path.join(workdir, "export"), step, objective.export(state.params),
                                      {"step": step, "config": config.to_json_best_effort()})
  trainable = objective.trainable(state.params)
  n_train = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(state.params),
                                                      jax.tree.leaves(trainable)) if t)
  return (classification.classification_metrics(scores, labels[config.data.label], names),
          {"scheme": config.objective.scheme, "steps": step, "trainable_params": n_train,
           "train_examples": None if source is None else len(source), "export": export_dir})


def load_run(init_from: str, mesh, data_overrides: dict | None = None, objective_overrides: dict | None = None):
  """(the run's config, its objective built from that config, its params replicated on ``mesh``)
  of checkpoint ``init_from``; ``data_overrides`` / ``objective_overrides`` replace ``data.*`` /
  ``objective.*`` fields (eval split, sizes). The saved params already hold every pretrained part,
  so the run's own ``init_from`` and weight-import fields are cleared."""
  _, saved = restore.checkpoint_objective(init_from)
  config = ml_collections.ConfigDict(saved)
  config.data.update(data_overrides or {})
  config.objective.update(objective_overrides or {})
  config.init_from = ""
  for field in ("lit_init_from", "sam_checkpoint"):
    if field in config.objective:
      config.objective[field] = ""
  objective = objectives_lib.build(config)
  params = ckpt_lib.restore_subtree(init_from, ("params",))
  return config, objective, jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


def load_image_text(init_from: str, mesh, data_overrides: dict | None = None):
  """(objective built from the checkpoint's own config, its params replicated on ``mesh``) of an
  image-text checkpoint (an objective declaring ``image_text``: CLIP/SigLIP, FLAVA, ...);
  ``data_overrides`` replace ``data.*`` fields (eval split, sizes)."""
  name, _ = restore.checkpoint_objective(init_from)
  if not restore.objective_class(name, init_from).image_text:
    raise EvalError(f"zero_shot: checkpoint {init_from!r} was trained with objective {name!r}, which "
                    "has no text tower; zero-shot needs an image-text checkpoint (objectives declaring "
                    f"image_text: {', '.join(_image_text_names())})")
  _, objective, params = load_run(init_from, mesh, data_overrides)
  return objective, params


def _image_text_names() -> list[str]:
  return [n for n in objectives_lib.names() if objectives_lib.resolve(n).image_text]


def _zero_shot(config, mesh=None):
  """Zero-shot classification of ``data.label`` (plus retrieval recall@k) on ``data.eval_split``
  with the image-text checkpoint ``init_from``."""
  if not config.init_from:
    raise EvalError("zero_shot: set --config.init_from to an image-text (CLIP/SigLIP/FLAVA) checkpoint")
  d = config.data
  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  objective, params = load_image_text(config.init_from, mesh, {
      "eval_split": d.eval_split, "eval_examples": d.eval_examples, "eval_batch_size": d.eval_batch_size})
  out = clip.evaluate_image_text(objective, params, mesh, d.eval_split, d.eval_examples, (d.label,),
                                 detailed=True)
  summary = out.pop(f"zero_shot_{d.label}")
  for k in metrics_keys():
    out.pop(f"zero_shot_{d.label}_{k}")
  return {"protocol": "zero_shot", "init_from": config.init_from, "label": d.label,
          "split": d.eval_split, "metrics": summary, "retrieval": out}


def _segment(config, mesh, workdir):
  """Promptable segmentation of the ``sam`` run ``init_from`` on ``data.eval_split`` (its own data
  source, image size and normalisation): Dice and IoU per prompt type (box; one point followed by
  correction clicks, up to ``segment.point_rounds`` points) and per target class of
  ``segment.classes``, with the in-training eval code (``SamObjective.eval_metrics``); writes
  WORKDIR/segment.png (:meth:`SamObjective.overlay`)."""
  if not config.init_from:
    raise EvalError("segment: set --config.init_from to a workdir or checkpoint of objective 'sam'")
  name, saved = restore.checkpoint_objective(config.init_from)
  if name != sam_objective.SamObjective.name:
    raise EvalError(f"segment: checkpoint {config.init_from!r} was trained with objective {name!r}; "
                    "segment needs a run of objective 'sam'")
  d, s = config.data, config.segment
  segment = dict(saved["data"].get("segment") or {}, classes=tuple(s.classes))
  run_config, objective, params = load_run(
      config.init_from, mesh,
      {"eval_split": d.eval_split, "eval_examples": d.eval_examples, "eval_batch_size": d.eval_batch_size,
       "segment": segment},
      {"eval_point_rounds": s.point_rounds})
  batches = pipeline.make_eval_batches(objective.data, d.eval_split, d.eval_batch_size, d.eval_examples,
                                       jax.process_index(), jax.process_count())
  with mesh_lib.use_mesh(mesh):
    sums, first = loop.eval_sums(jax.jit(state_lib.make_eval_step(objective)), params, {}, batches, mesh)
    picture = objective.overlay(params, first, s.overlay_examples) if s.overlay_examples else None
  metrics = {k: t / c if c else float("nan") for k, (t, c) in sums.items()}
  counts = {k.split("/", 1)[1]: int(c) for k, (_, c) in sums.items() if k.startswith("dice_box/")}
  metrics["num_examples"] = int(sums["dice_box"][1])
  prompts = ["box"] + [f"points_{k}" for k in range(1, s.point_rounds + 1)]
  overlay = ""
  if picture is not None and jax.process_index() == 0:
    overlay = str(storage.write_bytes(storage.path(workdir) / "segment.png", image_files.encode_png(picture)))
  return {"protocol": "segment", "init_from": config.init_from, "label": "target mask",
          "split": d.eval_split, "metrics": metrics, "prompts": prompts, "classes": list(s.classes),
          "class_examples": counts, "recipe": run_config.objective.recipe,
          "steps": int(ckpt_lib.read_meta(config.init_from).get("step", 0)), "overlay": overlay}


def segment_volumes(objective, params, config, split: str, num_volumes: int, segment_cfg):
  """Whole-volume sliding-window segmentation of the first ``num_volumes`` of ``split``: ->
  (per-structure mean Dice / HD95 over volumes, [(image, label map, prediction)] of the first
  volumes for pictures). Volumes are normalised like the eval crops, then predicted in windows of
  ``data.volume.size`` (``segment_cfg``: overlap, mode, sigma_scale, batch_size)."""
  spec = objective.data
  source = pipeline.make_source(spec, split)
  if not 0 < num_volumes <= len(source):
    raise EvalError(f"data.eval_examples={num_volumes}: must be in [1, {len(source)}] (volumes of {split!r})")
  names = pipeline.modality_names(source)
  predict = objective.predict_fn(params)
  per_volume, shown = [], []
  for i in range(num_volumes):
    record = source[i]
    if "label_map" not in record:
      raise EvalError(f"segment3d: volume {record.get('path', i)} of split {split!r} has no label map")
    m = int(record["modality"])
    image = volumes.normalize_intensity(record["image"], volumes.scheme_for(
        spec.volume.intensity, names[m] if m < len(names) else ""), spec.volume)
    probs = sliding_window.sliding_window_inference(
        image[None], spec.volume.size, predict, segment_cfg.overlap, segment_cfg.mode,
        segment_cfg.sigma_scale, segment_cfg.batch_size)[0]
    pred = probs.argmax(-1)
    per_volume.append(seg_metrics.per_structure(pred, record["label_map"], objective.structures,
                                                record.get("spacing", (1.0, 1.0, 1.0))))
    if len(shown) < 4:
      shown.append((image, record["label_map"], pred))
  metrics = {}
  for name in objective.structures[1:]:
    for key in ("dice", "hd95"):
      values = np.asarray([v[name][key] for v in per_volume], np.float64)
      finite = values[np.isfinite(values)]
      metrics[f"{key}_{name}"] = float(finite.mean()) if finite.size else float("nan")
      if key == "hd95":
        metrics[f"hd95_{name}_missed"] = int(np.isinf(values).sum())
  dices = [metrics[f"dice_{n}"] for n in objective.structures[1:] if np.isfinite(metrics[f"dice_{n}"])]
  metrics["mean_dice"] = float(np.mean(dices)) if dices else float("nan")
  metrics["num_examples"] = num_volumes
  return metrics, shown


def _segment3d(config, mesh, workdir):
  """Fine-tunes the seg3d objective (few-shot: ``data.volume.train_volumes`` labelled volumes)
  through the shared trainer from ``init_from`` (or random init), then segments whole volumes of
  ``data.eval_split`` with sliding windows: Dice and HD95 per structure; writes
  WORKDIR/segment3d.png (orthogonal slices: image | label map | prediction)."""
  state = loop.train(config, os.path.join(workdir, "segment3d"), mesh)
  objective, _ = assemble.build_objective(config)
  params = jax.device_get(state.params)
  metrics, shown = segment_volumes(objective, params, config, config.data.eval_split,
                                   config.data.eval_examples, config.segment3d)
  if jax.process_index() == 0 and shown:
    side = min(min(x.shape[:3]) for x, _, _ in shown)
    crop = lambda a: a[:side, :side, :side]
    mae3d.write_orthogonal_slices([np.stack([crop(x) for x, _, _ in shown])],
                                  os.path.join(workdir, "segment3d.png"),
                                  labels=[np.stack([crop(l) for _, l, _ in shown]),
                                          np.stack([crop(p) for _, _, p in shown])])
  return {"protocol": "segment3d", "init_from": config.init_from, "label": "label_map",
          "split": config.data.eval_split, "metrics": metrics,
          "train_volumes": config.data.volume.get("train_volumes", 0),
          "steps": int(jax.device_get(state.step))}


def _phantom_masks(config, split: str, n: int, mask_class: str) -> np.ndarray:
  """uint8 ``[n, H, W]``: the phantoms' ``mask_class`` mask of the first ``n`` records of ``split``."""
  d = config.data
  if d.source != "phantoms":
    raise EvalError(f"seg_probe: masks come from the phantoms (data.source='phantoms'), not "
                    f"data.source={d.source!r}")
  source = phantoms.PhantomSource(split, d.image_size, d.channels, seed=0, num_examples=n, masks=True,
                                  lesion_scale=d.get("lesion_scale", 1.0))
  c = phantoms.MASK_CLASSES.index(mask_class)
  return np.stack([source[i]["masks"][..., c] for i in range(n)])


def _seg_probe(config, mesh):
  """Linear segmentation probe of ``seg_probe.mask`` (a phantom mask class) on frozen patch tokens
  (``probe.*`` trains it): Dice of the mask class and mIoU (mean over background and the class),
  over all pixels of ``data.eval_split``."""
  objective, params = features.build_classifier(config, mesh)
  d, s = config.data, config.seg_probe
  n_train, n_eval = config.features.train_examples, d.eval_examples
  fn = features.tokens_fn(objective)   # one compile for both splits
  train_x, _ = features.apply_over_split(config, mesh, fn, params, d.train_split, n_train, jitted=True)
  test_x, _ = features.apply_over_split(config, mesh, fn, params, d.eval_split, n_eval, jitted=True)
  target = _phantom_masks(config, d.eval_split, n_eval, s.mask)
  pred = probe.seg_probe(train_x, _phantom_masks(config, d.train_split, n_train, s.mask), test_x, 2,
                         config.probe, balanced=s.balanced)
  ious = [seg_metrics.iou(pred, target, c) for c in (0, 1)]
  metrics = {"dice": seg_metrics.dice(pred, target, 1), "iou": ious[1], "miou": float(np.mean(ious)),
             "foreground_fraction": float(target.mean()), "num_examples": n_eval}
  return {"protocol": "seg_probe", "init_from": config.init_from, "label": s.mask,
          "split": d.eval_split, "metrics": metrics}


def run(config, workdir: str, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs ``config.protocol``; returns the results dict (see :mod:`report`)."""
  protocol = config.protocol
  if protocol not in PROTOCOLS:
    raise EvalError(f"protocol={protocol!r}: allowed {PROTOCOLS}")
  if protocol == "zero_shot":
    return _zero_shot(config, mesh)
  if protocol == "segment":
    return _segment(config, mesh or mesh_lib.make_mesh(config.mesh), workdir)
  if protocol == "segment3d":
    return _segment3d(config, mesh or mesh_lib.make_mesh(config.mesh), workdir)
  if protocol == "seg_probe":
    return _seg_probe(config, mesh or mesh_lib.make_mesh(config.mesh))
  names = supervised.class_names(config.data)
  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  logging.info("eval %s of %s on %s (%s)", protocol, config.init_from or "random init",
               config.data.label, config.data.eval_split)
  if protocol == "finetune":
    summary, extra = _finetune(config, mesh, names, workdir)
  else:
    summary, extra = {"linear_probe": _linear_probe, "knn": _knn, "fewshot": _fewshot}[protocol](
        config, mesh, names)
  return {"protocol": protocol, "init_from": config.init_from, "label": config.data.label,
          "split": config.data.eval_split, "metrics": summary, **extra}
