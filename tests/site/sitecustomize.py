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
