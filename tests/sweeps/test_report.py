"""python -m medfm_jax.sweeps.report on synthetic sweep folders and workdirs (no training: fast)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from medfm_jax.sweeps import report
from medfm_jax.sweeps import collect
from medfm_jax.train import checkpoint
from tests import helpers


def _run(workdir, losses, final_eval, acc=None, crash_rows=()):
  """A fake training workdir: loss per step (+ re-written rows after a resume) and an eval row."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    rows = list(enumerate(losses, 1))
    for step, loss in rows[:4] + list(crash_rows) + rows[4:]:   # a killed run's rows, then the resume's
      f.write(json.dumps({"step": step, "loss": loss, "lr": 1e-3}) + "\n")
    f.write(json.dumps({"step": len(losses), "eval/loss": final_eval}) + "\n")
  if acc is not None:
    edir = os.path.join(workdir, "eval", "knn_tiny")
    os.makedirs(edir)
    with open(os.path.join(edir, "results.json"), "w") as f:
      json.dump({"metrics": {"accuracy": acc, "balanced_accuracy": acc / 2, "macro_auroc": None}}, f)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  """A 2 (mask_ratio) x 2 (decoder_depth) x 2 seeds sweep folder written by hand."""
  root = str(tmp_path_factory.mktemp("sweep"))
  points = []
  rng = np.random.default_rng(0)
  for seed in (0, 1):
    for ratio in (0.6, 0.9):
      for depth in (1, 2):
        name = f"mask_ratio={ratio},decoder_depth={depth},seed={seed}"
        losses = list(np.linspace(1.0, 0.3 + ratio / 10, 12) + rng.normal(0, 0.01, 12))
        _run(os.path.join(root, name), losses, final_eval=ratio + depth / 10 + seed / 100,
             acc=0.5 + ratio / 4 + depth / 20 + seed / 50,
             crash_rows=[(5, 99.0), (6, 99.0)] if seed == 0 else [])
        points.append({"name": name, "status": "done", "overrides": {
            "objective.mask_ratio": ratio, "model.decoder_depth": depth, "seed": seed}})
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"points": points}, f)
  return root


def _table_rows(md):
  rows = [line for line in md.splitlines() if line.startswith("| ")]
  return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def assert_png(path, min_size=(400, 250)):
  """Opens ``path``: large enough, not blank (pixel variation, many distinct colours)."""
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
    px = np.asarray(im.convert("RGB"))
  assert px.std() > 5.0
  assert len(np.unique(px.reshape(-1, 3), axis=0)) > 20


def _se(values):
  """Standard error of the mean, written out: sample std / sqrt(n)."""
  n = len(values)
  mean = sum(values) / n
  return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


@pytest.mark.slow
def test_report_rows_mean_se_and_plots(sweep_dir):
  path = report.build([sweep_dir], ["eval/loss", "knn_tiny/accuracy", "loss"], sweep_dir)
  md = open(path).read()
  rows = _table_rows(md)
  header, body = rows[0], rows[1:5]
  assert header == ["point", "mask_ratio", "decoder_depth", "seeds", "status", "eval/loss",
                    "knn_tiny/accuracy", "loss"]
  assert [r[0] for r in body] == ["mask_ratio=0.6,decoder_depth=1", "mask_ratio=0.6,decoder_depth=2",
                                  "mask_ratio=0.9,decoder_depth=1", "mask_ratio=0.9,decoder_depth=2"]
  for r in body:
    ratio, depth = float(r[1]), int(r[2])
    evals = [ratio + depth / 10 + s / 100 for s in (0, 1)]
    assert r[3] == "2" and r[4] == "done"
    assert r[5] == f"{np.mean(evals):.4f} ± {_se(evals):.4f}"
    accs = [0.5 + ratio / 4 + depth / 20 + s / 50 for s in (0, 1)]
    assert r[6] == f"{np.mean(accs):.4f} ± {_se(accs):.4f}"
  assert "standard error = sample std / sqrt(n)" in md
  assert "## Effect vs seed spread" in md and "## Every run" in md
  assert len(rows) == 1 + 4 + (1 + 3) + 1 + 8
  assert_png(os.path.join(sweep_dir, "loss_curves.png"))
  for field in ("mask_ratio", "decoder_depth"):
    assert "![Final metrics vs" in md and f"vs_{field}.png" in md
    assert_png(os.path.join(sweep_dir, f"vs_{field}.png"))


def test_mean_se_over_three_seeds_in_table_and_plot(tmp_path, monkeypatch):
  """3 seeds (with 2, s.e. = population std: the two cannot be told apart); one seed lacks the
  metric. The table and the plotted error bars are s.e. = sample std / sqrt(n), not std."""
  root = str(tmp_path)
  accs = {0.25: [0.30, 0.34, 0.41], 0.75: [0.36, 0.37, float("nan")]}
  points = []
  for seed in range(3):
    for ratio, acc in accs.items():
      name = f"mask_ratio={ratio},seed={seed}"
      _run(os.path.join(root, name), [1.0, 0.9, 0.8, 0.7, 0.6], final_eval=ratio + seed / 100,
           acc=acc[seed])
      points.append({"name": name, "status": "done",
                     "overrides": {"objective.mask_ratio": ratio, "seed": seed}})
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"points": points}, f)
  plotted = {}
  monkeypatch.setattr(report.plots, "loss_curves", lambda *a: False)
  monkeypatch.setattr(report.plots, "metric_vs_field",
                      lambda key, series, *a: plotted.update(series[""]) or False)
  rows = _table_rows(open(report.build([root], ["knn_tiny/accuracy", "eval/loss"], root)).read())
  assert rows[1][1:4] == ["0.25", "3", "done"] and rows[2][1:4] == ["0.75", "3", "done"]
  assert rows[1][4] == f"{np.mean(accs[0.25]):.4f} ± {_se(accs[0.25]):.4f}"
  assert rows[2][4] == f"0.3650 ± {_se([0.36, 0.37]):.4f} (n=2)"
  # Effect vs seed spread: accuracy's seed ranges overlap (0.30-0.41 vs 0.36-0.37), eval/loss's do
  # not (0.25-0.27 vs 0.75-0.77; s.e. 0.0058 each).
  acc_se = float(np.hypot(_se(accs[0.25]), 0.005))
  assert rows[4] == ["knn_tiny/accuracy", "mask_ratio=0.75", "mask_ratio=0.25", "0.0150",
                     f"{acc_se:.4f}", f"{0.015 / acc_se:.1f}", "yes"]
  loss_se = float(np.hypot(_se([0.25, 0.26, 0.27]), _se([0.75, 0.76, 0.77])))
  assert rows[5] == ["eval/loss", "mask_ratio=0.75", "mask_ratio=0.25", "0.5000", f"{loss_se:.4f}",
                     f"{0.5 / loss_se:.1f}", "**no**"]
  (x0, mean0, se0), (x1, mean1, se1) = plotted["knn_tiny/accuracy"]
  assert (x0, x1) == (0.25, 0.75)
  assert se0 == pytest.approx(_se(accs[0.25])) and mean0 == pytest.approx(np.mean(accs[0.25]))
  assert se1 == pytest.approx(0.005) and mean1 == pytest.approx(0.365)


@pytest.mark.slow
def test_resumed_rows_replace_earlier_ones(sweep_dir):
  run = collect.Run("x", os.path.join(sweep_dir, "mask_ratio=0.6,decoder_depth=1,seed=0"), {}, "")
  collect.load_numbers(run)
  assert [s for s, _ in run.curve] == list(range(1, 13))
  assert max(v for _, v in run.curve) < 2.0            # the 99.0 rows were overwritten by the resume
  assert run.metrics["knn_tiny/macro_auroc"] != run.metrics["knn_tiny/macro_auroc"]   # null -> NaN


@pytest.mark.slow
def test_plain_workdirs_diff_their_configs(tmp_path):
  """Workdirs without a sweep: swept fields = the config.json fields that differ."""
  dirs = []
  for lr in (1e-3, 3e-4):
    d = str(tmp_path / f"run_{lr}")
    _run(d, [1.0, 0.5], final_eval=lr * 100)
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({"lr": lr, "seed": 0, "model": {"variant": "Mu/4"}}, f)
    dirs.append(d)
  out = str(tmp_path / "cmp")
  r = helpers.run_cli([*dirs, f"--out={out}", "--metric=eval/loss"], module="medfm_jax.sweeps.report", timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = _table_rows(open(os.path.join(out, "report.md")).read())
  assert rows[0] == ["point", "lr", "seeds", "status", "eval/loss"]
  assert sorted(r[4] for r in rows[1:]) == ["0.0300", "0.1000"]
  assert_png(os.path.join(out, "vs_lr.png"))


@pytest.mark.slow
def test_unknown_metric_and_path_are_one_line_errors(sweep_dir, tmp_path):
  with pytest.raises(collect.ReportError, match="no run has it; available"):
    report.build([sweep_dir], ["eval/nope"], str(tmp_path))
  with pytest.raises(collect.ReportError, match="not a sweep folder"):
    report.build([str(tmp_path)], [], str(tmp_path))


def _pretraining(path, objective, seed):
  """A plain checkpoint whose meta config names ``objective`` and ``seed`` (what init_from reads)."""
  config = {"seed": seed, "total_steps": 2000, "objective": {"name": objective, "mask_ratio": 0.75}}
  checkpoint.export_params(str(path), 2000, {"w": np.zeros(2, np.float32)}, {"config": json.dumps(config)})
  return str(path)


def _evaluation(path, accuracy, init_from="", seed=0, budget=10, scheme="full", recorded=True):
  """An eval workdir: results.json with the eval config it recorded (or, as written before configs
  were recorded, none)."""
  os.makedirs(path)
  config = {"protocol": "finetune", "seed": seed, "init_from": init_from, "data": {"label": "lesion_location"},
            "objective": {"scheme": scheme}, "probe": {"labels_per_class": budget, "seed": 0}}
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"metrics": {"accuracy": accuracy}, **({"config": config} if recorded else {})}, f)
  return str(path)


def test_evaluations_group_by_pretraining_recipe_and_pair_with_random_init(tmp_path, monkeypatch):
  """Evaluations of three pretraining seeds of one recipe are replicates of one point (as are the
  random inits' seeds); each pretrained point is paired with the random-init point of its budget
  and scheme. Runs without a recorded config do not make every field look swept."""
  mae = [_pretraining(tmp_path / f"mae_s{s}", "mae", s) for s in range(3)]
  acc = {("mae", 10): [0.33, 0.32, 0.34], ("random", 10): [0.27, 0.28, 0.29],
         ("mae", 100): [0.42, 0.46, 0.41], ("random", 100): [0.39, 0.41, 0.36]}
  dirs = []
  for (init, budget), values in acc.items():
    for s, a in enumerate(values):
      dirs.append(_evaluation(tmp_path / f"ft_{budget}_{init}{s}", a, init_from=mae[s] if init == "mae" else "",
                              seed=0 if init == "mae" else s, budget=budget))
  lora = _evaluation(tmp_path / "ft_lora", 0.30, init_from=mae[0], scheme="lora")
  monkeypatch.setattr(report.plots, "loss_curves", lambda *a: False)        # the tables are the subject
  monkeypatch.setattr(report.plots, "metric_vs_field", lambda *a: False)
  old = _evaluation(tmp_path / "ft_old", 0.50, recorded=False)
  path = report.build([*dirs, lora, old], ["accuracy"], str(tmp_path / "out"))
  md = open(path).read()
  rows = {r[0]: r for r in _table_rows(md)}
  assert rows["point"][1:5] == ["init", "scheme", "labels_per_class", "seeds"]
  for (init, budget), values in acc.items():
    row = rows[f"init={init},scheme=full,labels_per_class={budget}"]
    assert row[4] == "3" and row[6] == f"{np.mean(values):.4f} ± {_se(values):.4f}", row
  assert rows["init=mae,scheme=lora,labels_per_class=10"][6] == "0.3000"
  pairs = {r[1]: r for r in _table_rows(md.split("## Pretrained vs random init")[1].split("## Effect")[0])}
  assert set(pairs) == {"point", "init=mae,scheme=full,labels_per_class=10", "init=mae,scheme=full,labels_per_class=100"}
  diff = np.mean(acc[("mae", 10)]) - np.mean(acc[("random", 10)])
  se = float(np.hypot(_se(acc[("mae", 10)]), _se(acc[("random", 10)])))
  assert pairs["init=mae,scheme=full,labels_per_class=10"][4:] == [f"{diff:+.4f}", f"{se:.4f}", f"{diff / se:+.1f}"]
  # A second recipe (another objective) is a point of its own, not a replicate of the first.
  dino = _evaluation(tmp_path / "ft_dino", 0.25, init_from=_pretraining(tmp_path / "dino_s0", "dino", 0))
  rows = {r[0]: r for r in _table_rows(open(report.build([*dirs[:3], dino], ["accuracy"], str(tmp_path / "out2"))).read())}
  assert rows["init=mae"][2] == "3" and rows["init=dino"][2] == "1"
