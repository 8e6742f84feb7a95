"""Multi-slice (ICI x DCN) meshes and host-local -> global batches of any structure."""
import dataclasses

import jax
import numpy as np
import pytest

from configs import mae
from medfm_jax import config as config_lib
from medfm_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  id: int
  slice_index: int
  process_index: int
  platform: str = "fake"
  device_kind: str = "fake"


def _pod(num_slices, per_slice, hosts_per_slice=2):
  """Devices of ``num_slices`` slices, listed interleaved (as a runtime might enumerate them)."""
  devs = [_FakeDevice(s * per_slice + i, s, s * hosts_per_slice + i * hosts_per_slice // per_slice)
          for i in range(per_slice) for s in range(num_slices)]
  return devs


def test_dcn_axes_go_across_slices_and_ici_axes_stay_inside():
  devices = _pod(num_slices=4, per_slice=8)
  assert mesh_lib.dcn_granules(devices) == (4, False)
  cfg = {"data": 1, "fsdp": -1, "tensor": 2, "dcn": {"data": -1, "fsdp": 1, "tensor": 1}}
  ici, dcn = mesh_lib.resolve_hybrid_shape(cfg, len(devices), 4, True)
  assert ici == {"data": 1, "fsdp": 4, "tensor": 2} and dcn == {"data": 4, "fsdp": 1, "tensor": 1}
  arr = mesh_lib.device_array(ici, dcn, devices)
  assert arr.shape == (4, 4, 2)
  slices = np.vectorize(lambda d: d.slice_index)(arr)
  for k in range(4):                 # moving along data changes slice; fsdp/tensor never do
    assert (slices[k] == k).all()
  assert sorted(d.id for d in arr.ravel()) == list(range(32))


def test_dcn_over_fsdp_and_data_within_slice():
  devices = _pod(num_slices=2, per_slice=4)
  ici, dcn = mesh_lib.resolve_hybrid_shape(
      {"data": -1, "fsdp": 1, "tensor": 1, "dcn": {"data": 1, "fsdp": 2, "tensor": 1}}, 8, 2, True)
  arr = mesh_lib.device_array(ici, dcn, devices)
  assert arr.shape == (4, 2, 1)
  slices = np.vectorize(lambda d: d.slice_index)(arr)
  assert (slices[:, 0] == 0).all() and (slices[:, 1] == 1).all()


def test_processes_are_the_dcn_units_without_slices():
  devices = [d for d in jax.devices()]      # 8 CPU devices of one process: no slice_index
  assert mesh_lib.dcn_granules(devices) == (1, True)
  fake = [_FakeDevice(i, 0, i // 2) for i in range(8)]       # one slice, 4 hosts
  assert mesh_lib.dcn_granules(fake) == (4, True)
  arr = mesh_lib.device_array({"data": 1, "fsdp": 2, "tensor": 1}, {"data": 4, "fsdp": 1, "tensor": 1}, fake)
  assert [[d.process_index for d in row] for row in arr[:, :, 0]] == [[0, 0], [1, 1], [2, 2], [3, 3]]
  # One TPU slice driven by 4 hosts is one ICI unit: mesh.{data,fsdp,tensor} span all its chips.
  tpu = [dataclasses.replace(d, platform="tpu") for d in fake]
  assert mesh_lib.dcn_granules(tpu) == (1, False)
  assert mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, tpu).devices.shape == (2, 4, 1)


@pytest.mark.parametrize("mesh, message", [
    ({"data": -1, "fsdp": 1, "tensor": 1, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}},
     "the devices span 4 slices; set mesh.dcn.{data,fsdp,tensor} with product 4 (e.g. mesh.dcn.data=-1, the default)"),
    ({"data": -1, "fsdp": 1, "tensor": 1, "dcn": {"data": 3, "fsdp": 1, "tensor": 1}},
     "mesh.dcn={'data': 3, 'fsdp': 1, 'tensor': 1}: product 3 != number of slices or processes 4"),
    ({"data": 3, "fsdp": 1, "tensor": 1, "dcn": {"data": 4, "fsdp": 1, "tensor": 1}},
     "mesh={'data': 3, 'fsdp': 1, 'tensor': 1}: product 3 != number of devices per slice 8"),
])
def test_bad_hybrid_shapes_name_the_field(mesh, message):
  with pytest.raises(ValueError) as e:
    mesh_lib.resolve_hybrid_shape(mesh, 32, 4, True)
  assert message in str(e.value)


def test_dcn_fills_with_the_processes_or_slices_by_default_and_explicit_values_win():
  default = mae.get_config("tiny").mesh                          # data=-1, dcn.data=-1
  assert mesh_lib.resolve_hybrid_shape(default, 8, 1, False) == (
      {"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 1})
  for granules, slices in ((2, False), (4, True)):               # processes, or TPU slices
    ici, dcn = mesh_lib.resolve_hybrid_shape(default, 8, granules, slices)
    assert dcn == {"data": granules, "fsdp": 1, "tensor": 1}
    assert ici == {"data": 8 // granules, "fsdp": 1, "tensor": 1}
  no_dcn = {"data": 1, "fsdp": -1, "tensor": 1}                  # a mesh dict without dcn
  assert mesh_lib.resolve_hybrid_shape(no_dcn, 8, 2, False)[1]["data"] == 2
  explicit = mae.get_config("tiny,mesh.dcn.data=1,mesh.fsdp=8").mesh   # processes: span all
  assert mesh_lib.resolve_hybrid_shape(explicit, 8, 2, False) == (
      {"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 1})
  over_fsdp = mae.get_config("tiny,mesh.dcn.data=1,mesh.dcn.fsdp=-1").mesh
  assert mesh_lib.resolve_hybrid_shape(over_fsdp, 8, 2, False)[1] == {"data": 1, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError) as e:                         # fsdp=8 does not fit 4 per process
    mesh_lib.resolve_hybrid_shape(mae.get_config("tiny,mesh.fsdp=8").mesh, 8, 2, False)
  assert "4 devices per slice" in str(e.value) and "mesh.dcn.data=1" in str(e.value)


def test_config_validation_checks_dcn_on_this_host():
  c = mae.get_config("tiny,mesh.dcn.data=2")     # one process, no slices: DCN product must be 1
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value) == ("mesh.dcn={'data': 2, 'fsdp': 1, 'tensor': 1}: product 2 != number of "
                          "slices or processes 1; use -1 on one axis to fill")
  assert config_lib.validate(mae.get_config("tiny,mesh.fsdp=2")) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_nested_batches_become_global_arrays_sharded_over_batch_axes():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rng = np.random.default_rng(0)
  local = {"global": rng.normal(size=(8, 2, 4, 4, 1)).astype(np.float32),
           "crops": [rng.normal(size=(8, 3)).astype(np.float32),
                     rng.normal(size=(8, 5, 2)).astype(np.float32)],
           "pair": {"image": rng.normal(size=(8, 4)).astype(np.float32),
                    "tokens": rng.integers(0, 9, (8, 6)).astype(np.int32),
                    "caption": np.array(["a"] * 8, dtype=object), "name": np.array(["b"] * 8)}}
  with mesh_lib.use_mesh(mesh):
    out = mesh_lib.to_global_batch(local, mesh)
  assert set(out) == {"global", "crops", "pair"} and set(out["pair"]) == {"image", "tokens"}
  assert isinstance(out["crops"], list) and len(out["crops"]) == 2
  for got, want in [(out["global"], local["global"]), (out["crops"][1], local["crops"][1]),
                    (out["pair"]["tokens"], local["pair"]["tokens"])]:
    assert isinstance(got, jax.Array) and got.sharding.spec[0] == ("data", "fsdp")
    assert got.addressable_shards[0].data.shape[0] == 2       # 8 rows over data x fsdp = 4
    np.testing.assert_array_equal(np.asarray(got), want)
