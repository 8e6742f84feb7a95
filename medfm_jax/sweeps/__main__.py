r"""Sweep runner: every point of a sweep file, sequentially, resumable.

  python -m medfm_jax.sweeps --config=configs/sweeps/mae_mask_ratio.py:tiny --workdir=runs/mae_mask \
      --then_eval=configs/eval/knn.py:tiny [--seeds=0,1] [--dry_run]
  python -m medfm_jax.sweeps.report runs/mae_mask

One sub-workdir per point, named by its overrides (``mask_ratio=0.6,decoder_depth=2``); each stage
is a fresh ``python -m medfm_jax.main`` (or ``medfm_jax.evaluate``) process. Finished stages (DONE
marker) are skipped on re-runs, interrupted ones resume from their checkpoints. A failing point
is reported (exit code, log tail in sweep.json and on stderr) and the others still run; the exit
code is then 1. ``--dry_run`` prints the commands, e.g. to submit each through launch/slurm.sh.
Sweeps over an eval config (configs/sweeps/lora_rank.py) take ``--init_from=PRETRAIN_WORKDIR``.
"""
from __future__ import annotations

import sys

from absl import app, flags

from medfm_jax.sweeps import grid, runner, spec

_CONFIG = flags.DEFINE_string("config", None, "Sweep file and variant, e.g. configs/sweeps/mae_mask_ratio.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder: one sub-workdir per point + sweep.json.")
_THEN_EVAL = flags.DEFINE_multi_string(
    "then_eval", [], "Eval config (configs/eval/P.py:VARIANT[,k=v...]) run on each point's checkpoint "
    "into POINT/eval/P_VARIANT; repeatable.")
_SEEDS = flags.DEFINE_list("seeds", [], "Run every point once per seed (sets config field 'seed').")
_INIT_FROM = flags.DEFINE_string("init_from", "", "Eval-config sweeps: the checkpoint/workdir to evaluate.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands (finished ones as '# done:') and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    try:
      seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
      raise grid.SweepError(f"--seeds={','.join(_SEEDS.value)}: expected comma-separated integers") from None
    sweep = spec.load(_CONFIG.value)
    args = (sweep, _WORKDIR.value, _THEN_EVAL.value, seeds, _INIT_FROM.value)
    if _DRY_RUN.value:
      runner.dry_run(*args)
      return
    failed = runner.run(*args)
  except grid.SweepError as e:
    sys.stderr.write(f"medfm_jax.sweeps: {e}\n")
    sys.exit(2)
  if failed:
    sys.stderr.write(f"medfm_jax.sweeps: {failed} point(s) failed; see {_WORKDIR.value}/sweep.json\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
