"""Lets torchvision import in the test environment; tests/conftest.py puts this folder on
``PYTHONPATH``, so it runs at the start of the test processes and of every process they start.

open_clip and timm (parity references) bring torchvision, whose PyPI wheels are CUDA builds: their
compiled ops do not load against the CPU torch build the ``parity`` extra pins, and torchvision
then fails at import, registering fake kernels for its missing ``torchvision::nms`` and ``qnms``.
transformers imports torchvision when it is installed, so ``transformers.ViTMAEForPreTraining``
failed too. On the first ``import torchvision`` (not before: torch is not imported otherwise), this
tries to load the compiled ops and, where they do not load, declares those two ops' schemas. The
model code the tests use needs none of torchvision's ops.
"""
import glob
import importlib.abc
import importlib.util
import os
import sys

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _DeclareMissingTorchvisionOps(importlib.abc.MetaPathFinder):
  """A meta-path finder that acts once, when torchvision is first imported, and finds nothing."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != "torchvision":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
      return None
    import torch  # pylint: disable=g-import-not-at-top  (only once torchvision is imported)
    try:
      torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))[0])
    except Exception:  # pylint: disable=broad-except  (a build for another torch: its ops are missing)
      for op in ("nms", "qnms"):
        try:
          torch.library.define(f"torchvision::{op}", _NMS_SCHEMA)
        except RuntimeError:   # already declared
          pass
    return None   # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareMissingTorchvisionOps())


class _LogCompiles(importlib.abc.MetaPathFinder):
  """With ``MEDFM_TEST_COMPILE_LOG=FILE``: once ``jax._src.compiler`` is imported, appends one JSON
  line per XLA compile request of this process: the test that caused it (``PYTEST_CURRENT_TEST``,
  inherited by the CLI subprocesses), the module name, persistent-cache hit or miss, and the CPU and
  wall seconds spent (compiling, or reading the cache). It ranks the programs the suite compiles
  and shows which ones miss the shared cache; it finds nothing and changes nothing else."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != "jax._src.compiler":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    loader_exec = spec.loader.exec_module

    def exec_module(module):
      loader_exec(module)
      _wrap_compiler(module)
    spec.loader.exec_module = exec_module
    return spec


def _wrap_compiler(compiler):
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
  sys.meta_path.insert(0, _LogCompiles())
