"""Evaluation protocols over any checkpoint (or a random-init baseline): linear probe, kNN,
few-shot, fine-tune (through the shared trainer and the supervised objective) and zero-shot.

:func:`run` takes an eval config (``configs/eval/*.py``) and a workdir, and returns the results
that :mod:`medfm_jax.evaluate.results` writes as JSON and Markdown.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from medfm_jax import objectives as objectives_lib
from medfm_jax.evaluate import features, knn, metrics, probe, restore
from medfm_jax.objectives import clip, supervised
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import loop

PROTOCOLS = ("linear_probe", "knn", "fewshot", "finetune", "zero_shot")
TEXT_TOWER_OBJECTIVES = clip.IMAGE_TEXT_OBJECTIVES   # checkpoints that can zero-shot classify


class EvalError(ValueError):
  """The requested evaluation cannot run on this checkpoint/config."""


def _labelled(x, labels, label: str):
  """Drops unlabelled rows (label -1)."""
  keep = labels[label] >= 0
  if not keep.all():
    logging.info("dropping %d unlabelled rows of %d", int((~keep).sum()), len(keep))
  return x[keep], {k: v[keep] for k, v in labels.items()}


def _frozen_features(config, mesh):
  objective, params = features.build_classifier(config, mesh)
  train = features.extract(config, mesh, objective, params, config.data.train_split,
                           config.features.train_examples)
  test = features.extract(config, mesh, objective, params, config.data.eval_split,
                          config.data.eval_examples)
  return _labelled(*train, config.data.label), _labelled(*test, config.data.label)


def _linear_probe(config, mesh, names):
  (tx, ty), (vx, vy) = _frozen_features(config, mesh)
  label = config.data.label
  scores = probe.linear_probe(tx, ty[label], vx, len(names), config.probe)
  return metrics.classification_metrics(scores, vy[label], names), {}


def _knn(config, mesh, names):
  (tx, ty), (vx, vy) = _frozen_features(config, mesh)
  label = config.data.label
  k = min(config.knn.k, len(tx))
  scores = knn.knn_predict(tx, ty[label], vx, len(names), k=k, temperature=config.knn.temperature)
  return metrics.classification_metrics(scores, vy[label], names), {"k": k}


def _fewshot(config, mesh, names):
  (tx, ty), (vx, vy) = _frozen_features(config, mesh)
  f, label = config.fewshot, config.data.label
  per_seed = []
  for seed in range(f.seeds):
    idx = probe.sample_shots(ty[label], f.shots, len(names), seed)
    if f.classifier == "ridge":
      scores = probe.ridge_scores(tx[idx], ty[label][idx], vx, len(names), f.ridge_lambda)
    else:
      stats = probe.batchnorm_stats(tx[idx])
      params = probe.train_linear(probe.normalize(tx[idx], stats), ty[label][idx], len(names),
                                  epochs=f.logistic_steps, batch_size=len(idx), lr=f.logistic_lr,
                                  weight_decay=f.logistic_weight_decay, seed=seed)
      scores = probe.linear_scores(params, probe.normalize(vx, stats))
    per_seed.append(metrics.classification_metrics(scores, vy[label], names))
  mean = {k: float(np.mean([m[k] for m in per_seed])) for k in metrics_keys()}
  std = {k: float(np.std([m[k] for m in per_seed])) for k in metrics_keys()}
  summary = dict(per_seed[0], **mean)   # per-class table of seed 0, summary = mean over seeds
  return summary, {"std": std, "seeds": [{k: m[k] for k in metrics_keys()} for m in per_seed],
                   "shots": f.shots, "classifier": f.classifier}


def metrics_keys() -> tuple[str, ...]:
  return ("accuracy", "balanced_accuracy", "macro_auroc")


def _finetune(config, mesh, names, workdir):
  train_dir = os.path.join(workdir, "finetune")
  state = loop.train(config, train_dir, mesh)
  objective = objectives_lib.build(config)
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
  return (metrics.classification_metrics(scores, labels[config.data.label], names),
          {"scheme": config.objective.scheme, "steps": step, "trainable_params": n_train,
           "export": export_dir})


def _zero_shot(config, mesh=None):
  if not config.init_from:
    raise EvalError("zero_shot: set --config.init_from to an image-text (CLIP/SigLIP/FLAVA) checkpoint")
  objective, _ = restore.checkpoint_objective(config.init_from)
  if objective in TEXT_TOWER_OBJECTIVES:
    return clip.zero_shot_from_checkpoint(config, mesh or mesh_lib.make_mesh(config.mesh))
  raise EvalError(f"zero_shot: checkpoint {config.init_from!r} was trained with objective "
                  f"{objective!r}, which has no text tower; zero-shot needs an image-text checkpoint "
                  f"(objectives with a text tower: {', '.join(TEXT_TOWER_OBJECTIVES)})")


def run(config, workdir: str, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs ``config.protocol``; returns the results dict (see :mod:`report`)."""
  protocol = config.protocol
  if protocol not in PROTOCOLS:
    raise EvalError(f"protocol={protocol!r}: allowed {PROTOCOLS}")
  if protocol == "zero_shot":
    return _zero_shot(config, mesh)
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
