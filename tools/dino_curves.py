r"""Plots the DINO collapse diagnostics of one or more training runs against step (one PNG).

Panels: teacher entropy (with ln K, the uniform teacher), student-teacher KL (``dino_loss -
teacher_entropy``: the loss is the mean over view pairs of H(teacher) + KL(teacher || student)),
centre norm, and the kNN accuracies of the eval steps. Reads each workdir's ``metrics.jsonl``; log
often (``log_every=5``) and evaluate often (``eval_every=25``) for a readable curve::

  python -m medfm_jax.main --config=configs/dino.py:tiny,log_every=5,eval_every=25 --workdir=runs/dino
  python tools/dino_curves.py --out=docs/images/dino_tiny_curves.png before=runs/dino_old after=runs/dino
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)

PANELS = (("teacher_entropy", "teacher entropy (nats)"),
          ("kl", "student-teacher KL (nats)"),
          ("center_norm", "centre norm"),
          ("knn", "kNN accuracy (fraction)"))


def read_run(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{series: [(step, value)]} of a run's metrics.jsonl; ``kl`` = dino_loss - teacher_entropy,
  ``knn/<label>`` the eval kNN accuracies."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    sys.exit(f"{workdir}: no metrics.jsonl (expected a training workdir)")
  series: dict[str, list[tuple[int, float]]] = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      step = rec["step"]
      if "teacher_entropy" in rec:
        series.setdefault("teacher_entropy", []).append((step, rec["teacher_entropy"]))
        loss = rec.get("dino_loss", rec.get("loss"))
        series.setdefault("kl", []).append((step, loss - rec["teacher_entropy"]))
      if "center_norm" in rec:
        series.setdefault("center_norm", []).append((step, rec["center_norm"]))
      for key, value in rec.items():
        if key.startswith("eval/knn_") and key.endswith("_acc"):
          series.setdefault("knn/" + key[len("eval/knn_"):-len("_acc")], []).append((step, value))
  return series


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="NAME=WORKDIR (or WORKDIR: named by its basename)")
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("--out_dim", type=int, default=512, help="K of the DINO head (the ln K line)")
  args = p.parse_args(argv)
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
  for i, spec in enumerate(args.runs):
    name, _, workdir = spec.rpartition("=")
    name = name or os.path.basename(os.path.normpath(workdir))
    series = read_run(workdir)
    colour = plt.get_cmap("tab10")(i % 10)
    for ax, (key, _) in zip(axes, PANELS):
      if key == "knn":
        for style, sub in zip(("-", "--", ":"), sorted(k for k in series if k.startswith("knn/"))):
          xs, ys = zip(*series[sub])
          ax.plot(xs, ys, style, marker="o", ms=3, color=colour, label=f"{name}: {sub[4:]}")
      elif key in series:
        xs, ys = zip(*series[key])
        ax.plot(xs, ys, color=colour, label=name)
  axes[0].axhline(math.log(args.out_dim), color="grey", ls="--", lw=1, label=f"ln K = {math.log(args.out_dim):.2f}")
  for ax, (_, label) in zip(axes, PANELS):
    ax.set_xlabel("training step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
  axes[1].set_yscale("log")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=100)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
