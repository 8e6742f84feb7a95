"""Reads runs for the report: sweep folders (``sweep.json``) or plain workdirs.

A run's numbers come from ``metrics.jsonl`` (its own, or ``finetune/metrics.jsonl`` of a
fine-tuning eval workdir; rows re-written after a resume replace the earlier ones of the same
step), ``results.json`` (eval workdir: ``accuracy``...) and ``eval/NAME/results.json``
(``NAME/accuracy``...). Its swept fields come from the manifest, or for plain workdirs from the
fields in which their ``config.json`` files differ.
"""
from __future__ import annotations

import dataclasses
import json
import math

from etils import epath

from medfm_jax import storage
from medfm_jax.evaluate import results as eval_results
from medfm_jax.sweeps import grid, runner

SKIP = ("compile_time_s", "step_time_s", "eta_s", "images_per_s", "images_per_s_per_device",
        "tflops_per_device", "mfu", "lr", "grad_norm", "data/skipped", "wd", "elapsed_s")


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
    return tuple((k, v) for k, v in self.overrides.items() if k != runner.SEED)


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


def _config(workdir: str) -> dict:
  path = storage.path(workdir) / "config.json"
  return _flatten(json.loads(storage.read_text(path))) if path.exists() else {}


def load_runs(paths: list[str]) -> list[Run]:
  """Every run under ``paths`` (sweep folders expand to their points), numbers loaded."""
  runs, loose = [], []
  for path in paths:
    root = storage.path(path)
    if (root / runner.MANIFEST).exists():
      m = json.loads(storage.read_text(root / runner.MANIFEST))
      for p in m["points"]:
        runs.append(Run(p["name"], str(root / p["name"]), dict(p["overrides"]), p["status"]))
    elif any((root / f).exists() for f in ("metrics.jsonl", "results.json", "config.json")):
      loose.append(path)
    else:
      raise ReportError(f"{path!r}: not a sweep folder (no {runner.MANIFEST}) nor a run workdir "
                        "(no metrics.jsonl, results.json or config.json)")
  if loose:
    configs = [_config(w) for w in loose]
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1] if len(loose) > 1 else []
    for w, c in zip(loose, configs):
      runs.append(Run(storage.path(w).name or w, w, {k: c.get(k) for k in varying}, ""))
  for run in runs:
    load_numbers(run)
  return runs


def default_metrics(runs: list[Run]) -> list[str]:
  """``loss``, then the trainer's ``eval/*`` metrics, then each evaluation's summary metrics."""
  seen = list(dict.fromkeys(k for r in runs for k in r.metrics))
  first = [k for k in seen if k == "loss"]
  evals = [k for k in seen if k.startswith("eval/")]
  return first + evals + [k for k in seen if k not in first and k not in evals]


def group_label(group: tuple) -> str:
  return grid.point_name(dict(group), [k for k, _ in group]) if group else "default"
