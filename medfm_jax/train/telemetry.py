"""Metric writers (JSONL + TensorBoard), progress/ETA, throughput and MFU accounting."""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from typing import Callable

import jax
from absl import logging
from etils import epath

from medfm_jax import storage
from medfm_jax.models import vit

# Dense bf16 peak TFLOP/s per device (vendor figures); CPU: per-core estimate x cores.
PEAK_TFLOPS = {
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0, "h200": 989.0, "h100": 989.0, "a100": 312.0,
    "l4": 121.0, "a10g": 70.0,
}
_CPU_TFLOPS_PER_CORE = 0.1   # ~2.5-3 GHz x 32 fp32 FLOP/cycle (AVX2 FMA) — an estimate


def peak_tflops_per_device(override: float = 0.0) -> float:
  """Peak TFLOP/s of one local device: the override if set, else the device table."""
  if override and override > 0:
    return float(override)
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    cores = os.cpu_count() or 1
    return _CPU_TFLOPS_PER_CORE * cores / max(1, jax.local_device_count())
  kind = device.device_kind.lower()
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops
  logging.warning("unknown device kind %r: MFU not reported (set peak_tflops_per_device)", kind)
  return float("nan")


def flop_counting_config(config, model_flops: bool = False):
  """A copy of ``config`` whose train step XLA's cost analysis counts whole, or ``None`` when
  ``config``'s own step already is. The analysis counts a loop body once, so the layer scan
  (``model.scan``), gradient accumulation (``grad_accum_steps``) and query-chunked attention
  (``model.attention_chunk``) are unrolled: same math, same FLOPs. It does not see into a Pallas
  kernel at all, so the TPU flash attention (``attention_impl`` 'pallas', or 'auto' when compiling
  for TPU) is counted as XLA's attention. ``model_flops`` also drops remat recomputation and lowers
  every attention as XLA dots (for MFU)."""
  model = config.model
  impl = model.get("attention_impl", "auto")    # vit_from_config's default (SAM's config has none)
  opaque = vit.resolve_attention_impl(impl, vit.COMPUTE_DTYPES[config.dtype]) == "pallas"
  loops = (model.get("scan", False) or config.get("grad_accum_steps", 1) > 1
           or model.get("attention_chunk", 0) > 0)
  extra = model_flops and (model.get("remat", "none") != "none"
                           or model.get("attention_impl") not in (None, "xla"))
  if not (loops or extra or opaque):
    return None
  out = config.copy_and_resolve_references()
  for key, value in (("scan", False), ("attention_chunk", 0)):
    if key in out.model:
      out.model[key] = value
  if "grad_accum_steps" in out:
    out.grad_accum_steps = 1
  if model_flops:
    if "remat" in out.model:
      out.model.remat = "none"
    if out.model.get("attention_impl") is not None:
      out.model.attention_impl = "xla"
  if opaque:
    with out.unlocked():             # SAM's config has no field: its ViT reads the default
      out.model.attention_impl = "xla"
  return out


def step_flops(lowered) -> float:
  """Total FLOPs of one call of a lowered (not yet compiled) XLA program, all devices together.

  The unoptimised program is analysed because it still holds every matmul as a dot: after GPU
  compilation the matmuls are cuBLAS/cuDNN custom calls that XLA's cost analysis does not count
  (MAE ViT-B/16 on an H200: 3.1 GFLOP per image from the compiled program, against about 58 from
  the model). ``jax.checkpoint`` recomputation is part of the lowered program, so with remat these
  are hardware FLOPs; lower the same step without remat for model FLOPs (MFU).
  """
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:   # PJRT plugin backends (CUDA): the same HLO, analysed by the CPU client
    cost = _cost_analysis_on_cpu(lowered)
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _cost_analysis_on_cpu(lowered) -> dict | None:
  """XLA's cost analysis of a lowered program's HLO by the CPU client: ``Lowered.cost_analysis``
  raises NotImplementedError on plugin backends such as JAX's CUDA plugin (JAX 0.10-0.11). Uses
  JAX internals, so any failure gives None (FLOPs not reported)."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top  (private; see docstring)
    cpu = jax.local_devices(backend="cpu")[0].client
    return _jax.hlo_module_cost_analysis(cpu, lowered._lowering.hlo().as_hlo_module())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return None


def append_jsonl(path: str | None, record: dict) -> None:
  """Appends ``record`` as one JSON line to ``path`` (no-op when ``path`` is empty/None)."""
  if path:
    storage.append_text(path, json.dumps(record) + "\n")


class _EventFile:
  """One TensorBoard event file at a URL, through epath: buffered, and the whole object rewritten
  on each flush (object stores have no append; tensorboardX's own gs:// writer does the same)."""

  def __init__(self, path: str):
    self._path, self._buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    if self._buffer is not None:
      self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()
    self._buffer = None

  def discard(self) -> None:
    """Later flushes do nothing (tensorboardX's exit hook flushes again a file whose close failed,
    and against an unreachable bucket would retry for half a minute)."""
    self._buffer = None


class _EventFiles:
  """tensorboardX writer factory for URL log dirs (all of ``storage.SCHEMES``, through epath)."""

  def __init__(self):
    self.files: list[_EventFile] = []

  def open(self, path: str) -> _EventFile:
    self.files.append(_EventFile(path))
    return self.files[-1]

  def directory_check(self, path: str) -> None:
    storage.path(path).mkdir(parents=True, exist_ok=True)


def _import_tensorboardx():
  """``(SummaryWriter, record_writer)``. tensorboardX's writer module imports torch, when it is
  installed, only to recognise torch tensors (about 3 s of CPU in every training process; this
  writer passes floats): unless something has imported torch already, the import runs with torch
  hidden, as if it were not installed, and torch stays importable afterwards."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None   # `import torch` raises ImportError, tensorboardX's fallback
  try:
    from tensorboardX import SummaryWriter, record_writer  # heavy (protobuf); only process 0 writes TensorBoard; pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter, record_writer


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard event files (process 0 only); ``workdir``
  is a local path or a URL."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    SummaryWriter, record_writer = _import_tensorboardx()  # pylint: disable=invalid-name
    root = storage.path(workdir)
    self._jsonl = storage.AppendFile(root / "metrics.jsonl")
    self._event_files = _EventFiles()
    if storage.is_url(root):
      for scheme in storage.SCHEMES:
        record_writer.register_writer_factory(scheme, self._event_files)
    self._tb = SummaryWriter(os.fspath(root / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      try:
        self._jsonl.close()
        self._tb.close()
      finally:   # written, or failed once: not again at exit
        for f in self._event_files.files:
          f.discard()


class Progress:
  """Step timing since the last report (evals and checkpoint saves excluded), and an ETA.

  ``clock`` returns seconds (``time.perf_counter``; tests pass a fake one)."""

  def __init__(self, start_step: int, total_steps: int, clock: Callable[[], float] = time.perf_counter):
    self.total = total_steps
    self.clock = clock
    self.last_step, self.last_time = start_step, clock()
    self.excluded = 0.0

  def exclude(self, seconds: float) -> None:
    """Time spent outside train steps (evaluation, checkpointing) since the last report."""
    self.excluded += seconds

  def report(self, step: int) -> dict[str, float]:
    now = self.clock()
    step_time = (now - self.last_time - self.excluded) / max(1, step - self.last_step)
    self.last_step, self.last_time, self.excluded = step, now, 0.0
    return {"step_time_s": step_time, "eta_s": step_time * max(0, self.total - step)}


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
