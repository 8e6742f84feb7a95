r"""Train CLI: ``python -m medfm_jax.main --config=configs/mae.py:tiny --workdir=runs/mae_tiny``.

Flags -> config (``--config.a.b=value`` overrides) -> validation (one line per problem, before
any compile or file write) -> the shared trainer -> with ``final_eval.config`` set (every tiny
config), a closing table: the pretrained encoder vs its architecture at random init on benchmark
tasks (``evaluate.closing``), printed and written to WORKDIR/final_eval.{json,md}. Re-running in
the same workdir resumes.
"""
from __future__ import annotations

import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from medfm_jax import config as config_lib
from medfm_jax.data import decode
from medfm_jax.evaluate import closing, protocols
from medfm_jax.parallel import distributed
from medfm_jax.train import checkpoint, loop, restore
from medfm_jax import storage
from medfm_jax.sweeps import grid, spec as sweep_spec

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images: a local "
                                "path or a bucket URL (gs://, s3://, az://).")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run without a "
    "detected cluster (fallback: MEDFM_COORDINATOR); TPU pods, SLURM, Open MPI and Kubernetes "
    "indexed Jobs are detected automatically.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes "
                                      "(with --coordinator_address; fallback MEDFM_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                                   "(with --coordinator_address; fallback MEDFM_PROCESS_ID).")


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax/grain from the progress log (warnings still pass, orbax's errors
  without their tracebacks: a failed checkpoint save reaches the user as one line from here)."""

  def filter(self, record):
    noisy = ("orbax", "grain")
    if not any(n in record.pathname for n in noisy):
      return True
    if "orbax" in record.pathname:
      record.exc_info = record.exc_text = None
    return record.levelno >= pylogging.WARNING


def _save_config(config, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config (read by ``python -m medfm_jax.sweeps.report``)."""
  storage.write_text(storage.path(workdir) / "config.json",
                     config.to_json_best_effort(indent=1, sort_keys=True))


def _final_eval_config(config):
  """The eval config ``final_eval.config`` names (None when off), checked before training."""
  arg = config.get("final_eval", {}).get("config", "")
  if not arg:
    return None
  try:
    eval_config = sweep_spec.load_config(arg)
  except grid.SweepError as e:
    raise config_lib.ConfigError(f"final_eval.config={arg!r}: {e}") from None
  closing.check(eval_config, tuple(config.final_eval.labels))
  return eval_config


def _final_eval(config, eval_config, workdir: str) -> None:
  """Pretrained vs random init on the benchmark tasks: printed and written to the workdir."""
  result = closing.compare(eval_config, config, workdir, tuple(config.final_eval.labels))
  if jax.process_index() == 0:
    text = closing.write(workdir, result)
    logging.info("final evaluation -> %s/final_eval.{json,md}", workdir)
    print("\nPretrained vs random init (final_eval):\n" + text, flush=True)


def main(argv, hooks=()):
  """The CLI; ``hooks`` (per-step callbacks, see ``loop.StepHook``) are for programs that wrap it,
  e.g. the fault injection of the resume tests."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except distributed.DistributedError as e:
    sys.stderr.write(f"medfm_jax: multi-process setup error: {e}\n")
    sys.exit(2)
  if jax.process_index() != 0:   # one progress log per job; warnings still from everyone
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    restore.adopt_architecture(config)     # model fields of config.init_from (ours or HF)
    config_lib.validate(config, workdir)
    final_eval = _final_eval_config(config)
  except (config_lib.ConfigError, checkpoint.CheckpointError, protocols.EvalError) as e:
    sys.stderr.write(f"medfm_jax: config error: {e}\n")
    sys.exit(2)
  logging.info("config:\n%s", config)
  try:
    storage.path(workdir)
  except storage.StorageError as e:
    sys.stderr.write(f"medfm_jax: --workdir: {e}\n")
    sys.exit(2)
  if jax.process_index() == 0:
    _save_config(config, workdir)
  try:
    loop.train(config, workdir, hooks=hooks)
    if final_eval is not None:
      _final_eval(config, final_eval, workdir)
  except protocols.EvalError as e:
    _exit_with_line(f"final_eval: {e}", 2)
  except checkpoint.CheckpointError as e:
    _exit_with_line(f"checkpoint error: {e}", 2)
  except config_lib.ConfigError as e:   # found once the data is opened (e.g. a missing split)
    _exit_with_line(f"config error: {e}", 2)
  except loop.Preempted as e:
    _exit_with_line(str(e), 0)
  except loop.NonFiniteError as e:
    _exit_with_line(str(e), 3)
  except decode.DataError as e:
    _exit_with_line(f"data error: {e} (data.on_error='skip' skips and logs such files)", 2)


def _exit_with_line(message: str, code: int):
  """Exits with ``medfm_jax: MESSAGE`` on a line of its own. After a run has started, library
  threads may still be writing to stderr (orbax's save threads print tracebacks after a failed
  save), possibly mid-line: the line starts after a newline, so it is never glued to theirs."""
  sys.stderr.flush()
  sys.stderr.write(f"\nmedfm_jax: {message}\n")
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
