"""Device mesh from config, the logical-axis rules table, and shardings for state and batches."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one table mapping logical names (models/layers.py) to mesh axes.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("patch", None),
    ("layers", None),
    # activations
    ("batch", BATCH_AXES),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh):
  """Mesh + logical-axis rules for tracing: ``jax.set_mesh`` (``with mesh:`` would silently
  disable Flax's logical constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def resolve_mesh_shape(mesh_cfg, num_devices: int, field: str = "mesh",
                       unit: str = "devices") -> dict[str, int]:
  """Fills the (at most one) ``-1`` axis so the product equals ``num_devices``."""
  shape = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fill = [a for a, n in shape.items() if n == -1]
  if len(fill) > 1 or any(n == 0 or n < -1 for n in shape.values()):
    raise ValueError(f"{field}={shape}: each of {field}.data/fsdp/tensor must be a positive size, "
                     f"with at most one -1 (= fill the remaining {unit})")
  known = math.prod(n for n in shape.values() if n != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{field}={shape}: fixed axes ({known}) do not divide the {num_devices} {unit}")
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"{field}={shape}: product {math.prod(shape.values())} != number of {unit} "
                     f"{num_devices}; use -1 on one axis to fill")
  return shape


def dcn_granules(devices: Sequence[Any]) -> tuple[int, bool]:
  """(number of DCN-connected units, whether those units are processes rather than slices).

  Several TPU slices (distinct ``slice_index``) are the units; otherwise (one slice, GPU nodes,
  CPU processes) each process is one.
  """
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None not in slices and len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def _dcn_config(mesh_cfg) -> dict[str, int]:
  dcn = mesh_cfg.get("dcn") if hasattr(mesh_cfg, "get") else None
  return {a: int((dcn or {}).get(a, 1)) for a in MESH_AXES}


def resolve_hybrid_shape(mesh_cfg, num_devices: int, num_granules: int = 1,
                         granules_are_slices: bool = False) -> tuple[dict[str, int], dict[str, int]]:
  """(in-slice ICI shape, across-slice DCN shape); each mesh axis is the product of the two.

  ``mesh.{data,fsdp,tensor}`` are sizes inside one slice (``num_devices / num_granules``
  devices); ``mesh.dcn.{data,fsdp,tensor}`` are sizes across slices (or across processes where
  there are no slices), with product ``num_granules``. With all DCN sizes 1 (the default) the
  in-slice axes span every device, which several TPU slices do not allow.
  """
  dcn_cfg = _dcn_config(mesh_cfg)
  if all(n == 1 for n in dcn_cfg.values()):
    if granules_are_slices and num_granules > 1:
      raise ValueError(f"mesh.dcn={dcn_cfg}: the devices span {num_granules} slices; set "
                       f"mesh.dcn.{{data,fsdp,tensor}} with product {num_granules} "
                       f"(e.g. mesh.dcn.data={num_granules})")
    return resolve_mesh_shape(mesh_cfg, num_devices), dcn_cfg
  dcn = resolve_mesh_shape(dcn_cfg, num_granules, field="mesh.dcn", unit="slices or processes")
  if num_devices % num_granules:
    raise ValueError(f"mesh.dcn={dcn}: {num_granules} slices/processes do not split the "
                     f"{num_devices} devices evenly")
  return resolve_mesh_shape(mesh_cfg, num_devices // num_granules, unit="devices per slice"), dcn


def device_array(ici: dict[str, int], dcn: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as the (data, fsdp, tensor) mesh: ICI axes inside each slice, DCN axes
  across slices (``mesh_utils.create_hybrid_device_mesh``), shape = ici * dcn per axis."""
  if math.prod(dcn.values()) == 1:
    return np.asarray(devices).reshape(tuple(ici[a] for a in MESH_AXES))
  return mesh_utils.create_hybrid_device_mesh(
      tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES), devices,
      process_is_granule=dcn_granules(devices)[1], allow_split_physical_axes=True)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over all devices of all processes (Auto axis types); hybrid
  ICI x DCN when ``mesh.dcn`` spans several slices or processes."""
  devices = list(devices) if devices is not None else jax.devices()
  ici, dcn = resolve_hybrid_shape(mesh_cfg, len(devices), *dcn_granules(devices))
  axis_types = (AxisType.Auto,) * 3
  if math.prod(dcn.values()) > 1:
    return jax.sharding.Mesh(device_array(ici, dcn, devices), MESH_AXES, axis_types=axis_types)
  dims = tuple(ici[a] for a in MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types)
  return jax.sharding.Mesh(device_array(ici, dcn, devices), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=LOGICAL_RULES) -> P:
  """Maps logical names to a PartitionSpec, replicating dims the mesh axes do not divide."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def param_specs(boxed_params, mesh) -> Any:
  """PartitionSpecs for a tree of (abstract) params boxed with ``nn.Partitioned`` logical names."""
  def spec(x):
    return logical_to_spec(x.names, x.value.shape, mesh) if _is_box(x) else P()
  return jax.tree.map(spec, boxed_params, is_leaf=_is_box)


def shardings_by_param_path(tree, boxed_params, mesh) -> Any:
  """Shardings for any tree whose leaves mirror parameters (params, optimizer moments, EMA copies).

  A leaf whose key path ends with a parameter's full path and has that parameter's shape gets the
  parameter's sharding; every other leaf (step counters, scalars, rng) is replicated.
  """
  by_path = {}
  for path, x in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)[0]:
    value = x.value if _is_box(x) else x
    spec = logical_to_spec(x.names, value.shape, mesh) if _is_box(x) else P()
    by_path[_path_key(path)] = (spec, tuple(value.shape))
  depths = sorted({len(k) for k in by_path}, reverse=True)

  def sharding(path, leaf):
    key = _path_key(path)
    for d in depths:
      match = by_path.get(key[-d:]) if len(key) >= d else None
      if match is not None and match[1] == tuple(getattr(leaf, "shape", ())):
        return NamedSharding(mesh, match[0])
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def drop_non_numeric(tree):
  """The batch without leaves that cannot become device arrays (strings such as captions);
  dicts, lists and tuples nest freely (multi-crop views, image-text pairs)."""
  if isinstance(tree, dict):
    kept = {k: drop_non_numeric(v) for k, v in tree.items()}
    return {k: v for k, v in kept.items() if v is not None}
  if isinstance(tree, (list, tuple)):
    return type(tree)(drop_non_numeric(v) for v in tree)
  x = np.asarray(tree)
  return None if x.dtype.kind in "OSU" else x


def to_global_batch(local_batch, mesh):
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded over data x fsdp.

  Any pytree of arrays with a leading batch dim; string leaves (captions) are dropped.
  """
  def put(x):
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)
  return jax.tree.map(put, drop_non_numeric(local_batch))
