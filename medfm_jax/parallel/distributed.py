"""Multi-process initialisation (TPU pods, SLURM, explicit coordinator) before any JAX use."""
from __future__ import annotations

import os

import jax
from absl import logging


def initialize() -> None:
  """Calls ``jax.distributed.initialize`` when the environment describes a multi-process job.

  Explicit: ``MEDFM_COORDINATOR=host:port MEDFM_NUM_PROCESSES=N MEDFM_PROCESS_ID=i``; otherwise
  SLURM (``SLURM_NTASKS`` > 1) and Cloud TPU pods are auto-detected by JAX. Single process: no-op.
  """
  coordinator = os.environ.get("MEDFM_COORDINATOR")
  if coordinator and os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU multi-process
  if coordinator:
    jax.distributed.initialize(coordinator, int(os.environ["MEDFM_NUM_PROCESSES"]),
                               int(os.environ["MEDFM_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
