"""Damaged checkpoints: resume falls back to the newest readable step, naming the damaged one;
none readable is one line naming the directory."""
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.train import checkpoint as ckpt_lib


def _state(step):
  """A small train-state-like tree."""
  w = jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * step
  return {"w": w, "b": {"count": jnp.full((8,), step, jnp.int32)}}


def _iterator():
  return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def _abstract():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      _state(0))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A workdir with checkpoints of steps 1 and 2 (the iterator advanced by the step)."""
  workdir = str(tmp_path_factory.mktemp("ckpt"))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=3, async_save=False)
  for step in (1, 2):
    it = _iterator()
    for _ in range(step):
      next(it)
    checkpointer.save(step, _state(step), it, {"step": step})
  checkpointer.close()
  return workdir


def _array_files(step_dir):
  d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return sorted((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def _damage(step_dir, kind):
  if kind == "truncated_array_file":
    big = _array_files(step_dir)[-1]
    with open(big, "r+b") as f:
      f.truncate(os.path.getsize(big) // 2)
  elif kind == "garbled_array_file":       # read back without error by orbax: the fingerprint
    big = _array_files(step_dir)[-1]
    data = bytearray(open(big, "rb").read())
    data[len(data) // 4:len(data) // 4 + 64] = bytes(range(64))
    open(big, "wb").write(bytes(data))
  elif kind == "missing_state_item":
    shutil.rmtree(os.path.join(step_dir, "state"))
  elif kind == "missing_data_item":
    shutil.rmtree(os.path.join(step_dir, "data"))
  elif kind == "bad_array_metadata":
    open(os.path.join(step_dir, "state", "_METADATA"), "w").write("{not json")
  elif kind == "bad_data_state":
    open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w").write("{not json")


KINDS = ["truncated_array_file", "garbled_array_file", "missing_state_item", "missing_data_item",
         "bad_array_metadata", "bad_data_state"]


@pytest.mark.parametrize("kind", KINDS)
def test_newest_damaged_falls_back_to_previous_with_warning(two_steps, tmp_path, kind):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  _damage(os.path.join(workdir, "checkpoints", "2"), kind)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=3, async_save=False)
  it = _iterator()
  with pytest.MonkeyPatch.context() as mp:
    warnings = []
    mp.setattr(ckpt_lib.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    step, state = checkpointer.restore_latest(_abstract(), it)
  assert step == 1
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(1)), strict=True):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(next(it), [2, 3])        # the iterator of step 1
  assert any(f"step 2 in {workdir}/checkpoints is damaged" in w for w in warnings), warnings
  # The damaged step is set aside, so the resumed run saves step 2 again.
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["2"]
  checkpointer.save(2, _state(2), it, {"step": 2})
  checkpointer.close()
  step, state = ckpt_lib.Checkpointer(workdir).restore_latest(_abstract(), _iterator())
  assert step == 2 and np.array_equal(state["w"], _state(2)["w"])


def test_none_readable_is_one_line_naming_the_directory(two_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  _damage(os.path.join(workdir, "checkpoints", "2"), "garbled_array_file")
  _damage(os.path.join(workdir, "checkpoints", "1"), "missing_state_item")
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=3, async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    checkpointer.restore_latest(_abstract(), _iterator())
  msg = str(e.value)
  assert msg.startswith(f"no readable checkpoint in {workdir}/checkpoints: step 2: ")
  assert "step 1: " in msg and "\n" not in msg
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]   # nothing moved


def test_fingerprint_does_not_depend_on_the_sharding():
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  spread = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  half = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a")))
  fp = ckpt_lib.fingerprint({"x": jax.device_put(x)})
  assert fp == ckpt_lib.fingerprint({"x": spread}) == ckpt_lib.fingerprint({"x": half})
  y = x.copy()
  y[3, 5] = np.nextafter(y[3, 5], np.float32(np.inf))          # one bit of one element
  assert fp != ckpt_lib.fingerprint({"x": jax.device_put(y)})


def _host_fingerprint(x: np.ndarray) -> list[int]:
  """The reference: the words' sums in Python integers, mod 2**32."""
  words = [int(w) for w in x.reshape(-1).view(f"u{x.dtype.itemsize}")]
  return [sum(words) % 2**32, sum(w * w for w in words) % 2**32]


def test_fingerprint_on_device_equals_the_host_sums():
  """Every dtype a state holds, sharded on devices and as host values, through the host and the
  device path, against Python-integer sums (the formula of the fingerprints already saved)."""
  rng = np.random.default_rng(0)
  values = {"f32": rng.normal(size=(64, 33)).astype(np.float32) * 1e6,
            "bf16": rng.normal(size=(40,)).astype(jnp.bfloat16),
            "i32": rng.integers(-2**31, 2**31, size=(77,), dtype=np.int32),
            "u8": rng.integers(0, 256, size=(9, 9), dtype=np.uint8),
            "bool": rng.random(size=(13,)) > 0.5, "scalar": np.int32(-7)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("a",))
  on_device = {k: jax.device_put(v, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("a") if v.ndim and v.shape[0] % 8 == 0 else jax.sharding.PartitionSpec()))
               for k, v in values.items()}
  expected = {k: _host_fingerprint(np.asarray(v)) for k, v in values.items()}
  assert ckpt_lib.fingerprint(on_device) == expected   # CPU devices: summed on the host
  assert ckpt_lib.fingerprint(values) == expected
  # The accelerators' path (jitted reductions where the arrays are), forced on the CPU devices.
  assert ckpt_lib.fingerprint(on_device, on_device=True) == expected


def test_fingerprint_device_path_on_fsdp_sharded_kernels_equals_the_host_path():
  """The accelerators' path forced on 8 CPU devices: kernels split over fsdp (and data x fsdp),
  replicated biases, a leaf on a mesh in another device order and one on a single device (one
  program per device order, each with a replicated output) give the host path's sums."""
  rng = np.random.default_rng(1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  reversed_mesh = jax.sharding.Mesh(np.array(jax.devices()[:8][::-1]), ("fsdp",))
  put = lambda x, m, *spec: jax.device_put(x, jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec(*spec)))
  state = {"params": {"qkv": {"kernel": put(rng.normal(size=(16, 48)).astype(np.float32), mesh, "fsdp"),
                              "bias": put(rng.normal(size=(48,)).astype(np.float32), mesh)},
                      "out": {"kernel": put(rng.normal(size=(48, 16)).astype(jnp.bfloat16), mesh, "fsdp", "data")},
                      "embed": put(rng.normal(size=(8, 24)).astype(np.float32), reversed_mesh, "fsdp")},
           "step": jax.device_put(np.int32(7), jax.devices()[3]),
           "count": np.arange(5, dtype=np.int32)}                  # a host value: summed on the host
  host = ckpt_lib.fingerprint(state, on_device=False)
  assert host == {k: _host_fingerprint(np.asarray(v)) for k, v in
                  zip(host, jax.tree.leaves(state))}
  assert ckpt_lib.fingerprint(state, on_device=True) == host


def _as_two_processes(workdir, state_of=lambda state: state):
  for step in ("1", "2"):
    data = os.path.join(workdir, "checkpoints", step, "data")
    state = open(os.path.join(data, "process_0-of-1.json")).read()
    os.remove(os.path.join(data, "process_0-of-1.json"))
    for i in range(2):
      open(os.path.join(data, f"process_{i}-of-2.json"), "w").write(state_of(state))


def test_other_process_count_continues_the_global_stream(two_steps, tmp_path):
  """Iterator states of 2 processes (in-process iterators: the same next_index), resumed by 1:
  the stream continues at the same global batch."""
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  _as_two_processes(workdir)
  it = _iterator()
  step, state = ckpt_lib.Checkpointer(workdir).restore_latest(_abstract(), it)
  assert step == 2 and np.array_equal(state["w"], _state(2)["w"])
  np.testing.assert_array_equal(next(it), [4, 5])        # batch 2, as the 2 processes would


def test_other_process_count_with_worker_states_is_one_line_not_damage(two_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  _as_two_processes(workdir, lambda state: '{"workers_state": {}, "iterations_to_skip": {}}')
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.Checkpointer(workdir).restore_latest(_abstract(), _iterator())
  assert str(e.value).startswith(f"checkpoint {workdir}/checkpoints/2 was written by 2 process(es) "
                                 "and this run has 1: resuming on another process count needs "
                                 "data.num_workers=0")
  assert "\n" not in str(e.value)
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
