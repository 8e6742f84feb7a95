"""Evaluation results as ``results.json`` plus a Markdown table ``results.md`` in the workdir."""
from __future__ import annotations

import json

import numpy as np

from medfm_jax import storage

SUMMARY = ("accuracy", "balanced_accuracy", "macro_auroc")


def _fmt(x) -> str:
  return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def _segment_markdown(results: dict) -> str:
  m = results["metrics"]
  classes = [c for c in results["classes"] if results["class_examples"].get(c)]
  lines = [f"# segment on {results['split']} ({m['num_examples']} examples, recipe {results['recipe']}, "
           f"step {results['steps']})", "", f"init_from: `{results['init_from']}`", "",
           "| prompt | Dice | IoU |" + "".join(f" Dice {c} ({results['class_examples'][c]}) |" for c in classes),
           "|---|---|---|" + "---|" * len(classes)]
  for p in results["prompts"]:
    lines.append(f"| {p} | {_fmt(m[f'dice_{p}'])} | {_fmt(m[f'iou_{p}'])} |" +
                 "".join(f" {_fmt(m.get(f'dice_{p}/{c}'))} |" for c in classes))
  if results.get("overlay"):
    lines += ["", f"![overlays]({results['overlay']})"]
  return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
  """Summary (metric per row; few-shot: mean ± std over seeds) and per-class table; segment3d:
  Dice and HD95 per structure; seg_probe: Dice, IoU and mIoU; segment: Dice and IoU per prompt
  type, Dice per class."""
  if results["protocol"] == "segment":
    return _segment_markdown(results)
  if results["protocol"] == "segment3d":
    m = results["metrics"]
    names = [k[len("dice_"):] for k in m if k.startswith("dice_")]
    lines = [f"# segment3d on {results['split']} ({m['num_examples']} volumes, "
             f"{results.get('train_volumes') or 'all'} labelled train volumes)", "",
             f"init_from: `{results['init_from'] or 'random init'}`", "",
             f"mean Dice: {_fmt(m['mean_dice'])}", "", "| structure | Dice | HD95 (mm) | HD95 missed |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {_fmt(m[f'dice_{n}'])} | {_fmt(m[f'hd95_{n}'])} | {m[f'hd95_{n}_missed']} |" for n in names]
    return "\n".join(lines) + "\n"
  if results["protocol"] == "seg_probe":
    m = results["metrics"]
    return "\n".join([
        f"# seg_probe of the {results['label']} mask ({results['split']}, {m['num_examples']} images)",
        "", f"init_from: `{results['init_from'] or 'random init'}`", "", "| metric | value |", "|---|---|",
        *(f"| {k} | {_fmt(m[k])} |" for k in ("dice", "iou", "miou", "foreground_fraction"))]) + "\n"
  lines = [f"# {results['protocol']} on {results['label']} ({results['split']}, "
           f"{results['metrics']['num_examples']} examples)", "",
           f"init_from: `{results['init_from'] or 'random init'}`", "", "| metric | value |", "|---|---|"]
  for k in SUMMARY:
    value = _fmt(results["metrics"][k])
    if "std" in results:
      value += f" ± {_fmt(results['std'][k])} ({len(results['seeds'])} seeds)"
    lines.append(f"| {k} | {value} |")
  lines += ["", "| class | support | recall | precision | AUROC |", "|---|---|---|---|---|"]
  for r in results["metrics"]["per_class"]:
    lines.append(f"| {r['class']} | {r['support']} | {_fmt(r['recall'])} | {_fmt(r['precision'])} | "
                 f"{_fmt(r['auroc'])} |")
  return "\n".join(lines) + "\n"


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if np.isnan(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write(workdir: str, results: dict) -> tuple[str, str]:
  """Writes ``results.json`` (NaN -> null) and ``results.md`` into ``workdir`` (local or URL);
  returns their paths."""
  root = storage.path(workdir)
  json_path = storage.write_text(root / "results.json", json.dumps(_jsonable(results), indent=1))
  md_path = storage.write_text(root / "results.md", markdown(results))
  return str(json_path), str(md_path)
