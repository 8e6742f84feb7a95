r"""Re-measures the seed spread behind the learning and accuracy thresholds of the test suite.

Each scenario is the test's own run (the ``*_run`` functions in the test modules, on the test's
config helpers), repeated for every seed in ``--seeds`` (config ``seed``: init, data order, dropout
and masks; the probe scenario also seeds the linear probe). Where a threshold claims that something
was learned, the same protocol is also measured at random init. Prints one table row per metric
(one column per seed) and the wall/CPU seconds of each scenario. Not part of the test command::

  python tools/seed_spread.py --seeds 0,1,2 --scenarios synthetic,probe,mae,dino,dinov2,clip,siglip,flava

Scenarios (cheapest first):
  synthetic  the kNN, linear-probe and ridge evaluators and the k-means codebook on constructed
             data (``seed`` = data seed): tests/metrics/test_knn.py, tests/evaluate/test_probe.py,
             tests/models/test_codebook.py.
  probe      tests/evaluate/test_protocols.py::test_feature_protocols (modality linear probe on the
             4-step MAE checkpoint), plus the same probe at random init (the checkpoint's
             architecture) and with shuffled train labels (what misaligned rows would score).
  mae        tests/objectives/test_mae.py::test_learning_signal_ci.
  dino       tests/objectives/test_dino.py::test_learning_signal_ci[dino].
  dinov2     the same with the DINOv2 recipe (test_learning_signal_ci[dinov2]).
  clip       tests/objectives/test_clip.py::test_learning_signal_ci[clip].
  siglip     the same with SigLIP's loss (test_learning_signal_ci[siglip]).
  flava      tests/objectives/test_flava.py::test_learning_signal_ci_and_restore (with the zero-shot
             protocol's difference from the hook's final numbers, which the test wants 0).
"""
import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The environment of tests/conftest.py, set when it is imported (8 fake CPU devices, the XLA flags,
# the compilation cache, parsed absl flags): the numbers are those the tests see.
from tests import conftest as tests_conftest  # noqa: E402  pylint: disable=g-import-not-at-top

import numpy as np  # noqa: E402

from medfm_jax.evaluate import probe as probe_lib  # noqa: E402
from tests.evaluate import test_probe, test_protocols  # noqa: E402
from tests.metrics import test_knn  # noqa: E402
from tests.models import test_codebook  # noqa: E402
from tests.objectives import test_clip, test_dino, test_flava, test_mae  # noqa: E402


def _synthetic(workdir, seed):
  del workdir
  out = {}
  out["knn_acc_clusters"], out["knn_acc_noise_features"] = test_knn.separable_knn_accuracies(seed)
  out["probe_acc_adam"], out["probe_acc_sgd"], out["ridge_acc"] = test_probe.blob_probe_accuracies(seed)
  out["kmeans/random_points"], out["kmeans/gaussian"] = test_codebook.kmeans_error_ratios(
      test_codebook.phantom_patches(seed), seed)
  return out


def _probe(workdir, seed):
  ckpt = tests_conftest.train_mae_ckpt(os.path.join(workdir, "mae"), seed)
  acc = lambda r: r["metrics"]["accuracy"]
  out = {"probe_acc": acc(test_protocols.linear_probe_run(os.path.join(workdir, "lp"), ckpt, seed)),
         "probe_acc@random_init": acc(test_protocols.linear_probe_run(os.path.join(workdir, "rand"),
                                                                      ckpt, seed, random_init=True))}
  # Negative control: the same probe trained on permuted labels (what misaligned rows would score).
  real = probe_lib.linear_probe
  perm = np.random.default_rng(seed).permutation
  probe_lib.linear_probe = lambda x, y, *a, **k: real(x, y[perm(len(y))], *a, **k)
  try:
    out["probe_acc@shuffled_labels"] = acc(test_protocols.linear_probe_run(
        os.path.join(workdir, "shuffled"), ckpt, seed))
  finally:
    probe_lib.linear_probe = real
  return out


def _monitor_rows(first, last, keys):
  """``{metric@STEP: value}`` of the eval metrics ``keys`` at the first and last eval."""
  return {f"{k}@{m['step']}": m[f"eval/{k}"] for m in (first, last) for k in keys}


_MONITOR = ("fewshot1_modality_acc", "fewshot10_modality_acc", "knn_modality_acc")


def _mae(workdir, seed):
  first, last = test_mae.mae_learning_run(workdir, seed)
  return dict(_monitor_rows(first, last, ("loss", *_MONITOR)), trivial=15 / 16)


def _dino(workdir, seed, objective="dino"):
  return _monitor_rows(*test_dino.dino_learning_run(workdir, seed, objective), _MONITOR)


def _clip(workdir, seed, loss="clip"):
  first, last = test_clip.clip_learning_run(workdir, seed, loss)
  out = {}
  for k in ("zero_shot_modality_accuracy", "i2t_r@5", "t2i_r@5"):
    out[f"{k}@0"], out[f"{k}@40"] = first[f"eval/{k}"], last[f"eval/{k}"]
  return out


def _flava(workdir, seed):
  _, first, last, results = test_flava.flava_learning_run(workdir, seed)
  out = {}
  for k in ("zero_shot_modality_accuracy", "itm_ranking_accuracy", "mlm_loss", "mim_loss",
            "i2t_r@5", "t2i_r@5"):
    out[f"{k}@0"], out[f"{k}@60"] = first[f"eval/{k}"], last[f"eval/{k}"]
  # The zero-shot protocol on the checkpoint, minus the hook's final value (the test wants 0).
  out["protocol-hook_accuracy@60"] = results["metrics"]["accuracy"] - last["eval/zero_shot_modality_accuracy"]
  out["protocol-hook_i2t_r@5@60"] = results["retrieval"]["i2t_r@5"] - last["eval/i2t_r@5"]
  return out


SCENARIOS = {"synthetic": _synthetic, "probe": _probe, "mae": _mae, "dino": _dino,
             "dinov2": lambda workdir, seed: _dino(workdir, seed, "dinov2"), "clip": _clip,
             "siglip": lambda workdir, seed: _clip(workdir, seed, "siglip"), "flava": _flava}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated config seeds")
  parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {list(SCENARIOS)}")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  names = args.scenarios.split(",")
  unknown = [n for n in names if n not in SCENARIOS]
  if unknown:
    parser.error(f"--scenarios: unknown {unknown}; allowed {list(SCENARIOS)}")
  for name in names:
    rows, wall, cpu = {}, time.perf_counter(), time.process_time()
    for seed in seeds:
      with tempfile.TemporaryDirectory() as workdir:
        for k, v in SCENARIOS[name](workdir, seed).items():
          rows.setdefault(k, {})[seed] = v
      print(f"# {name} seed {seed} done ({time.perf_counter() - wall:.0f} s)", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\n{name}: {wall:.0f} s wall, {cpu:.0f} s CPU for {len(seeds)} seed(s)")
    # A metric logged at step 0 and at a later step also gets its gain (later - step 0): the paired
    # difference the learning-signal tests assert, with mean - 3 sample s.d. (their margin rule).
    for k in [k for k in rows if k.endswith("@0")]:
      later = [j for j in rows if j.startswith(k[:-1]) and j != k]
      for j in later:
        rows[f"{j} - {k}"] = {s: rows[j][s] - rows[k][s] for s in seeds}
    print("| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | mean - 3 sample s.d. |")
    print("|---" * (len(seeds) + 3) + "|")
    for k, by_seed in rows.items():
      vals = np.array([by_seed[s] for s in seeds])
      low = vals.mean() - 3 * vals.std(ddof=1) if len(vals) > 1 else float("nan")
      print(f"| {k} | " + " | ".join(f"{v:.4f}" for v in vals) +
            f" | {vals.mean():.4f} ± {vals.std():.4f} | {low:.4f} |", flush=True)


if __name__ == "__main__":
  main()
