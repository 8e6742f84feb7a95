"""Runs a sweep's points one after the other, each stage as a fresh ``python -m`` subprocess.

Layout of ``WORKDIR`` (the sweep folder)::

  sweep.json                  manifest: sweep file, base, kind, evals, and per point its
                              overrides, commands, status (pending|running|done|failed), exit code
  POINT/                      training workdir (metrics.jsonl, config.json, checkpoints/), or the
                              eval workdir (results.json) when the base is an eval config
  POINT/DONE                  written only after the stage exited 0
  POINT/eval/NAME/            each --then_eval protocol's workdir (results.json, DONE)
  POINT/logs/STAGE.log        the stage's stdout + stderr (appended on re-runs)

Re-running skips every stage with a DONE marker; an interrupted stage re-runs in the same
workdir, so the trainer resumes from its latest checkpoint. ``WORKDIR`` may be a bucket URL: a
stage's log is then collected locally and added to ``STAGE.log`` when the stage ends.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from medfm_jax import storage
from medfm_jax.sweeps import grid, spec

MANIFEST = "sweep.json"
DONE = "DONE"
TAIL_LINES = 20
SEED = "seed"


@dataclasses.dataclass
class Stage:
  name: str            # 'train' | 'eval' (eval-config sweeps) | 'eval/NAME'
  workdir: str
  argv: list[str]

  @property
  def done_path(self) -> str:
    return os.path.join(self.workdir, DONE)

  def is_done(self) -> bool:
    return storage.path(self.done_path).exists()


@dataclasses.dataclass
class Point:
  name: str
  overrides: dict
  workdir: str
  stages: list[Stage]


def python_exe() -> str:
  """``python`` when that is this interpreter (portable dry-run lines), else its full path."""
  found = shutil.which("python")
  same = found and os.path.realpath(found) == os.path.realpath(sys.executable)
  return "python" if same else sys.executable


def override_flags(overrides: dict) -> list[str]:
  """``{"a.b": v}`` -> ``["--config.a.b=v"]`` in the syntax ml_collections config flags parse."""
  def text(v):
    if isinstance(v, bool):
      return str(v).lower()
    if isinstance(v, (list, tuple)):
      return "(" + ", ".join(text(x) if not isinstance(x, str) else repr(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)
  return [f"--config.{k}={text(v)}" for k, v in overrides.items()]


def eval_name(eval_arg: str) -> str:
  """The folder under POINT/eval/: ``configs/eval/knn.py:tiny`` -> ``knn_tiny``; with overrides
  (``knn.py:tiny,knn.k=5``) a hash of them is appended: ``knn_tiny+1a2b3c4d``."""
  path, _, arg = eval_arg.partition(":")
  variant, _, overrides = arg.partition(",")
  stem = os.path.splitext(os.path.basename(path))[0] + (f"_{variant}" if variant else "")
  if overrides:
    stem += "+" + hashlib.sha1(overrides.encode()).hexdigest()[:8]
  return grid.safe_name(stem)


def with_seeds(points: list[dict], seeds: list[int]) -> list[dict]:
  """Every point once per seed, seed-major (a cut-short run has whole grids); ``seed`` is last in
  the names. No seeds: the points unchanged."""
  if not seeds:
    return points
  if any(SEED in p for p in points):
    raise grid.SweepError("--seeds: the sweep's points already set 'seed'; drop one of the two")
  return [{**p, SEED: s} for s in seeds for p in points]


def plan(sweep: spec.Sweep, workdir: str, then_eval=(), seeds=(), init_from: str = "") -> list[Point]:
  """The points of ``sweep`` with their stages and exact commands."""
  if sweep.kind == "train" and init_from:
    raise grid.SweepError("--init_from is for sweeps over an eval config (configs/eval/...); "
                          f"{sweep.base!r} is a training config")
  if sweep.kind == "eval" and then_eval:
    raise grid.SweepError(f"--then_eval needs a training sweep; {sweep.base!r} is already an eval config")
  py = python_exe()
  points = with_seeds(sweep.points, list(seeds))
  keys = [k for p in points for k in p]
  names = [eval_name(e) for e in then_eval]
  if len(set(names)) != len(names):
    raise grid.SweepError(f"--then_eval: two evaluations share a folder name: {names}")
  out = []
  for p in points:
    name = grid.point_name(p, keys)
    pdir = os.path.join(workdir, name)
    flags = override_flags(p)
    if sweep.kind == "train":
      stages = [Stage("train", pdir, [py, "-m", "medfm_jax.main", f"--config={sweep.base}",
                                      f"--workdir={pdir}", *flags])]
      for e, n in zip(then_eval, names):
        edir = os.path.join(pdir, "eval", n)
        stages.append(Stage(f"eval/{n}", edir, [py, "-m", "medfm_jax.evaluate", f"--config={e}",
                                               f"--config.init_from={pdir}", f"--workdir={edir}"]))
    else:
      init = [f"--config.init_from={init_from}"] if init_from else []
      stages = [Stage("eval", pdir, [py, "-m", "medfm_jax.evaluate", f"--config={sweep.base}", *init,
                                     f"--workdir={pdir}", *flags])]
    out.append(Point(name, p, pdir, stages))
  return out


def command_line(stage: Stage) -> str:
  return shlex.join(stage.argv)


def _tail(path: str, n: int = TAIL_LINES) -> list[str]:
  try:
    text = storage.path(path).read_bytes().decode(errors="replace")
    return text.splitlines()[-n:]
  except OSError:
    return []


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = spec.REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


def run_stage(stage: Stage, log_path: str) -> tuple[int, float]:
  """Runs one stage, appending its output to ``log_path``; writes DONE on exit code 0."""
  log = storage.path(log_path)
  log.parent.mkdir(parents=True, exist_ok=True)
  storage.path(stage.workdir).mkdir(parents=True, exist_ok=True)
  header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command_line(stage)}\n"
  t0 = time.time()
  # A local log is appended to live; a URL object (no append) gets the output when the stage ends.
  with (tempfile.TemporaryFile("w+") if storage.is_url(log) else log.open("a")) as f:
    f.write(header)
    f.flush()
    code = subprocess.call(stage.argv, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if storage.is_url(log):
      f.seek(0)
      storage.append_text(log, f.read())
  wall = time.time() - t0
  if code == 0:
    storage.write_text(stage.done_path, json.dumps({"command": command_line(stage), "wall_s": wall}))
  return code, wall


class Manifest:
  """``sweep.json``: rewritten atomically after every status change."""

  def __init__(self, workdir: str, sweep: spec.Sweep, points: list[Point], then_eval, seeds):
    self.path = storage.path(workdir) / MANIFEST
    old = {}
    if self.path.exists():
      old = {p["name"]: p for p in json.loads(storage.read_text(self.path)).get("points", [])}
    self.data = {"sweep": sweep.source, "base": sweep.base, "kind": sweep.kind,
                 "then_eval": list(then_eval), "seeds": list(seeds), "points": []}
    for p in points:
      prev = old.get(p.name, {})
      status = "done" if all(s.is_done() for s in p.stages) else prev.get("status", "pending")
      self.data["points"].append({
          "name": p.name, "overrides": p.overrides, "status": status,
          "commands": {s.name: command_line(s) for s in p.stages},
          "exit_code": prev.get("exit_code"), "failed_stage": prev.get("failed_stage"),
          "log": prev.get("log"), "error_tail": prev.get("error_tail"), "wall_s": prev.get("wall_s", {})})
    self.write()

  def update(self, name: str, **fields) -> None:
    for p in self.data["points"]:
      if p["name"] == name:
        p.update(fields)
    self.write()

  def write(self) -> None:
    tmp = storage.write_text(self.path.parent / (MANIFEST + ".tmp"), json.dumps(self.data, indent=1))
    tmp.replace(self.path)


def run(sweep: spec.Sweep, workdir: str, then_eval=(), seeds=(), init_from: str = "",
        out=sys.stdout) -> int:
  """Runs every unfinished stage of every point; returns the number of failed points."""
  points = plan(sweep, workdir, then_eval, seeds, init_from)
  manifest = Manifest(workdir, sweep, points, then_eval, seeds)
  failed = 0
  for i, p in enumerate(points):
    header = f"[{i + 1}/{len(points)}] {p.name}"
    if all(s.is_done() for s in p.stages):
      print(f"{header}: done, skipped", file=out, flush=True)
      continue
    walls = dict(manifest.data["points"][i]["wall_s"] or {})
    for s in p.stages:
      if s.is_done():
        print(f"{header} {s.name}: done, skipped", file=out, flush=True)
        continue
      log = os.path.join(p.workdir, "logs", s.name.replace("/", "_") + ".log")
      manifest.update(p.name, status="running", log=log)
      print(f"{header} {s.name}: {command_line(s)}", file=out, flush=True)
      code, walls[s.name] = run_stage(s, log)
      if code != 0:
        tail = _tail(log)
        manifest.update(p.name, status="failed", exit_code=code, failed_stage=s.name, error_tail=tail,
                        wall_s=walls)
        print(f"{header} {s.name}: FAILED (exit {code}); log {log}; last lines:\n  " + "\n  ".join(tail),
              file=sys.stderr, flush=True)
        failed += 1
        break
      print(f"{header} {s.name}: ok in {walls[s.name]:.1f}s", file=out, flush=True)
    else:
      manifest.update(p.name, status="done", exit_code=0, failed_stage=None, error_tail=None, wall_s=walls)
  return failed


def dry_run(sweep: spec.Sweep, workdir: str, then_eval=(), seeds=(), init_from: str = "",
            out=sys.stdout) -> None:
  """Prints every stage's exact command (finished ones commented out); writes nothing."""
  for p in plan(sweep, workdir, then_eval, seeds, init_from):
    for s in p.stages:
      print(("# done: " if s.is_done() else "") + command_line(s), file=out)
