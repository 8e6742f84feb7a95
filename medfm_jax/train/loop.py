"""THE training loop, shared by every objective.

config -> mesh -> the run's assembly (``train.assemble``) + data -> sharded state (fresh or
restored) -> AOT-compiled step -> loop with metrics, evals, checkpoints. The loop knows nothing
about any objective beyond ``Objective``.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from medfm_jax import objectives as objectives_lib
from medfm_jax.data import pipeline
from medfm_jax.data import spec as data_spec
from medfm_jax.parallel import distributed
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import assemble as assemble_lib
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import state as state_lib
from medfm_jax.train import telemetry


class NonFiniteError(RuntimeError):
  """Loss or gradients became NaN/Inf; the bad state was not saved."""


class Preempted(Exception):
  """SIGTERM/SIGINT stopped the run after a step; that step's checkpoint is committed."""

  def __init__(self, signal_name: str, step: int, directory: str):
    self.signal_name, self.step, self.directory = signal_name, step, directory
    super().__init__(f"{signal_name}: stopped after step {step} and saved it to {directory}; "
                     "run the same command to resume")


class StopSignals:
  """SIGTERM/SIGINT handlers for the run: the first signal asks the loop to stop after the
  current step (``requested``); a second one exits at once. Installed only on the main thread;
  the previous handlers come back on exit."""
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      os.write(2, f"medfm_jax: second {signal.Signals(signum).name}: exiting now, without "
                  "saving\n".encode())
      os._exit(128 + signum)
    self.received = signum
    logging.warning("%s received: finishing the current step, then saving a checkpoint "
                    "(send it again to exit at once)", signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    """Whether any process got a signal; with several processes every one calls this at the
    same step and all get the same answer (a tiny all-gather), so they stop at the same step."""
    flag = self.received is not None
    if jax.process_count() > 1:
      flag = bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
    return flag

  @staticmethod
  def due(step: int, every: int, saved: bool) -> bool:
    """Whether the loop asks :meth:`requested` after ``step``: after every step with one process
    (no collective); with several, every ``every`` steps and at checkpoint steps (``saved``), the
    same steps on every process, so that they still agree on the step they stop and save at."""
    return jax.process_count() == 1 or saved or step % every == 0

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else "a signal on another process"


# Called as ``hook(step, state)`` after every train step (``step`` = steps done), before that
# step's logging, eval and checkpoint; e.g. progress reporting, or the fault injection of tests.
StepHook = Callable[[int, state_lib.TrainState], None]


@dataclasses.dataclass
class Trainer:
  """Everything a run holds; built by :func:`setup`, driven by :func:`train`."""
  assembly: assemble_lib.Assembly   # objective, optimizer, abstract sharded state, jitted steps
  workdir: str
  data_iterator: object
  state: state_lib.TrainState
  start_step: int

  @property
  def config(self):
    return self.assembly.config

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.assembly.mesh

  @property
  def objective(self) -> objectives_lib.Objective:
    return self.assembly.objective

  @property
  def data(self) -> data_spec.DataSpec:
    return self.assembly.data


def setup(config, workdir: str, checkpointer: ckpt_lib.Checkpointer | None = None,
          mesh: jax.sharding.Mesh | None = None, source=None) -> Trainer:
  """Assembles the run and its data; the train state is fresh or restored from ``workdir``.
  ``source`` replaces the train split's records (e.g. a label budget's subset)."""
  assembly = assemble_lib.assemble(config, mesh or mesh_lib.make_mesh(config.mesh))
  data_iterator = pipeline.make_train_iterator(assembly.data, config.batch_size, config.seed,
                                               jax.process_index(), jax.process_count(), source=source,
                                               skip_log=pipeline.skip_log_path(workdir, jax.process_index()))
  restored = None
  if checkpointer is not None:
    with mesh_lib.use_mesh(assembly.mesh):
      restored = checkpointer.restore_latest(assembly.abstract_state, data_iterator)
  if restored is None:
    state, start = assembly.init_state(), 0
  else:
    state = restored[1]
    start = int(jax.device_get(state.step))
  return Trainer(assembly, workdir, data_iterator, state, start)


def _check_finite(state) -> None:
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    raise NonFiniteError(f"loss or gradients became NaN/Inf at step {bad}; stopped, and no "
                         "checkpoint of the bad state was written (lower lr, enable grad_clip, "
                         "or use float32)")


def eval_sums(eval_fn, params, extra, eval_batches, mesh) -> tuple[dict[str, tuple[float, float]], dict | None]:
  """Runs ``eval_fn(params, extra, global batch) -> {name: (sum, count)}`` over ``eval_batches``
  -> ({name: (total sum, total count)}, the first global batch or None). Shared by the in-training
  evals and the evaluation protocols that restore a run (``evaluate.protocols``)."""
  sums: dict[str, list[float]] = {}
  first = None
  for local in eval_batches:
    batch = mesh_lib.to_global_batch(local, mesh)
    first = first or batch
    for name, (total, count) in jax.device_get(eval_fn(params, extra, batch)).items():
      acc = sums.setdefault(name, [0.0, 0.0])
      acc[0] += float(total)
      acc[1] += float(count)
  return {k: (s, c) for k, (s, c) in sums.items()}, first


def evaluate(trainer: Trainer, eval_fn, eval_batches, step: int) -> dict[str, float]:
  """Held-out metrics over the eval split, then the objective's artifacts."""
  state = trainer.state
  sums, first = eval_sums(eval_fn, state.params, state.extra, eval_batches, trainer.mesh)
  if first is not None:
    trainer.objective.eval_artifacts(state.params, state.extra, first, jax.random.PRNGKey(0),
                                     trainer.workdir, step)
  results = {k: s / max(c, 1.0) for k, (s, c) in sums.items()}
  results.update(trainer.objective.evaluate(state.params, state.extra, trainer.mesh, step))
  return {f"eval/{k}": v for k, v in results.items()}


def _eval_and_log(trainer, eval_fn, eval_batches, step, writer) -> None:
  results = evaluate(trainer, eval_fn, eval_batches, step)
  if not results:
    return
  writer.write(step, results)
  logging.info("eval at step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in results.items()))


def train(config, workdir: str, mesh: jax.sharding.Mesh | None = None,
          hooks: Sequence[StepHook] = (), source=None) -> state_lib.TrainState:
  """Runs (or resumes) training to ``config.total_steps``; returns the final state. ``workdir``
  is a local path or a bucket URL; ``hooks`` run after every step (see :data:`StepHook`);
  ``source`` replaces the train split's records (:func:`setup`)."""
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, config.async_checkpointing)
  trainer = writer = error = None
  try:
    with StopSignals() as stop:
      trainer = setup(config, workdir, checkpointer, mesh, source)
      writer = telemetry.MetricWriter(workdir)
      return _run(trainer, checkpointer, writer, hooks, stop)
  except BaseException as e:
    error = e
    raise
  finally:
    _close_all([checkpointer.close, writer and writer.close,
                trainer and getattr(trainer.data_iterator, "close", None)], error)   # grain workers


def _close_all(closers, error: BaseException | None) -> None:
  """Runs every closer (None: skipped). The first failure is raised once all ran, unless ``error``
  is already propagating: then failures are logged, so that the run stops with that error's one
  line (a bucket that became unreachable fails the save, then the metrics flush)."""
  first = None
  for close in closers:
    try:
      if close is not None:
        close()
    except Exception as e:  # pylint: disable=broad-except
      if error is None and first is None:
        first = e
      else:
        logging.warning("while stopping: %s", ckpt_lib.one_line(e))
  if first is not None:
    raise first


def _run(trainer: Trainer, checkpointer, writer, hooks: Sequence[StepHook] = (),
         stop: StopSignals | None = None) -> state_lib.TrainState:
  config, mesh, objective, data = trainer.config, trainer.mesh, trainer.objective, trainer.data
  step_fn, eval_fn = trainer.assembly.train_step, trainer.assembly.eval_step
  total, step = config.total_steps, trainer.start_step
  if step >= total:
    logging.info("run already complete at step %d (total_steps=%d)", step, total)
    return trainer.state

  with mesh_lib.use_mesh(mesh):
    skipped = [0]   # bad records skipped by the input (data.on_error='skip') since the last log

    def next_batch():
      local = next(trainer.data_iterator)
      skipped[0] += pipeline.pop_skipped(local)
      return mesh_lib.to_global_batch(local, mesh)
    batch = next_batch()   # first: a bad train file is reported before the eval split is opened
    evaluating = config.eval_every > 0   # 0: no in-training evaluation (no eval split, nothing compiled)
    eval_batches = pipeline.make_eval_batches(
        data, data.eval_split, data.eval_batch_size, data.eval_examples,
        jax.process_index(), jax.process_count(),
        skip_log=pipeline.skip_log_path(trainer.workdir, jax.process_index())) if evaluating else None
    t0 = time.perf_counter()
    lowered = step_fn.lower(trainer.state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = telemetry.step_flops(lowered)
    peak = telemetry.peak_tflops_per_device(config.peak_tflops_per_device)
    n_dev = jax.device_count()
    logging.info("compiled train step in %.1fs: %.3g GFLOP/step on %d devices, mesh %s",
                 compile_s, flops / 1e9, n_dev, dict(mesh.shape))
    writer.write(step, {"compile_time_s": compile_s})
    distributed.barrier("medfm_jax_train_step_compiled")   # first collectives start together
    if step == 0 and evaluating:   # the untrained baseline every later eval is compared with
      _eval_and_log(trainer, eval_fn, eval_batches, step, writer)
    progress = telemetry.Progress(step, total)
    window = []
    while step < total:
      trainer.state, metrics = compiled(trainer.state, batch, step_fn.schedule)
      window.append(metrics)
      step += 1
      for hook in hooks:
        hook(step, trainer.state)
      if step % config.log_every == 0 or step == total:
        _check_finite(trainer.state)
        scalars = {k: float(np.mean(v)) for k, v in jax.device_get(
            jax.tree.map(lambda *xs: np.stack(xs), *window)).items()}
        window = []
        timing = progress.report(step)
        dt = timing["step_time_s"]
        tflops = flops / dt / n_dev / 1e12
        scalars.update(timing, images_per_s=config.batch_size / dt,
                       images_per_s_per_device=config.batch_size / dt / n_dev,
                       tflops_per_device=tflops, mfu=tflops / peak)
        if data.on_error == "skip":
          scalars["data/skipped"], skipped[0] = skipped[0], 0
        writer.write(step, scalars)
        for message in objective.warnings(scalars):
          logging.warning("step %d: %s", step, message)
        logging.info("step %d/%d  loss %.4f  lr %.3g  |g| %.3g  %.3fs/step  %.1f img/s  MFU %.1f%%  ETA %s",
                     step, total, scalars["loss"], scalars["lr"], scalars["grad_norm"], dt,
                     scalars["images_per_s"], 100 * scalars["mfu"], telemetry.format_eta(timing["eta_s"]))
      t0 = time.perf_counter()
      if evaluating and (step % config.eval_every == 0 or step == total):
        _eval_and_log(trainer, eval_fn, eval_batches, step, writer)
      saved = step % config.checkpoint_every == 0 or step == total
      if saved:
        _check_finite(trainer.state)
        checkpointer.save(step, trainer.state, trainer.data_iterator,
                          {"step": step, "config": config.to_json_best_effort()})
      if stop is not None and stop.due(step, config.stop_check_every, saved) and stop.requested():
        _check_finite(trainer.state)
        if not saved:
          checkpointer.save(step, trainer.state, trainer.data_iterator,
                            {"step": step, "config": config.to_json_best_effort()})
        checkpointer.wait()
        raise Preempted(stop.name, step, str(checkpointer.directory / str(step)))
      progress.exclude(time.perf_counter() - t0)
      if step < total:   # after the save, so the saved iterator state starts at this batch
        batch = next_batch()
  checkpointer.wait()
  return trainer.state
