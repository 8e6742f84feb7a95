"""Lets torchvision import in the test environment; tests/conftest.py puts this folder on
``PYTHONPATH``, so it runs at the start of the test processes and of every process they start.

open_clip and timm (parity references) bring torchvision, whose PyPI wheels are CUDA builds: their
compiled ops do not load against the CPU torch build the ``parity`` extra pins, and torchvision
then fails at import, registering fake kernels for its missing ``torchvision::nms`` and ``qnms``.
transformers imports torchvision when it is installed, so ``transformers.ViTMAEForPreTraining``
failed too. On the first ``import torchvision`` (not before: torch is not imported otherwise), this
tries to load the compiled ops and, where they do not load, declares those two ops' schemas. The
model code the tests use needs none of torchvision's ops.

With ``MEDFM_TEST_COMPILE_LOG=FILE`` it also logs every XLA compile (:func:`_wrap_compiler`).
"""
import glob
import importlib.abc
import importlib.util
import os
import sys

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _OnFirstImport(importlib.abc.MetaPathFinder):
  """Acts once, at the first import of the module ``name``: ``before(spec)`` runs before the
  module's code, ``after(module)`` after it. The module itself is found and loaded as usual."""

  def __init__(self, name, before=None, after=None):
    self.name, self.before, self.after = name, before, after

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != self.name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return None
    loader_exec = spec.loader.exec_module

    def exec_module(module):
      if self.before:
        self.before(spec)
      loader_exec(module)
      if self.after:
        self.after(module)
    spec.loader.exec_module = exec_module
    return spec


def _declare_missing_torchvision_ops(spec):
  if not spec.origin:
    return
  import torch  # pylint: disable=g-import-not-at-top  (only once torchvision is imported)
  try:
    torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))[0])
  except Exception:  # pylint: disable=broad-except  (a build for another torch: its ops are missing)
    for op in ("nms", "qnms"):
      try:
        torch.library.define(f"torchvision::{op}", _NMS_SCHEMA)
      except RuntimeError:   # already declared
        pass


sys.meta_path.insert(0, _OnFirstImport("torchvision", before=_declare_missing_torchvision_ops))


def _wrap_compiler(compiler):
  """With ``MEDFM_TEST_COMPILE_LOG=FILE``: appends one JSON line per XLA compile request of this
  process: the test that caused it (``PYTEST_CURRENT_TEST``, inherited by the CLI subprocesses),
  the module name, persistent-cache hit or miss, and the CPU and wall seconds spent (compiling, or
  reading the cache). It ranks the programs the suite compiles and shows which ones miss the
  shared cache; it changes nothing else."""
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  path, outcome = os.environ["MEDFM_TEST_COMPILE_LOG"], {}
  hit, miss, compile_or_get_cached = (compiler.log_persistent_cache_hit,
                                      compiler.log_persistent_cache_miss, compiler.compile_or_get_cached)

  def log_hit(module_name, cache_key):
    outcome["cache"] = "hit"
    return hit(module_name, cache_key)

  def log_miss(module_name, cache_key):
    outcome["cache"] = "miss"
    return miss(module_name, cache_key)

  def logged(backend, computation, *args, **kwargs):
    outcome.clear()
    t0, w0 = time.process_time(), time.monotonic()
    result = compile_or_get_cached(backend, computation, *args, **kwargs)
    record = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0], "pid": os.getpid(),
              "module": str(computation.operation.attributes["sym_name"]).strip('"'),
              "cache": outcome.get("cache", "off"), "cpu_s": round(time.process_time() - t0, 3),
              "wall_s": round(time.monotonic() - w0, 3)}
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
    return result
  compiler.log_persistent_cache_hit, compiler.log_persistent_cache_miss = log_hit, log_miss
  compiler.compile_or_get_cached = logged


if os.environ.get("MEDFM_TEST_COMPILE_LOG"):
  sys.meta_path.insert(0, _OnFirstImport("jax._src.compiler", after=_wrap_compiler))
