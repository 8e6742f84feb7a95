"""Reads PyTorch / Hugging Face checkpoints into ``{name: np.ndarray}`` without executing pickles.

Floating-point tensors come back as float32 (bfloat16 / float16 are upcast); other dtypes are kept.
``*.safetensors`` files are read with ``safetensors`` (no torch needed); ``*.bin`` / ``*.pt`` /
``*.pth`` files need torch and are opened with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_DIR_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
_ALLOWED = ("a *.safetensors file, a torch state-dict file (*.bin, *.pt, *.pth), or a directory "
            "holding one of " + ", ".join(_DIR_FILES))


def _as_float32(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data_start = 8 + header_len
  header.pop("__metadata__", None)
  out = {}
  with safe_open(path, framework="np") as f:
    for name, info in header.items():
      if info["dtype"] == "BF16":  # numpy has no bfloat16: widen the raw bits to float32
        begin, end = info["data_offsets"]
        raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin)
        out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
      else:
        out[name] = _as_float32(f.get_tensor(name))
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=import-outside-toplevel
  obj = torch.load(path, weights_only=True, map_location="cpu")
  for wrapper in ("model", "state_dict", "module"):  # common training-checkpoint wrappers
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  out = {}
  for name, t in obj.items():
    if not isinstance(t, torch.Tensor):
      continue  # e.g. an epoch counter stored next to the weights
    t = t.detach().cpu()
    out[name] = t.float().numpy() if t.is_floating_point() else t.numpy()
  return out


def _read_index(path: str) -> dict[str, np.ndarray]:
  with open(path) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for shard in shards:
    out.update(load_torch_state_dict(os.path.join(os.path.dirname(path), shard)))
  return out


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a checkpoint file or Hugging Face model directory into ``{name: np.ndarray}``."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in _DIR_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return load_torch_state_dict(os.path.join(path, name))
    raise ValueError(f"checkpoint directory {path!r} holds none of {', '.join(_DIR_FILES)}")
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint {path!r} does not exist; expected {_ALLOWED}")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(".index.json"):
    return _read_index(path)
  if path.endswith(_TORCH_SUFFIXES):
    return _read_torch(path)
  raise ValueError(f"checkpoint {path!r} has an unknown file type; expected {_ALLOWED}")
