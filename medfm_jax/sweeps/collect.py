"""Reads runs for the report: sweep folders (``sweep.json``) or plain workdirs.

A run's numbers come from ``metrics.jsonl`` (its own, or ``finetune/metrics.jsonl`` of a
fine-tuning eval workdir; rows re-written after a resume replace the earlier ones of the same
step), ``results.json`` (eval workdir: ``accuracy``...) and ``eval/NAME/results.json``
(``NAME/accuracy``...). Its swept fields come from the manifest, or for plain workdirs from the
fields in which their configs differ (``config.json``; an eval workdir's ``results.json`` config).

An evaluation's ``init_from`` path is replaced by what it names: ``init`` (the pretraining
objective, or ``random``) and the pretraining run's config under ``init.``, so evaluations of
different pretraining seeds of one recipe are replicates of one point, like seeds.
"""
from __future__ import annotations

import dataclasses
import json
import math

from etils import epath

from medfm_jax import storage
from medfm_jax.evaluate import results as eval_results
from medfm_jax.sweeps import grid, runner
from medfm_jax.train import checkpoint

SKIP = ("compile_time_s", "step_time_s", "eta_s", "images_per_s", "images_per_s_per_device",
        "tflops_per_device", "mfu", "lr", "grad_norm", "data/skipped", "wd", "elapsed_s")


# Fields whose runs are replicates of one point: the run's seed, the pretraining run's seed, the
# label-budget draw of a probe. A point's mean ± s.e. is over all of its replicates.
REPLICATES = (runner.SEED, "init.seed", "probe.seed")
RANDOM_INIT = "random"


class ReportError(ValueError):
  """A path that is neither a sweep folder nor a run workdir, or a requested metric nobody has."""


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  overrides: dict                  # swept fields (with 'seed' when swept)
  status: str                      # done | failed | running | pending | '' (plain workdir)
  curve: list = dataclasses.field(default_factory=list)     # [(step, train loss)]
  metrics: dict = dataclasses.field(default_factory=dict)   # metric -> final value

  @property
  def group(self) -> tuple:
    return tuple((k, v) for k, v in self.overrides.items() if k not in REPLICATES)


def read_jsonl(path: str | epath.Path) -> dict[str, dict[int, float]]:
  """``metrics.jsonl`` -> key -> {step: value} (numbers only; a later row of a step wins)."""
  series = {}
  for line in storage.read_text(path).splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue   # a line cut short by a kill
    step = row.get("step")
    if not isinstance(step, int):
      continue
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        series.setdefault(k, {})[step] = float(v)
  return series


def _results(path: epath.Path, prefix: str, out: dict) -> None:
  r = json.loads(storage.read_text(path))
  for k in eval_results.SUMMARY:
    v = r.get("metrics", {}).get(k)
    out[prefix + k] = math.nan if v is None else float(v)


def load_numbers(run: Run) -> None:
  """Fills ``run.curve`` and ``run.metrics`` from the files in its workdir."""
  root = storage.path(run.workdir)
  for path in (root / "metrics.jsonl", root / "finetune" / "metrics.jsonl"):
    if path.exists():
      series = read_jsonl(path)
      run.curve = sorted(series.get("loss", {}).items())
      for k, by_step in series.items():
        if k not in SKIP:
          run.metrics[k] = by_step[max(by_step)]
      break
  if (root / "results.json").exists():
    _results(root / "results.json", "", run.metrics)
  eval_dir = root / "eval"
  if eval_dir.is_dir():
    for name in sorted(d.name for d in eval_dir.iterdir()):
      path = eval_dir / name / "results.json"
      if path.exists():
        _results(path, name + "/", run.metrics)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = tuple(v) if isinstance(v, list) else v
  return out


def _init_fields(init_from: str, cache: dict) -> dict:
  """``init`` (the objective of the checkpoint at ``init_from``, ``random`` when empty) and that
  run's flattened config under ``init.``; a path without a readable checkpoint is its own ``init``."""
  if not init_from:
    return {"init": RANDOM_INIT}
  if init_from not in cache:
    try:
      config = checkpoint.read_meta(init_from)["config"]
    except (checkpoint.CheckpointError, OSError, ValueError):
      cache[init_from] = {"init": init_from}
    else:
      fields = {f"init.{k}": v for k, v in _flatten(config).items() if k not in ("init_from", "objective.name")}
      cache[init_from] = {"init": str(config.get("objective", {}).get("name", init_from)), **fields}
  return cache[init_from]


def _recorded_config(root: epath.Path) -> dict | None:
  """The config an evaluation recorded: ``results.json``'s ``config``, else (results written before
  it was recorded) the meta of its fine-tuning checkpoint; None if neither has one."""
  recorded = json.loads(storage.read_text(root / "results.json")).get("config")
  if isinstance(recorded, dict):
    return recorded
  if (root / "finetune").is_dir():
    try:
      return checkpoint.read_meta(str(root / "finetune"))["config"] or None
    except (checkpoint.CheckpointError, OSError, ValueError):
      return None
  return None


def run_config(workdir: str, init_cache: dict | None = None) -> dict:
  """The flattened config of a run: ``config.json`` (training), else the config an evaluation
  recorded (:func:`_recorded_config`), its ``init_from`` replaced by :func:`_init_fields`; {} if none."""
  root = storage.path(workdir)
  if (root / "config.json").exists():
    return _flatten(json.loads(storage.read_text(root / "config.json")))
  recorded = _recorded_config(root) if (root / "results.json").exists() else None
  if recorded is None:
    return {}
  config = _flatten(recorded)
  init_from = config.pop("init_from", "") or ""
  return {**config, **_init_fields(str(init_from), {} if init_cache is None else init_cache)}


def varying_fields(configs: list[dict]) -> list[str]:
  """The fields in which ``configs`` differ; runs with no config ({}) are left out. An ``init.*``
  field is compared only among the runs that have one (runs from random init have none; ``init``
  itself tells them apart)."""
  configs = [c for c in configs if c]
  keys = sorted({k for c in configs for k in c})
  out = []
  for k in keys:
    have = [c for c in configs if k in c] if k.startswith("init.") else configs
    if len({repr(c.get(k)) for c in have}) > 1:
      out.append(k)
  return out


def load_runs(paths: list[str]) -> list[Run]:
  """Every run under ``paths`` (sweep folders expand to their points), numbers loaded. A run's
  fields: its sweep point's overrides, plus every config field in which the runs differ (so
  sweeps with different bases or ``--init_from`` are not mixed into one point)."""
  runs, loose = [], []
  for path in paths:
    root = storage.path(path)
    if (root / runner.MANIFEST).exists():
      m = json.loads(storage.read_text(root / runner.MANIFEST))
      for p in m["points"]:
        runs.append(Run(p["name"], str(root / p["name"]), dict(p["overrides"]), p["status"]))
    elif any((root / f).exists() for f in ("metrics.jsonl", "results.json", "config.json")):
      loose.append(Run(root.name or path, path, {}, ""))
    else:
      raise ReportError(f"{path!r}: not a sweep folder (no {runner.MANIFEST}) nor a run workdir "
                        "(no metrics.jsonl, results.json or config.json)")
  cache: dict = {}
  everyone = runs + loose
  configs = [run_config(r.workdir, cache) for r in everyone]
  varying = varying_fields(configs)   # one run differs from nobody: []
  for run, config in zip(everyone, configs):
    run.overrides.update({k: config.get(k) for k in varying if k not in run.overrides})
  for run in everyone:
    load_numbers(run)
  return everyone


def default_metrics(runs: list[Run]) -> list[str]:
  """``loss``, then the trainer's ``eval/*`` metrics, then each evaluation's summary metrics."""
  seen = list(dict.fromkeys(k for r in runs for k in r.metrics))
  first = [k for k in seen if k == "loss"]
  evals = [k for k in seen if k.startswith("eval/")]
  return first + evals + [k for k in seen if k not in first and k not in evals]


def group_label(group: tuple) -> str:
  return grid.point_name(dict(group), [k for k, _ in group]) if group else "default"
