"""The training job's closing table: the freshly pretrained encoder vs the same architecture at
random init on held-out benchmark tasks (docs/benchmark.md), through the evaluation protocols.

:func:`compare` takes an eval config (``configs/eval/linear_probe.py``, ``fewshot.py`` or
``seg_probe.py``; ``python -m medfm_jax.main`` loads the one ``final_eval.config`` names) and the
run's workdir; :func:`write` prints nothing and writes ``final_eval.json`` / ``final_eval.md``.
"""
from __future__ import annotations

import copy
import json
import time

import numpy as np

from medfm_jax import config as config_lib
from medfm_jax import storage
from medfm_jax.evaluate import protocols
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import restore

CLOSING_PROTOCOLS = ("linear_probe", "fewshot", "seg_probe")


def eval_config_for(eval_config, train_config, workdir: str, labels=()):
  """``eval_config`` pointed at ``workdir`` with the run's encoder and image geometry, checked."""
  c = copy.deepcopy(eval_config)
  check(c, labels)
  c.init_from = workdir
  for k in restore.DATA_FIELDS:   # the run's image geometry (the encoder was trained on it)
    c.data[k] = train_config.data[k]
  restore.adopt_architecture(c)
  config_lib.validate(c)
  protocols.check_config(c)
  return c


def check(eval_config, labels) -> None:
  """The closing protocol and its labels (EvalError naming the field); before training."""
  if eval_config.protocol not in CLOSING_PROTOCOLS:
    raise protocols.EvalError(f"final_eval.config: protocol {eval_config.protocol!r}: allowed "
                              f"{CLOSING_PROTOCOLS}")
  if eval_config.protocol != "seg_probe":
    if not labels:
      raise protocols.EvalError("final_eval.labels is empty: name at least one label")
    for label in labels:
      try:
        protocols.class_names(eval_config, label)
      except ValueError as e:
        raise protocols.EvalError(f"final_eval.labels: {e}") from None


def _scores(c, mesh, labels) -> dict[str, dict]:
  """{task: {metric: value}} of one encoder (``c.init_from``; '' = random init)."""
  if c.protocol == "seg_probe":
    m = protocols.run(c, "", mesh)["metrics"]
    return {f"{c.seg_probe.mask} mask": {"dice": m["dice"], "miou": m["miou"]}}
  if c.protocol == "fewshot":
    out = {}
    for label in labels:    # one extraction per label: the few-shot pool is sampled per label
      c.data.label = label
      m = protocols.run(c, "", mesh)
      out[label] = {"accuracy": m["metrics"]["accuracy"], "accuracy_std": m["std"]["accuracy"]}
    return out
  return {k: {"accuracy": v["accuracy"], "chance": v["chance"]}
          for k, v in protocols.linear_probe_labels(c, mesh, labels).items()}


def compare(eval_config, train_config, workdir: str, labels=(), mesh=None) -> dict:
  """Scores of the checkpoint in ``workdir`` and of its architecture at random init (the eval
  config's ``seed``) on ``labels`` (linear probe / few-shot) or the mask (seg_probe)."""
  c = eval_config_for(eval_config, train_config, workdir, labels)
  mesh = mesh or mesh_lib.make_mesh(c.mesh)
  rows, start = {}, time.perf_counter()
  for name, init_from in (("pretrained", workdir), ("random init", "")):
    c.init_from = init_from
    rows[name] = _scores(c, mesh, labels)
  return {"protocol": c.protocol, "split": c.data.eval_split, "eval_examples": c.data.eval_examples,
          "train_examples": c.features.train_examples, "workdir": workdir, "rows": rows,
          "wall_s": time.perf_counter() - start}


def markdown(result: dict) -> str:
  """One row per (task, metric): pretrained, random init and their difference."""
  rows = result["rows"]
  lines = [f"{result['protocol']} on {result['split']} ({result['eval_examples']} images; "
           f"{result['train_examples']} train images for the probe), {result['wall_s']:.0f} s", "",
           "| task | metric | pretrained | random init | difference |", "|---|---|---|---|---|"]
  for task, metrics in rows["pretrained"].items():
    for metric, value in metrics.items():
      if metric.endswith("_std"):
        continue
      base = rows["random init"][task][metric]
      diff = "" if metric == "chance" else f"{value - base:+.3f}"
      lines.append(f"| {task} | {metric} | {value:.3f} | {base:.3f} | {diff} |")
  return "\n".join(lines) + "\n"


def write(workdir: str, result: dict) -> str:
  """Writes ``final_eval.json`` and ``final_eval.md`` into ``workdir``; returns the Markdown."""
  root = storage.path(workdir)
  text = markdown(result)
  storage.write_text(root / "final_eval.json", json.dumps(
      result, indent=1, default=lambda x: float(x) if isinstance(x, np.floating) else str(x)))
  storage.write_text(root / "final_eval.md", text)
  return text
