"""Multi-process initialisation (explicit, TPU pods, SLURM, Open MPI, Kubernetes) before any JAX use.

Selection, first match wins (:func:`choose`):
1. explicit: ``--coordinator_address/--num_processes/--process_id`` flags, else the
   ``MEDFM_COORDINATOR/MEDFM_NUM_PROCESSES/MEDFM_PROCESS_ID`` environment variables;
2. auto, via ``jax.distributed.initialize()`` (JAX's own cluster detection): a Cloud TPU VM or
   GKE TPU pod, a SLURM step with more than one task, an ``mpirun`` job with more than one
   rank, a pod of a Kubernetes indexed Job (needs the ``kubernetes`` package);
3. single process otherwise (no initialisation).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
from absl import logging


class DistributedError(ValueError):
  """The multi-process settings are incomplete or inconsistent; the message names them."""


@dataclasses.dataclass(frozen=True)
class Choice:
  mode: str                                   # 'explicit' | 'tpu' | 'slurm' | 'openmpi' | 'kubernetes' | 'single'
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)   # for jax.distributed.initialize


def _int(value, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{name}={value!r}: must be an integer") from None


def _explicit(coordinator, num_processes, process_id, source: str) -> Choice:
  names = {"flags": ("--coordinator_address", "--num_processes", "--process_id"),
           "env": ("MEDFM_COORDINATOR", "MEDFM_NUM_PROCESSES", "MEDFM_PROCESS_ID")}[source]
  given = dict(zip(names, (coordinator, num_processes, process_id)))
  missing = [k for k, v in given.items() if v is None or v == ""]
  if missing:
    raise DistributedError(f"{', '.join(missing)}: required together with "
                           f"{', '.join(k for k in names if k not in missing)}")
  if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", str(coordinator)):
    raise DistributedError(f"{names[0]}={coordinator!r}: expected host:port")
  n, i = _int(num_processes, names[1]), _int(process_id, names[2])
  if n < 1:
    raise DistributedError(f"{names[1]}={n}: must be >= 1")
  if not 0 <= i < n:
    raise DistributedError(f"{names[2]}={i}: must be in [0, {n}) for {names[1]}={n}")
  return Choice("explicit", dict(coordinator_address=str(coordinator), num_processes=n, process_id=i))


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
  """SLURM tasks on this node, from ``SLURM_STEP_TASKS_PER_NODE`` like ``"1(x4)"`` or ``"8,8"``."""
  raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
  m = re.match(r"(\d+)", raw or "")
  return int(m.group(1)) if m else None


def _local_gpus(env: Mapping[str, str]) -> int | None:
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible:
    return len([d for d in visible.split(",") if d.strip()])
  gpus = env.get("SLURM_GPUS_ON_NODE", "")
  return int(gpus) if gpus.isdigit() else None


def _all_local_devices(env: Mapping[str, str]) -> dict[str, Any]:
  """One process per node: JAX would give it only GPU ``local rank`` — hand it all of them."""
  n = _local_gpus(env)
  return {"local_device_ids": list(range(n))} if n else {}


def choose(env: Mapping[str, str], coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None,
           on_tpu_vm: bool = False) -> Choice:
  """Decides how (and whether) to call ``jax.distributed.initialize``; pure, for tests."""
  if any(v is not None for v in (coordinator_address, num_processes, process_id)):
    return _explicit(coordinator_address, num_processes, process_id, "flags")
  if any(env.get(k) for k in ("MEDFM_COORDINATOR", "MEDFM_NUM_PROCESSES", "MEDFM_PROCESS_ID")):
    return _explicit(env.get("MEDFM_COORDINATOR"), env.get("MEDFM_NUM_PROCESSES"),
                     env.get("MEDFM_PROCESS_ID"), "env")
  if on_tpu_vm or env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Choice("tpu")
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
    return Choice("slurm", _all_local_devices(env) if _tasks_per_node(env) == 1 else {})
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "1"),
                                             "OMPI_COMM_WORLD_SIZE") > 1:
    per_node = _int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "0"), "OMPI_COMM_WORLD_LOCAL_SIZE")
    return Choice("openmpi", _all_local_devices(env) if per_node == 1 else {})
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:   # indexed Job / JobSet
    return Choice("kubernetes")
  return Choice("single")


def _on_tpu_vm() -> bool:
  """True on a Cloud TPU VM (TPU chips on the PCI bus), without starting any backend."""
  try:
    from jax._src import hardware_utils  # private API that may be absent: guarded; pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except  (private API; absent -> not a TPU VM)
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None) -> Choice:
  """Initialises ``jax.distributed`` as :func:`choose` decides; logs process and device counts."""
  env = os.environ if env is None else env
  choice = choose(env, coordinator_address, num_processes, process_id, _on_tpu_vm())
  if choice.mode == "kubernetes":
    try:
      import kubernetes  # noqa: F401  optional: only Kubernetes Jobs need it; pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise DistributedError("Kubernetes indexed Job detected (JOB_COMPLETION_INDEX) but the "
                             "'kubernetes' package is missing: pip install 'jax[k8s]', or pass "
                             "--coordinator_address/--num_processes/--process_id") from None
  if choice.mode != "single":
    if env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU multi-process
    jax.distributed.initialize(**choice.kwargs)
  logging.info("process %d of %d, %d local / %d global devices (%s; %s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind, choice.mode)
  return choice


def barrier(name: str, timeout_s: float = 900.0) -> None:
  """Waits until every process reaches ``name`` (no-op with one process), through the
  coordination service rather than a device collective: processes whose compiles finish minutes
  apart (loaded hosts) then start their first collective together, within gloo's fixed 30 s
  context set-up deadline."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the coordination client; pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None or not hasattr(client, "wait_at_barrier"):
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))
