r"""Sweep / run comparison report: a Markdown table and PNG plots.

  python -m medfm_jax.sweeps.report runs/mae_mask [more sweep folders or workdirs...] \
      [--metric=eval/loss --metric=knn_tiny/accuracy] [--out=DIR]

Writes DIR/report.md (one row per point: its swept fields, seeds, status and each metric's final
value, mean ± standard error over the seeds of points that differ only by ``seed``: s.e. = sample
std / sqrt(n)), DIR/loss_curves.png (training loss of every run overlaid) and DIR/vs_FIELD.png per
swept field (final metrics against the field, error bars = ± 1 s.e. over seeds). Where points ran
with several seeds, a section compares each metric's highest and lowest point with the seed
spread. DIR defaults to the only path given, else to the paths' common parent. Metrics: ``loss``
and other metrics.jsonl keys (``eval/...``), an eval workdir's ``accuracy`` /
``balanced_accuracy`` / ``macro_auroc``, and ``NAME/accuracy``... of a point's ``eval/NAME``
folder (sweep --then_eval); default: all of them.
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from medfm_jax import storage
from medfm_jax.sweeps import collect, grid, plots


MAX_TITLE_PATHS = 3   # more sources are summarised in titles as "N sources in PARENT"


def mean_se(values: list[float]) -> tuple[float, float, int]:
  """(mean, standard error = sample std / sqrt(n), n) of the finite ``values``; s.e. 0 for n = 1."""
  v = [x for x in values if np.isfinite(x)]
  if not v:
    return float("nan"), 0.0, 0
  se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
  return float(np.mean(v)), se, len(v)


def _fmt(values: list[float]) -> str:
  """``mean ± s.e.``; ``(n=k)`` appended where fewer runs than ``values`` have the metric."""
  mean, se, n = mean_se(values)
  if not n:
    return "n/a"
  text = f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {se:.4f}"
  return text if n == len(values) else f"{text} (n={n})"


def separation(groups: dict[tuple, list], metrics: list[str]) -> list[str]:
  """Markdown lines: per metric, the highest vs the lowest point (of those with >= 2 seeds that
  have it), their difference, its s.e. (the points' s.e. in quadrature) and whether the two points'
  ranges over seeds overlap; [] when fewer than two points ran with several seeds."""
  rows = []
  for m in metrics:
    stats = []
    for group, rs in groups.items():
      v = [x for x in (r.metrics.get(m, float("nan")) for r in rs) if np.isfinite(x)]
      if len(v) > 1:
        mean, se, _ = mean_se(v)
        stats.append((mean, se, min(v), max(v), collect.group_label(group)))
    if len(stats) < 2:
      continue
    hi, lo = max(stats), min(stats)
    diff, se = hi[0] - lo[0], float(np.hypot(hi[1], lo[1]))
    ratio = f"{diff / se:.1f}" if se > 0 else "n/a"
    overlap = "yes" if lo[3] >= hi[2] else "**no**"
    rows.append(f"| {m} | {hi[4]} | {lo[4]} | {diff:.4f} | {se:.4f} | {ratio} | {overlap} |")
  if not rows:
    return []
  return ["", "## Effect vs seed spread", "",
          "Per metric, the point with the highest mean vs the one with the lowest (points run with "
          "several seeds): difference, its standard error (the two s.e. in quadrature), their ratio, "
          "and whether the two points' seed ranges (min-max) overlap.", "",
          "| metric | highest | lowest | difference | s.e. | difference / s.e. | ranges overlap |",
          "|---|---|---|---|---|---|---|", *rows]


def versus_random_init(groups: dict[tuple, list], metrics: list[str]) -> list[str]:
  """Markdown lines: each point evaluated from a pretrained checkpoint against the point that
  differs from it only by ``init=random`` (same protocol, budget, recipe): both means, the
  difference, its s.e. (the two s.e. in quadrature) and their ratio; [] without such pairs."""
  by_rest: dict[tuple, dict] = {}
  for group in groups:
    g = dict(group)
    if "init" not in g:
      return []
    rest = tuple((k, v) for k, v in group if k != "init" and not k.startswith("init."))
    by_rest.setdefault(rest, {})[group] = g["init"]
  rows = []
  for rest, members in by_rest.items():
    random = [grp for grp, init in members.items() if init == collect.RANDOM_INIT]
    if len(random) != 1:
      continue
    for group, init in members.items():
      if init == collect.RANDOM_INIT:
        continue
      for m in metrics:
        a = mean_se([r.metrics.get(m, float("nan")) for r in groups[group]])
        b = mean_se([r.metrics.get(m, float("nan")) for r in groups[random[0]]])
        if not (a[2] and b[2]):
          continue
        diff, se = a[0] - b[0], float(np.hypot(a[1], b[1]))
        ratio = f"{diff / se:+.1f}" if se > 0 and a[2] > 1 and b[2] > 1 else "n/a"
        rows.append(f"| {m} | {collect.group_label(group)} | {a[0]:.4f} ± {a[1]:.4f} ({a[2]}) | "
                    f"{b[0]:.4f} ± {b[1]:.4f} ({b[2]}) | {diff:+.4f} | {se:.4f} | {ratio} |")
  if not rows:
    return []
  return ["", "## Pretrained vs random init", "",
          "Each point evaluated from a pretrained checkpoint against the point that differs only by "
          "`init=random`: mean ± s.e. (replicates: seeds, pretraining seeds, label draws), the "
          "difference, its standard error (the two s.e. in quadrature) and their ratio.", "",
          "| metric | point | pretrained (n) | random init (n) | difference | s.e. | difference / s.e. |",
          "|---|---|---|---|---|---|---|", *rows]


def build(paths: list[str], metrics: list[str], out: str) -> str:
  """Writes the report and plots into ``out`` (local or URL); returns the path of report.md."""
  runs = collect.load_runs(paths)
  if not runs:
    raise collect.ReportError(f"{paths}: no runs found")
  available = collect.default_metrics(runs)
  metrics = metrics or available
  unknown = [m for m in metrics if m not in available]
  if unknown:
    raise collect.ReportError(f"--metric {unknown}: no run has it; available: {available}")
  groups: dict[tuple, list] = {}
  for r in runs:
    groups.setdefault(r.group, []).append(r)
  fields = list(dict.fromkeys(k for r in runs for k in r.overrides if k not in collect.REPLICATES))
  short = grid.short_keys(fields)
  out = storage.path(out)
  names = [storage.path(p).name for p in paths]
  title = ", ".join(names) if len(names) <= MAX_TITLE_PATHS else f"{len(names)} sources in {common_parent(paths) or '.'}"

  lines = [f"# Report: {title}", "", "Sources: " + ", ".join(f"`{p}`" for p in paths), "",
           "Values: final value of each metric; `mean ± s.e.` over seeds where a point ran with several "
           "(standard error = sample std / sqrt(n), n = the seeds column, or `(n=k)` where only k runs "
           "have the metric). Plot error bars: ± 1 s.e.", ""]
  head = ["point", *[short[f] for f in fields], "seeds", "status", *metrics]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for group, rs in groups.items():
    g = dict(group)
    status = ",".join(sorted({r.status for r in rs if r.status})) or "-"
    row = [collect.group_label(group), *[grid.format_value(g[f]) if f in g else "" for f in fields],
           str(len(rs)), status, *[_fmt([r.metrics.get(m, float("nan")) for r in rs]) for m in metrics]]
    lines.append("| " + " | ".join(row) + " |")
  lines += versus_random_init(groups, metrics)
  lines += separation(groups, metrics)
  if any(len(rs) > 1 for rs in groups.values()):
    lines += ["", "## Every run", "", "| run | status | " + " | ".join(metrics) + " |",
              "|" + "---|" * (len(metrics) + 2)]
    for r in runs:
      lines.append(f"| {r.name} | {r.status or '-'} | " +
                   " | ".join(_fmt([r.metrics.get(m, float('nan'))]) for m in metrics) + " |")
  failed = [r for r in runs if r.status == "failed"]
  if failed:
    lines += ["", f"Failed points: {', '.join(r.name for r in failed)} (see sweep.json / POINT/logs)."]

  figures = []
  curves = {collect.group_label(g): [r.curve for r in rs] for g, rs in groups.items()}
  if plots.loss_curves(curves, out / "loss_curves.png", f"Training loss: {title}"):
    figures.append(("Training loss curves", "loss_curves.png"))
  for key in fields:
    if len({repr(dict(g).get(key)) for g in groups}) < 2:
      continue
    series: dict = {}
    for group, rs in groups.items():
      g = dict(group)
      if key not in g:
        continue
      others = {k: v for k, v in g.items() if k != key}
      label = collect.group_label(tuple(others.items())) if others else ""
      for m in metrics:
        mean, se, _ = mean_se([r.metrics.get(m, float("nan")) for r in rs])
        series.setdefault(label, {}).setdefault(m, []).append((g[key], mean, se))
    name = f"vs_{grid.safe_name(short[key])}.png"
    if plots.metric_vs_field(key, series, metrics, out / name, f"{title}: final metrics vs {short[key]}"):
      figures.append((f"Final metrics vs {key}", name))
  if figures:
    lines += ["", "## Plots", ""] + [f"![{cap}]({name})" for cap, name in figures]
  return str(storage.write_text(out / "report.md", "\n".join(lines) + "\n"))


def common_parent(paths: list[str]) -> str:
  """The deepest folder holding all ``paths`` (local or URLs); '' if they share none."""
  parts = [str(storage.path(p)).split("/") for p in paths]
  common = []
  for level in zip(*parts):
    if len(set(level)) > 1:
      break
    common.append(level[0])
  return "/".join(common) if any(common) else ("/" if common else "")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more sweep folders or workdirs")
  out = _OUT.value or (paths[0] if len(paths) == 1 else common_parent(paths))
  try:
    if not out:
      raise collect.ReportError(f"{paths}: no common parent folder; give --out")
    path = build(paths, _METRIC.value, out)
  except (collect.ReportError, storage.StorageError) as e:
    sys.stderr.write(f"medfm_jax.sweeps.report: {e}\n")
    sys.exit(2)
  print(storage.read_text(path))
  print(f"wrote {path}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module as a library
  # (tests, other CLIs) never clashes with another CLI's flags of the same name.
  _METRIC = flags.DEFINE_multi_string("metric", [], "Metric to tabulate and plot (repeatable); default all.")
  _OUT = flags.DEFINE_string("out", "", "Folder for report.md and PNGs (default: the only path / common parent).")
  app.run(main)
