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

# The one table mapping logical names (models/layers.py) to mesh axes, for parameters, optimizer
# state, objective state and activations alike. Each name lists its choices in order: a mesh axis,
# a tuple of mesh axes (split over their product) or None (replicated). A dim takes the first
# choice whose axes are not yet used by another dim of the same array and whose size divides it,
# so the fallback for a dim an axis does not divide is written here, not guessed.
LOGICAL_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # parameters
    ("embed", ("fsdp", None)),
    ("mlp", ("tensor", None)),
    ("heads", ("tensor", None)),
    ("vocab", ("tensor", None)),
    ("kv", (None,)),
    ("patch", (None,)),
    ("layers", (None,)),
    # activations
    ("batch", (BATCH_AXES, None)),
    ("seq", (None,)),
    ("act_embed", (None,)),
    ("act_heads", ("tensor", None)),
    ("act_kv", (None,)),
    ("act_mlp", ("tensor", None)),
)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh):
  """The mesh for tracing and running: ``jax.set_mesh`` (``with mesh:`` would not make the mesh
  visible to :func:`constrain`)."""
  with jax.set_mesh(mesh):
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

  On TPU the slices (distinct ``slice_index``) are the units: the hosts of one slice share its
  ICI, so one slice is one unit however many processes drive it. Otherwise (GPU nodes, CPU
  processes) each process is one.
  """
  if devices and all(d.platform == "tpu" for d in devices):   # no slice_index: one slice
    return len({getattr(d, "slice_index", 0) for d in devices}), False
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None not in slices and len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


# mesh.dcn when the config has none: the slices (or processes) all on the data axis, as MaxText's
# dcn_data_parallelism=-1.
DEFAULT_DCN = {"data": -1, "fsdp": 1, "tensor": 1}


def _dcn_config(mesh_cfg) -> dict[str, int]:
  dcn = mesh_cfg.get("dcn") if hasattr(mesh_cfg, "get") else None
  return {a: int((dcn if dcn is not None else DEFAULT_DCN).get(a, 1)) for a in MESH_AXES}


def resolve_hybrid_shape(mesh_cfg, num_devices: int, num_granules: int = 1,
                         granules_are_slices: bool = False) -> tuple[dict[str, int], dict[str, int]]:
  """(in-slice ICI shape, across-slice DCN shape); each mesh axis is the product of the two.

  ``mesh.{data,fsdp,tensor}`` are sizes inside one slice (``num_devices / num_granules``
  devices); ``mesh.dcn.{data,fsdp,tensor}`` are sizes across slices (or across processes where
  there are no slices), with product ``num_granules``; the default ``data=-1`` puts them all on
  the data axis. With all DCN sizes 1 (explicitly) the in-slice axes span every device, which
  several TPU slices do not allow.
  """
  dcn_cfg = _dcn_config(mesh_cfg)
  if all(n == 1 for n in dcn_cfg.values()):
    if granules_are_slices and num_granules > 1:
      raise ValueError(f"mesh.dcn={dcn_cfg}: the devices span {num_granules} slices; set "
                       f"mesh.dcn.{{data,fsdp,tensor}} with product {num_granules} "
                       f"(e.g. mesh.dcn.data=-1, the default)")
    return resolve_mesh_shape(mesh_cfg, num_devices), dcn_cfg
  dcn = resolve_mesh_shape(dcn_cfg, num_granules, field="mesh.dcn", unit="slices or processes")
  if num_devices % num_granules:
    raise ValueError(f"mesh.dcn={dcn}: {num_granules} slices/processes do not split the "
                     f"{num_devices} devices evenly")
  try:
    ici = resolve_mesh_shape(mesh_cfg, num_devices // num_granules, unit="devices per slice")
  except ValueError as e:
    if num_granules == 1:
      raise
    raise ValueError(f"{e} (mesh.dcn={dcn} spans the {num_granules} "
                     f"{'slices' if granules_are_slices else 'processes'}; mesh.dcn.data=1 with "
                     f"processes lets mesh.{{data,fsdp,tensor}} span all devices)") from None
  return ici, dcn


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
  granules, are_processes = dcn_granules(devices)
  ici, dcn = resolve_hybrid_shape(mesh_cfg, len(devices), granules, not are_processes)
  axis_types = (AxisType.Auto,) * 3
  if math.prod(dcn.values()) > 1:
    return jax.sharding.Mesh(device_array(ici, dcn, devices), MESH_AXES, axis_types=axis_types)
  dims = tuple(ici[a] for a in MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types)
  return jax.sharding.Mesh(device_array(ici, dcn, devices), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=LOGICAL_RULES) -> P:
  """The PartitionSpec of an array with logical axis ``names``: per dim, the first of its rule's
  choices whose mesh axes are unused and divide the dim (size-1 mesh axes are dropped)."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape, strict=True):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in parallel.mesh.LOGICAL_RULES")
    chosen = None
    for choice in table.get(name, (None,)):
      axes = (choice,) if isinstance(choice, str) else tuple(choice or ())
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if not set(axes) & used and dim % math.prod(mesh.shape[a] for a in axes) == 0:
        chosen = axes
        break
    used.update(chosen or ())
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return P(*spec)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def unbox(tree):
  """The arrays of a tree whose leaves may carry logical names (``nn.Partitioned``), without
  applying any sharding constraint (jit's ``out_shardings`` place them)."""
  return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def tree_shardings(boxed_tree, mesh) -> Any:
  """NamedShardings for any (abstract) tree: a leaf boxed with logical names (``nn.Partitioned``:
  params, the optimizer moments and EMA copies that keep their names) follows
  :data:`LOGICAL_RULES`; an unnamed leaf (step counters, scalars, rng) is replicated. The result
  has the structure of ``unbox(boxed_tree)``."""
  def sharding(x):
    if not _is_box(x):
      return NamedSharding(mesh, P())
    if not hasattr(x.value, "shape"):   # an optax.MaskedNode (no leaves) under a masked transform
      return x.value
    return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh))
  return jax.tree.map(sharding, boxed_tree, is_leaf=_is_box)


def box_like(boxed, tree):
  """``tree`` (the structure of ``unbox(boxed)``) with each leaf boxed in the logical names of the
  corresponding leaf of ``boxed`` where that one has names."""
  return jax.tree.map(lambda b, x: b.replace_boxed(x) if _is_box(b) else x, boxed, tree, is_leaf=_is_box)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation with logical axis ``names``, resolved by
  :func:`logical_to_spec` against the mesh set by :func:`use_mesh` (no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


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
