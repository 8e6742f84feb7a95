"""Sweep grids, sweep files and the resumable runner (2 x 2 tiny MAE sweep end to end)."""
import io
import json
import os
import shlex

import pytest

from medfm_jax.sweeps import report
from medfm_jax.sweeps import grid, runner, spec
from tests import helpers
from tests.sweeps.test_report import _table_rows, assert_png

# configs/sweeps/mae_mask_ratio.py:tiny shrunk to the tests' shared tiny MAE run (8 steps),
# checkpoint every 2 (sync); the sweep turns the closing table (final_eval) off itself.
TINY = grid.base_arg("configs/sweeps/mae_mask_ratio.py:tiny", {
    **helpers.TINY_MAE_CLI, "log_every": 1, "eval_every": 1000, "checkpoint_every": 2,
    "async_checkpointing": False})
KNN = ("configs/eval/knn.py:tiny,data.image_size=16,data.eval_examples=32,data.eval_batch_size=32,"
       "features.train_examples=64,features.batch_size=64,knn.k=5")
EVAL = runner.eval_name(KNN)


def test_product_and_zip():
  assert grid.product({"a": [1, 2]}, b=["x", "y"]) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert grid.zip_({"lr": [1e-3, 3e-4], "warmup_steps": [10, 50]}) == [
      {"lr": 1e-3, "warmup_steps": 10}, {"lr": 3e-4, "warmup_steps": 50}]
  nested = grid.product(grid.zip_(a=[1, 2], b=[3, 4]), seed=[0, 1])
  assert nested == [{"a": 1, "b": 3, "seed": 0}, {"a": 1, "b": 3, "seed": 1},
                    {"a": 2, "b": 4, "seed": 0}, {"a": 2, "b": 4, "seed": 1}]
  with pytest.raises(grid.SweepError, match="different lengths"):
    grid.zip_(a=[1, 2], b=[3])
  with pytest.raises(grid.SweepError, match=r"\['a'\] are set by two factors"):
    grid.product({"a": [1]}, a=[2])
  with pytest.raises(grid.SweepError, match="non-empty list"):
    grid.product(a=3)


def test_point_names_short_stable_and_safe():
  keys = ["objective.mask_ratio", "model.depth", "model.text.depth", "data.crop_scale"]
  p = {"objective.mask_ratio": 0.6, "model.depth": 2, "model.text.depth": 1, "data.crop_scale": (0.2, 1.0)}
  assert grid.point_name(p, keys) == "mask_ratio=0.6,model.depth=2,text.depth=1,crop_scale=0.2-1"
  assert grid.point_name({"model.variant": "B/16", "lr": 1e-5}) == "variant=B_16,lr=1e-05"
  long = grid.point_name({f"field{i}": i for i in range(40)})
  assert len(long) == grid.MAX_NAME and long == grid.point_name({f"field{i}": i for i in range(40)})
  assert long != grid.point_name({f"field{i}": i + 1 for i in range(40)})


def test_sweep_files_load_and_check_fields():
  for arg, n, kind in [("mae_mask_ratio.py:tiny", 3, "train"), ("dino_local_crops.py:tiny", 3, "train"),
                       ("dino_teacher_momentum.py:tiny", 2, "train"),
                       ("dino_teacher_momentum.py:vit_s16", 3, "train"),
                       ("clip_vs_siglip.py:tiny", 2, "train"), ("lora_rank.py:tiny", 4, "eval"),
                       ("label_efficiency.py:finetune_full", 3, "eval"),
                       ("label_efficiency.py:finetune_lora", 3, "eval"),
                       ("label_efficiency.py:linear_probe", 3, "eval"),
                       ("mae_mask_ratio.py:vit_b16", 20, "train")]:
    s = spec.load("configs/sweeps/" + arg)
    assert (len(s.points), s.kind) == (n, kind), arg
  assert spec.load("configs/sweeps/clip_vs_siglip.py").points[1]["objective.loss"] == "siglip"
  with pytest.raises(grid.SweepError, match="unknown field 'nope'"):
    spec.load("configs/sweeps/mae_mask_ratio.py:tiny,nope=1")
  with pytest.raises(grid.SweepError, match="unknown variant 'big'"):
    spec.load("configs/sweeps/mae_mask_ratio.py:big")
  with pytest.raises(grid.SweepError, match="does not exist"):
    spec.load("configs/sweeps/missing.py")


def test_dry_run_prints_exact_commands(tmp_path):
  sweep = spec.load(TINY)
  out = io.StringIO()
  runner.dry_run(sweep, str(tmp_path / "s"), [KNN], seeds=[0, 1], out=out)
  lines = out.getvalue().splitlines()
  assert len(lines) == 3 * 2 * 2     # points x seeds x (train + eval)
  first = str(tmp_path / "s" / "mask_ratio=0.25,seed=0")
  assert sweep.base == ("configs/mae.py:tiny,log_every=1,eval_every=1000,checkpoint_every=2,"
                        "final_eval.config='',data.image_size=16,batch_size=16,model.depth=2,"
                        "model.decoder_width=32,model.decoder_depth=1,total_steps=8,warmup_steps=2,"
                        "data.eval_examples=16,data.eval_batch_size=16,objective.knn_train_examples=0,"
                        "async_checkpointing=False")
  assert lines[0] == shlex.join([runner.python_exe(), "-m", "medfm_jax.main", f"--config={sweep.base}",
                                 f"--workdir={first}", "--config.objective.mask_ratio=0.25",
                                 "--config.seed=0"])
  assert f"--config.init_from={first}" in lines[1] and "medfm_jax.evaluate" in lines[1]
  assert runner.eval_name(KNN).startswith("knn_tiny+") and runner.eval_name("configs/eval/knn.py:tiny") == "knn_tiny"
  assert f"--workdir={first}/eval/{runner.eval_name(KNN)}" in lines[1]
  assert [l.split("seed=")[1][0] for l in lines[::2]] == ["0"] * 3 + ["1"] * 3   # seed-major
  assert not os.path.exists(tmp_path / "s")    # a dry run writes nothing
  with pytest.raises(grid.SweepError, match="--init_from is for sweeps over an eval config"):
    runner.plan(sweep, "x", init_from="runs/m")


def _crashing_at_step_3(plan):
  """``runner.plan`` whose training stages run tests/crash_main.py: SIGKILLed after step 3."""
  def crashing(*args, **kwargs):
    points = plan(*args, **kwargs)
    for s in (s for p in points for s in p.stages if s.name == "train"):
      i = s.argv.index("medfm_jax.main")
      s.argv[i:i + 1] = ["tests.crash_main", "--crash_at_step=3"]
    return points
  return crashing


def _two_point_sweep(directory):
  """A sweep file with TINY's base and 2 points that differ in both fields (so the report draws a
  plot per field); returns its path. The fields are data-only (phantom lesion size, flips), so
  every stage compiles the programs of the other point and of the resume tests: each point's
  stages are fresh processes that import JAX, and only the first of them compiles. (The 4 x 2
  dry run above covers a real grid.)"""
  path = os.path.join(directory, "two_points.py")
  points = [{"data.lesion_scale": 1.0, "data.flip": True},
            {"data.lesion_scale": 2.0, "data.flip": False}]
  with open(path, "w") as f:
    f.write(f"BASE = {spec.load(TINY).base!r}\n\n\ndef get_sweep(arg=None):\n  return {points!r}\n")
  return path


@pytest.mark.slow
def test_tiny_sweep_end_to_end_resumes_after_a_crash(tmp_path, monkeypatch, capsys):
  """2 points; first run killed at step 3 in every point (checkpoint at 2); the re-run (the CLI)
  resumes them and evaluates; a third run skips everything; the report has the 2 rows."""
  sweep_file = _two_point_sweep(str(tmp_path))
  wd = str(tmp_path / "sweep")
  args = [f"--config={sweep_file}", f"--workdir={wd}"]
  with monkeypatch.context() as m:
    m.setattr(runner, "plan", _crashing_at_step_3(runner.plan))
    # One CPU device, as in the CLI run below and the resume tests: the same programs.
    m.setenv("XLA_FLAGS", helpers.subprocess_env()["XLA_FLAGS"])
    assert runner.run(spec.load(sweep_file), wd) == 2
  assert capsys.readouterr().err.count("FAILED (exit -9)") == 2
  m = json.load(open(os.path.join(wd, "sweep.json")))
  assert [p["status"] for p in m["points"]] == ["failed"] * 2
  assert all(p["exit_code"] == -9 and p["error_tail"] and p["failed_stage"] == "train" for p in m["points"])
  names = [p["name"] for p in m["points"]]
  assert names == ["lesion_scale=1,flip=true", "lesion_scale=2,flip=false"]

  r = helpers.run_cli(args + [f"--then_eval={KNN}"], module="medfm_jax.sweeps")
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.load(open(os.path.join(wd, "sweep.json")))
  assert [p["status"] for p in m["points"]] == ["done"] * 2
  for name, p in zip(names, m["points"], strict=True):
    pdir = os.path.join(wd, name)
    rows = helpers.read_metrics(pdir)
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9))
    # Two starts: at step 0, then (killed during step 3) resumed from the step-2 checkpoint.
    assert [row["step"] for row in rows if "compile_time_s" in row] == [0, 2]
    cfg = json.load(open(os.path.join(pdir, "config.json")))
    assert cfg["data"]["lesion_scale"] == p["overrides"]["data.lesion_scale"]
    assert cfg["data"]["flip"] == p["overrides"]["data.flip"]
    assert os.path.exists(os.path.join(pdir, "DONE"))
    assert os.path.exists(os.path.join(pdir, "eval", EVAL, "results.json"))
    assert os.path.exists(os.path.join(pdir, "eval", EVAL, "DONE"))

  r = helpers.run_cli(args + [f"--then_eval={KNN}"], module="medfm_jax.sweeps")
  assert r.returncode == 0 and r.stdout.count("done, skipped") == 2, r.stdout + r.stderr[-2000:]
  os.remove(os.path.join(wd, names[1], "eval", EVAL, "DONE"))   # as if killed during the eval
  out = io.StringIO()
  runner.dry_run(spec.load(sweep_file), wd, [KNN], out=out)
  pending = [l for l in out.getvalue().splitlines() if not l.startswith("# done: ")]
  assert len(pending) == 1 and f"--workdir={wd}/{names[1]}/eval/{EVAL}" in pending[0]

  path = report.build([wd], [], wd)
  rows = _table_rows(open(path).read())
  assert rows[0][:5] == ["point", "lesion_scale", "flip", "seeds", "status"]
  assert {"loss", "eval/loss", f"{EVAL}/accuracy", f"{EVAL}/macro_auroc"} <= set(rows[0])
  assert [r[0] for r in rows[1:]] == names
  assert all("n/a" not in r[rows[0].index(f"{EVAL}/accuracy")] for r in rows[1:])
  for png in ("loss_curves.png", "vs_lesion_scale.png", "vs_flip.png"):
    assert_png(os.path.join(wd, png))


@pytest.mark.slow
def test_cli_config_error_is_one_line(tmp_path):
  r = helpers.run_cli(["--config=configs/sweeps/mae_mask_ratio.py:tiny,model.nope=1",
                       f"--workdir={tmp_path}", "--dry_run"], module="medfm_jax.sweeps", timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].endswith("config argument 'model.nope': unknown field 'nope'")
