"""PyTorch / Hugging Face checkpoint I/O and the name/layout mapping shared by the HF importers.

Reading: checkpoints become ``{name: np.ndarray}`` without executing pickles. Floating-point tensors
come back as float32 (bfloat16 / float16 are upcast); other dtypes are kept. ``*.safetensors`` files
are parsed here (no torch needed); ``*.bin`` / ``*.pt`` / ``*.pth`` files need torch and are opened
with ``torch.load(weights_only=True)``. Every path (sources, configs, export folders) goes through
``etils.epath`` (:func:`epath_of`): a local path or a URL such as ``gs://bucket/model``.

Mapping: an importer is a list of :class:`Entry` (HF tensor names <-> our param paths, with the
layout conversion each way); :func:`convert_with_mapping` / :func:`export_with_mapping` apply it
with one error listing every unused, missing and mis-shaped tensor. Layouts: torch Linear
``(out, in)`` -> Flax kernel ``(in, out)``; q/k/v -> ``[embed, heads, head_dim]``; attention output
-> ``[heads, head_dim, embed]``; patch conv ``(D, C, p, p)`` -> PatchEmbed kernel ``[p*p*C, D]`` in
``(p, q, c)`` order (:func:`medfm_jax.models.vit.patchify`).
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from medfm_jax import storage
from medfm_jax.models import vit

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_DIR_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
_ALLOWED = ("a *.safetensors file, a torch state-dict file (*.bin, *.pt, *.pth), or a directory "
            "holding one of " + ", ".join(_DIR_FILES))


def _as_float32(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


# safetensors dtype -> numpy dtype (BF16: raw bits, widened to float32 below)
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors(path) -> dict[str, np.ndarray]:
  """A ``*.safetensors`` file (local: memory-mapped; a URL: read whole) -> ``{name: array}``."""
  local = not storage.is_url(path)
  buf = np.memmap(os.fspath(path), dtype=np.uint8, mode="r") if local else np.frombuffer(path.read_bytes(), np.uint8)
  (header_len,) = struct.unpack("<Q", buf[:8].tobytes())
  header = json.loads(buf[8:8 + header_len].tobytes())
  header.pop("__metadata__", None)
  data, out = buf[8 + header_len:], {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported {sorted(_SAFETENSORS_DTYPES)}")
    begin, end = info["data_offsets"]
    x = np.frombuffer(data[begin:end].tobytes(), _SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    if info["dtype"] == "BF16":  # numpy has no bfloat16: widen the raw bits to float32
      x = (x.astype(np.uint32) << 16).view(np.float32)
    out[name] = _as_float32(x)
  return out


def _read_torch(path) -> dict[str, np.ndarray]:
  import torch  # optional: the 'parity' extra; pylint: disable=import-outside-toplevel
  source = os.fspath(path) if not storage.is_url(path) else io.BytesIO(path.read_bytes())
  obj = torch.load(source, weights_only=True, map_location="cpu")
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


def _read_index(path) -> dict[str, np.ndarray]:
  shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
  out = {}
  for shard in shards:
    out.update(load_torch_state_dict(path.parent / shard))
  return out


def is_path(source) -> bool:
  """True for a local path or URL (str, ``os.PathLike``, ``epath.Path``): what :func:`epath_of` takes."""
  return isinstance(source, (str, os.PathLike))


def epath_of(source) -> epath.Path:
  """A local path or a URL (``gs://...``) as an ``epath.Path`` (:func:`medfm_jax.storage.path`):
  every file an importer reads goes through it, never through a local ``open``."""
  return storage.path(source)


def beside(source, name: str) -> epath.Path:
  """``source/name`` for a directory, else ``name`` in the folder of the file ``source``."""
  p = epath_of(source)
  return p / name if p.is_dir() else p.parent / name


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a checkpoint file or Hugging Face model directory (local or a URL) into
  ``{name: np.ndarray}``."""
  path = epath_of(path)
  if path.is_dir():
    for name in _DIR_FILES:
      if (path / name).is_file():
        return load_torch_state_dict(path / name)
    raise ValueError(f"checkpoint directory {os.fspath(path)!r} holds none of {', '.join(_DIR_FILES)}")
  if not path.is_file():
    raise ValueError(f"checkpoint {os.fspath(path)!r} does not exist; expected {_ALLOWED}")
  if path.name.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.name.endswith(".index.json"):
    return _read_index(path)
  if path.name.endswith(_TORCH_SUFFIXES):
    return _read_torch(path)
  raise ValueError(f"checkpoint {os.fspath(path)!r} has an unknown file type; expected {_ALLOWED}")


def as_numpy_state_dict(source) -> dict[str, np.ndarray]:
  """A torch module (``.state_dict()``), a ``{name: tensor | array}`` dict, or a checkpoint path /
  HF directory (:func:`load_torch_state_dict`) -> ``{name: np.ndarray}`` (floats as float32)."""
  if is_path(source):
    return load_torch_state_dict(source)
  if hasattr(source, "state_dict") and callable(source.state_dict):
    source = source.state_dict()
  if not isinstance(source, dict):
    raise ValueError(f"expected a torch module, a state dict or a checkpoint path, got {type(source).__name__}")
  out = {}
  for name, t in source.items():
    if hasattr(t, "detach"):  # torch tensor (bfloat16 has no numpy dtype: upcast first)
      t = t.detach().cpu()
      t = t.float() if t.is_floating_point() else t
      t = t.numpy()
    out[name] = _as_float32(np.asarray(t))
  return out


def resolve_source(source, hf_config, what: str) -> tuple[dict[str, np.ndarray], Any]:
  """``load(source, hf_config)``'s inputs -> ``(numpy state dict, HF config)``.

  ``source``: an HF model directory (its ``config.json``), a weights file (``config.json`` next to
  it), a torch module (its ``.config``) or a state dict; ``hf_config`` (object, dict or
  ``config.json`` path) overrides the config found with the source and is needed for a bare state
  dict or a file with no ``config.json`` beside it.
  """
  if hf_config is None:
    if is_path(source):
      config = beside(source, "config.json")
      hf_config = config if config.is_file() else None
    else:
      hf_config = getattr(source, "config", None)
    if hf_config is None:
      raise ValueError(f"{what}: no config.json with {os.fspath(source) if is_path(source) else type(source).__name__!r}; "
                       "pass hf_config= (a config object, dict or config.json path)")
  return as_numpy_state_dict(source), hf_config


def write_hf(out_dir: str | os.PathLike, state_dict: dict[str, np.ndarray], hf_config: dict[str, Any],
             config_name: str = "config.json", weights_name: str = "model.safetensors") -> str:
  """Writes ``config.json`` and ``model.safetensors`` (what ``from_pretrained`` reads; other names
  for other libraries) into ``out_dir`` (created; local or a URL); returns it. No torch needed."""
  from safetensors.numpy import save  # optional: the 'parity' extra; pylint: disable=import-outside-toplevel
  out = epath_of(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / config_name).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  (out / weights_name).write_bytes(save({k: np.array(v, order="C") for k, v in state_dict.items()},
                                        metadata={"format": "pt"}))
  return os.fspath(out_dir)


def check_exportable(fields: dict[str, Any], allowed: dict[str, tuple], what: str) -> None:
  """One ValueError line naming every ``fields[k]`` not in ``allowed[k]`` (options the target
  format cannot express, e.g. the conv stem or ``cls_pool`` other than ``token``)."""
  bad = [f"{k}={fields[k]!r} (allowed {', '.join(map(repr, allowed[k]))})" for k in allowed
         if k in fields and fields[k] not in allowed[k]]
  if bad:
    raise ValueError(f"cannot export to {what}: " + "; ".join(bad))


# The ViT fields of a run config (``config.model``) and their defaults (models.vit.vit_from_config).
_VIT_RUN_FIELDS = dict(pos_embed="sincos2d", layer_norm_eps=1e-6, layer_scale_init=0.0, num_registers=0,
                       activation="gelu", swiglu=False, mask_token=False, ln_pre=False, class_token=True,
                       patch_embed="patch", cls_pool="token", num_prompts=0, adapter_dim=0)
# What no exported format expresses: the conv stem, a pooled cls slot, prompts, adapters.
_VIT_EXPORTABLE = dict(patch_embed=("patch",), cls_pool=("token",), num_prompts=(0,), adapter_dim=(0,))


def vit_run_fields(**fields) -> dict[str, Any]:
  """``{"model.<field>": value}`` for a run config: a plain ViT (patch embedding, cls token output,
  no LayerScale, registers, SwiGLU or pre-LN) with ``fields`` on top."""
  plain = dict(patch_embed="patch", cls_pool="token", ln_pre=False, class_token=True, layer_scale_init=0.0,
               num_registers=0, swiglu=False)
  return {f"model.{k}": v for k, v in (plain | fields).items()}


def run_vit(config, what: str, **allowed: tuple) -> dict[str, Any]:
  """The image encoder of a run config (``config.model`` at ``config.data``'s image shape) as a
  dict of sizes and options; one ValueError line when a field is outside ``allowed`` (``field=(values,)``)
  or is an option no export format has (conv stem, ``cls_pool`` other than 'token', prompts, adapters)."""
  m = config.model
  fields = {k: m.get(k, d) for k, d in _VIT_RUN_FIELDS.items()}
  check_exportable({f"model.{k}": v for k, v in fields.items()},
                   {f"model.{k}": v for k, v in (_VIT_EXPORTABLE | allowed).items()}, what)
  size = vit.size_from_config(m)
  return fields | dict(width=size.width, depth=size.depth, num_heads=size.num_heads, mlp_dim=size.mlp_dim,
                       patch_size=size.patch_size, image_size=int(config.data.image_size),
                       channels=int(config.data.channels), layer_norm_eps=float(fields["layer_norm_eps"]))


def as_family_cfg(config, marker: str, from_run: Callable, from_hf: Callable) -> dict[str, Any]:
  """An importer's own config dict (it holds ``marker``) as is; a run config (``config.model`` and
  ``config.objective``) via ``from_run``; anything else (HF config object, dict, path) via ``from_hf``."""
  if isinstance(config, dict) and marker in config:
    return config
  if hasattr(config, "model") and hasattr(config, "objective"):
    return from_run(config)
  return from_hf(config)


def invert(table: dict[str, str]) -> dict[str, str]:
  """``{hf: ours}`` -> ``{ours: hf}`` keeping the first HF name of each of ours."""
  out = {}
  for hf, ours in table.items():
    out.setdefault(ours, hf)
  return out


def read_hf_config(hf_config, what: str) -> dict[str, Any]:
  """An HF config object, its dict, or a ``config.json`` path / model directory -> a plain dict."""
  if is_path(hf_config):
    path = epath_of(hf_config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
      raise ValueError(f"{what} config {os.fspath(path)!r} does not exist; expected a config.json or its directory")
    return json.loads(path.read_text())
  if isinstance(hf_config, dict):
    return dict(hf_config)
  return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))


def square(value, name: str, what: str) -> int:
  """``224`` or ``[224, 224]`` -> 224; non-square sizes are rejected."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{what} {name}={value!r}: only square sizes are supported")
    value = value[0]
  return int(value)


def variant_name(width: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int) -> str:
  """The ``"NAME/PATCH"`` ViT variant with exactly these sizes, else the closest-width name (callers
  then pass the exact sizes as ``VisionTransformer`` overrides)."""
  for name, entry in vit.VARIANTS.items():
    if tuple(entry) == (width, depth, num_heads, mlp_dim):
      return f"{name}/{patch_size}"
  return f"{min(vit.VARIANTS, key=lambda n: abs(vit.VARIANTS[n][0] - width))}/{patch_size}"


# ---------------------------------------------------------------------------------------------
# layout conversions (each pair: HF -> ours, ours -> HF)

def ident(x):
  return x


def transpose(x):
  return np.ascontiguousarray(x.T)


def qkv_kernel(w, heads):
  return w.T.reshape(w.shape[1], heads, -1)


def qkv_kernel_to_torch(k, heads):  # pylint: disable=unused-argument
  return transpose(k.reshape(k.shape[0], -1))


def out_kernel(w, heads):
  return w.T.reshape(heads, -1, w.shape[0])


def out_kernel_to_torch(k, heads):  # pylint: disable=unused-argument
  return transpose(k.reshape(-1, k.shape[-1]))


def patch_kernel(w):
  d, c, p, q = w.shape
  return w.transpose(2, 3, 1, 0).reshape(p * q * c, d)


def patch_kernel_to_torch(k, patch, channels):
  return np.ascontiguousarray(k.reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1))


class Entry(NamedTuple):
  """HF tensors ``hf`` <-> our param paths ``ours``; ``to_ours(*hf arrays)`` returns one array per
  path, ``to_hf(*our arrays)`` one per HF name."""
  hf: tuple[str, ...]
  ours: tuple[tuple[str, ...], ...]
  to_ours: Callable
  to_hf: Callable


def entry(hf: str, ours: tuple[str, ...], to_ours: Callable = ident, to_hf: Callable = ident) -> Entry:
  """A one-tensor-to-one-param :class:`Entry`."""
  return Entry((hf,), (ours,), lambda x: (to_ours(x),), lambda x: (to_hf(x),))


def dense_entries(hf: str, ours: tuple[str, ...]) -> list[Entry]:
  return [entry(f"{hf}.weight", (*ours, "kernel"), transpose, transpose),
          entry(f"{hf}.bias", (*ours, "bias"))]


def norm_entries(hf: str, ours: tuple[str, ...]) -> list[Entry]:
  return [entry(f"{hf}.weight", (*ours, "scale")), entry(f"{hf}.bias", (*ours, "bias"))]


def attention_entries(hf: str, ours: tuple[str, ...], heads: int, qkv_bias: bool = True) -> list[Entry]:
  """HF ``{hf}.{q,k,v,o}_proj`` Linear layers <-> our per-head ``Attention`` at ``ours``."""
  m = []
  for hf_name, our_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    m.append(entry(f"{hf}.{hf_name}.weight", (*ours, our_name, "kernel"),
                   lambda w: qkv_kernel(w, heads), lambda k: qkv_kernel_to_torch(k, heads)))
    if qkv_bias:
      m.append(entry(f"{hf}.{hf_name}.bias", (*ours, our_name, "bias"),
                     lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1)))
  return m + [entry(f"{hf}.o_proj.weight", (*ours, "out", "kernel"),
                    lambda w: out_kernel(w, heads), lambda k: out_kernel_to_torch(k, heads)),
              entry(f"{hf}.o_proj.bias", (*ours, "out", "bias"))]


def packed_qkv_entries(weight: str, bias: str | None, ours: tuple[str, ...], heads: int) -> list[Entry]:
  """A packed q/k/v projection (``weight [3D, D]``, ``bias [3D]``: torch ``nn.MultiheadAttention``
  ``in_proj_*``, timm ``attn.qkv``) <-> our per-head ``query`` / ``key`` / ``value`` under ``ours``."""
  names = ("query", "key", "value")
  m = [Entry((weight,), tuple((*ours, n, "kernel") for n in names),
             lambda w: tuple(qkv_kernel(x, heads) for x in np.split(w, 3, axis=0)),
             lambda *ks: (np.concatenate([qkv_kernel_to_torch(k, heads) for k in ks]),))]
  if bias is not None:
    m.append(Entry((bias,), tuple((*ours, n, "bias") for n in names),
                   lambda b: tuple(x.reshape(heads, -1) for x in np.split(b, 3)),
                   lambda *bs: (np.concatenate([b.reshape(-1) for b in bs]),)))
  return m


def out_entries(hf: str, ours: tuple[str, ...], heads: int) -> list[Entry]:
  """An attention output Linear ``hf`` <-> our per-head ``out`` at ``ours``."""
  return [entry(f"{hf}.weight", (*ours, "kernel"), lambda w: out_kernel(w, heads),
                lambda k: out_kernel_to_torch(k, heads)),
          entry(f"{hf}.bias", (*ours, "bias"))]


NO_PATCH_BIAS = "<no patch bias>"   # placeholder input for a patch convolution without bias


def fold_cls_position(cls_name: str, pos_name: str, ours: tuple[str, ...] = (), flat_cls: bool = False,
                      bias_free: bool = False) -> Entry:
  """A cls token + positions ``[(1,) 1 + n, D]`` that cover it <-> our ``cls_token`` (the sum: both
  are added before any other op) and patch positions ``pos_embed [1, n, D]``; export writes a zero
  cls position. ``flat_cls``: the torch cls token is ``[D]`` and the positions ``[1 + n, D]``
  (CLIP, open_clip) instead of ``[1, 1, D]`` / ``[1, 1 + n, D]`` (timm, DINOv2, FLAVA).
  ``bias_free``: the torch patch convolution has no bias (CLIP, open_clip): ours is imported as
  zeros (the caller supplies ``NO_PATCH_BIAS`` in the state dict) and exported folded into the
  patch positions (it is added to every patch token: exact)."""
  bias = (*ours, "patch_embed", "proj", "bias")

  def to_ours(c, p, *b):
    p = p.reshape(1, -1, p.shape[-1])
    return (c.reshape(1, 1, -1) + p[:, :1], p[:, 1:], *(np.zeros_like(x) for x in b))

  def to_torch(c, p, *b):
    pos = np.concatenate([np.zeros_like(p[:, :1]), p + (b[0] if b else 0)], axis=1)
    return (c.reshape(-1), pos[0]) if flat_cls else (c, pos)
  return Entry((cls_name, pos_name, *([NO_PATCH_BIAS] if bias_free else [])),
               ((*ours, "cls_token"), (*ours, "pos_embed"), *([bias] if bias_free else [])), to_ours, to_torch)


def fmt_names(names, limit: int = 20) -> str:
  names = sorted("/".join(n) if isinstance(n, tuple) else n for n in names)
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def convert_with_mapping(state_dict: dict[str, np.ndarray], mapping: list[Entry],
                         expected: dict[tuple[str, ...], tuple[int, ...]], what: str,
                         consumed: tuple[str, ...] = (), bad: tuple[str, ...] = ()) -> dict:
  """Applies ``mapping`` -> flat ``{path: float32 array}`` shaped like ``expected``.

  ``consumed``: HF names the caller handled itself (not reported as unused); ``bad``: the caller's
  own mismatch messages. Raises one ValueError naming every unused HF tensor, missing HF tensor,
  unfilled param, param our model lacks and shape mismatch.
  """
  flat, used, missing_hf, bad = {}, set(consumed), [], list(bad)
  for e in mapping:
    if absent := [n for n in e.hf if n not in state_dict]:
      missing_hf += absent
      continue
    used.update(e.hf)
    xs = [np.asarray(state_dict[n], np.float32) for n in e.hf]
    try:
      ys = e.to_ours(*xs)
    except ValueError:
      bad.append(f"{', '.join(e.hf)} {', '.join(str(x.shape) for x in xs)} -> {fmt_names(e.ours)}")
      continue
    flat.update({path: np.asarray(y, np.float32) for path, y in zip(e.ours, ys)})
  bad += [f"{'/'.join(k)} {flat[k].shape} (expected {v})" for k, v in expected.items()
          if k in flat and flat[k].shape != v]
  problems = []
  if unused := set(state_dict) - used:
    problems.append(f"unused HF tensors: {fmt_names(unused)}")
  if missing_hf:
    problems.append(f"missing HF tensors: {fmt_names(missing_hf)}")
  if unfilled := set(expected) - set(flat):
    problems.append(f"unfilled params: {fmt_names(unfilled)}")
  if extra := set(flat) - set(expected):
    problems.append(f"params our model does not have: {fmt_names(extra)}")
  if bad:
    problems.append(f"shape/value mismatches: {fmt_names(bad)}")
  if problems:
    raise ValueError(f"{what}: " + "; ".join(problems))
  return flat


def export_with_mapping(flat: dict[tuple[str, ...], np.ndarray], mapping: list[Entry],
                        what: str) -> dict[str, np.ndarray]:
  """Inverse of :func:`convert_with_mapping` on a flat ``{path: array}`` tree -> HF state dict."""
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  out, used, missing = {}, set(), []
  for e in mapping:
    if absent := [p for p in e.ours if p not in flat]:
      missing += absent
      continue
    used.update(e.ours)
    ys = e.to_hf(*(flat[p] for p in e.ours))
    out.update({n: np.array(y, np.float32, order="C") for n, y in zip(e.hf, ys)})  # keeps 0-d
  unused = set(flat) - used
  if missing or unused:
    raise ValueError(f"{what}: missing params: {fmt_names(missing) or '-'}; "
                     f"params with no HF name: {fmt_names(unused) or '-'}")
  return out


def flat_shapes(init_fn: Callable[[], dict]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of the (unboxed) param tree ``init_fn()`` returns, via ``eval_shape`` (no compute)."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(jax.eval_shape(init_fn)).items()}


def to_param_tree(flat: dict[tuple[str, ...], np.ndarray], scan: bool) -> dict:
  """Flat unrolled ``{path: array}`` -> nested params (numpy float32), stacked for a scanned encoder."""
  params = traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})
  return vit.stack_layers(params, stack=np.stack) if scan else params


def host_params(params: dict) -> dict:
  """Params (boxed or not) as numpy float32 on the host: slicing, stacking and reshaping them then
  compiles nothing (on jax arrays each eager op of a new shape is a program of its own)."""
  return jax.tree.map(lambda x: np.asarray(x, np.float32), nn.unbox(params))


def from_param_tree(params: dict) -> dict[tuple[str, ...], np.ndarray]:
  """Inverse of :func:`to_param_tree`: params (boxed or not, unrolled or scanned) -> flat unrolled."""
  return traverse_util.flatten_dict(vit.unstack_layers(host_params(params)))
