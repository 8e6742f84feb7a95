"""Report figures (matplotlib, Agg): overlaid loss curves and final metrics vs a swept field."""
from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
import numpy as np  # noqa: E402

from medfm_jax import storage  # noqa: E402
from medfm_jax.sweeps import grid  # noqa: E402

FONT = 11
DPI = 110
# Units of common swept fields (axis labels); others show the field name alone.
UNITS = {
    "objective.mask_ratio": "fraction of patches masked",
    "model.decoder_depth": "blocks",
    "model.depth": "blocks",
    "data.multicrop.num_local": "crops per image",
    "objective.momentum_teacher": "teacher EMA momentum",
    "objective.lora_rank": "rank",
    "objective.init_logit_scale": "log scale",
    "lr": "base learning rate",
    "batch_size": "images",
    "total_steps": "steps",
    "warmup_steps": "steps",
    "data.image_size": "pixels",
}


def metric_label(metric: str) -> str:
  if metric.endswith(("accuracy", "auroc")) or "top1" in metric or "top5" in metric:
    return f"{metric} (fraction)"
  if metric == "loss":
    return "final training loss"
  return metric


def axis_label(metric: str) -> str:
  """The y label: ``metric_label``, less an ``eval/NAME/`` prefix (the panel title has it)."""
  if "/" not in metric:
    return metric_label(metric)
  name = metric.rsplit("/", 1)[1]
  return f"{name} (fraction)" if name.endswith(("accuracy", "auroc", "_acc")) else name


def field_label(key: str) -> str:
  return f"{key} ({UNITS[key]})" if key in UNITS else key


def _style():
  plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 2, "axes.labelsize": FONT + 1,
                       "legend.fontsize": FONT - 1, "xtick.labelsize": FONT, "ytick.labelsize": FONT})


def _colours(n: int):
  cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(n)]


def _legend_outside(fig, ax_or_fig, n: int):
  """Legend right of the axes (never over the data); two columns past 16 entries."""
  return ax_or_fig.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                          ncol=1 if n <= 16 else 2, frameon=False)


def _save(fig, path) -> None:
  """The figure as a PNG at ``path`` (local or URL), then closed."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())


def loss_curves(groups: dict, path: str, title: str) -> bool:
  """``groups``: label -> list of [(step, loss)] (one per seed); one colour per group."""
  groups = {k: [c for c in v if c] for k, v in groups.items()}
  groups = {k: v for k, v in groups.items() if v}
  if not groups:
    return False
  _style()
  fig, ax = plt.subplots(figsize=(9.5, 5.5))
  for colour, (label, curves) in zip(_colours(len(groups)), groups.items()):
    for i, curve in enumerate(curves):
      steps, losses = zip(*curve)
      ax.plot(steps, losses, color=colour, lw=1.6, alpha=0.9 if i == 0 else 0.55,
              ls=("-", "--", ":", "-.")[i % 4],
              label=f"{label} ({len(curves)} seeds)" if i == 0 and len(curves) > 1 else (label if i == 0 else None))
  ax.set_xlabel("training step")
  ax.set_ylabel("training loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  _legend_outside(fig, ax, len(groups))
  _save(fig, path)
  return True


def metric_vs_field(key: str, series: dict, metrics: list[str], path: str, title: str) -> bool:
  """Final metrics against swept field ``key``, error bars = ± 1 standard error over seeds.

  ``series``: label (the other swept fields) -> {metric -> [(value of key, mean, s.e.)]}.
  """
  values = sorted({v for s in series.values() for pts in s.values() for v, _, _ in pts}, key=_sort_key)
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  cols = min(3, len(metrics))
  rows = math.ceil(len(metrics) / cols)
  _style()
  fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols + 2.5, 3.9 * rows), squeeze=False)
  colours = _colours(len(series))
  drawn = False
  for ax, metric in zip(axes.flat, metrics):
    for colour, (label, by_metric) in zip(colours, series.items()):
      pts = sorted((p for p in by_metric.get(metric, []) if np.isfinite(p[1])), key=lambda p: _sort_key(p[0]))
      if not pts:
        continue
      x = [p[0] if numeric else values.index(p[0]) for p in pts]
      ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=6, lw=1.6,
                  capsize=4, color=colour, label=label)
      drawn = True
    ax.set_title(metric)
    ax.set_xlabel(field_label(key))
    ax.set_ylabel(axis_label(metric))
    ax.grid(alpha=0.3)
    if numeric:
      ax.set_xticks(values)
      if min(values) > 0 and max(values) / min(values) >= 16:
        ax.set_xscale("log", base=2 if all(isinstance(v, int) for v in values) else 10)
        ax.set_xticks(values)
      ax.set_xticklabels([grid.format_value(v) for v in values])
    else:
      ax.set_xticks(range(len(values)))
      ax.set_xticklabels([grid.format_value(v) for v in values])
      ax.set_xlim(-0.5, len(values) - 0.5)
  for ax in list(axes.flat)[len(metrics):]:
    ax.set_visible(False)
  if not drawn:
    plt.close(fig)
    return False
  fig.suptitle(f"{title}\n(mean over seeds, error bars ± 1 standard error)", fontsize=FONT + 3)
  if len(series) > 1 or next(iter(series)) != "":
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.93), frameon=False,
               title="other fields")
  fig.tight_layout()
  _save(fig, path)
  return True


def _sort_key(v):
  return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
