"""Orbax checkpoints: async save of the train state + data-iterator state, auto-resume, resharding
restore (a checkpoint written on one mesh restores onto any other), partial restore of params.

Layout: ``WORKDIR/checkpoints/<step>/{state, data, meta}``; ``WORKDIR`` is a local path or a bucket
URL (orbax reads and writes URLs directly). Orbax writes each step into a temporary directory and
commits it when complete, so a crash mid-save never leaves a readable partial step.

Damage after the commit (a truncated or garbled array file, a missing item, bad metadata) is found
on resume: ``meta`` holds a :func:`fingerprint` of the state's arrays (orbax stores incompressible
float chunks raw and would read garbled bytes back without complaint), and
:meth:`Checkpointer.restore_latest` falls back to the newest readable step, moving the damaged
ones to ``WORKDIR/checkpoints_damaged/``.
"""
from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # the Store orbax's own default uses
from orbax.checkpoint._src.serialization import type_handler_registry  # add(..., ignore_warnings)

from medfm_jax import storage

_CHUNK = 1 << 20   # elements per host chunk of the fingerprint
# Orbax's replica-parallel save (its default off GPU) cuts every replicated array into one slice per
# replica, each by its own compiled XLA slice, so that the hosts share the writing. That pays for
# big slices and is pure overhead for small ones: a tiny model on 8 devices compiled ~170 slice
# programs per process on its first save (about a third of a 4-step CPU run). Slices under 1 MiB
# are written whole by one replica, as orbax does with ``use_replica_parallel=False``.
MIN_REPLICA_SLICE_BYTES = 1 << 20
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    array_metadata_store=array_metadata_store.Store()), override=True, ignore_warnings=True)


class CheckpointError(ValueError):
  """A checkpoint path or content a user supplied cannot be used."""


class DamagedCheckpointError(RuntimeError):
  """A committed checkpoint step cannot be read back intact."""


def _words_sums(x) -> jax.Array:
  """``[sum of words, sum of squared words]`` mod 2**32 (uint32) of one array, where the words are
  its elements' raw bits as unsigned integers of the dtype's width (64-bit words: their low 32
  bits, the same sums mod 2**32)."""
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    width = x.dtype.itemsize * 8
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))
    words = (words & 0xFFFFFFFF).astype(jnp.uint32) if width == 64 else words.astype(jnp.uint32)
  return jnp.stack([words.sum(dtype=jnp.uint32), (words * words).sum(dtype=jnp.uint32)])


def _stacked_sums(leaves: list) -> jax.Array:
  return jnp.stack([_words_sums(x) for x in leaves])


@functools.lru_cache(maxsize=None)
def _replicated_sums(out: jax.sharding.Sharding):
  """:func:`_stacked_sums` jitted with its output replicated over ``out``'s devices, so that every
  process holds all of it whatever the inputs' shardings (XLA chooses unspecified output
  shardings itself)."""
  return jax.jit(_stacked_sums, out_shardings=out)


def _device_order(sharding: jax.sharding.Sharding) -> tuple:
  """The devices of ``sharding`` in its order (jit needs the inputs' and outputs' to agree)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return tuple(sharding.mesh.devices.flat)
  return tuple(sharding._device_assignment)   # pylint: disable=protected-access  (no public order for other kinds)


def _device_sums(leaves: list) -> np.ndarray:
  """``[len(leaves), 2]`` uint32: :func:`_words_sums` of each leaf, computed where the leaves are
  (integer sums wrap mod 2**32 in any order, so any sharding gives the same result): one program
  per device assignment, whose output is replicated on its devices, so that each process reads
  the whole result from its own copy. Every process must call it with the same leaves (the
  programs run collectives across processes)."""
  sums = np.zeros((len(leaves), 2), np.uint32)
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(_device_order(x.sharding), []).append(i)
  for devices, index in groups.items():
    out = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)),
                                     jax.sharding.PartitionSpec())
    result = _replicated_sums(out)([leaves[i] for i in index])
    sums[index] = np.asarray(result.addressable_data(0))
  return sums


def _host_sums(blocks) -> np.ndarray:
  """:func:`_words_sums` of host blocks together (uint32 ``[2]``)."""
  sums = np.zeros(2, np.uint64)
  with np.errstate(over="ignore"):   # uint64 wraps around: the arithmetic mod 2**64 intended
    for block in blocks:
      words = np.ascontiguousarray(block).reshape(-1)
      words = words.view(f"u{words.dtype.itemsize}") if words.dtype.itemsize <= 8 else words.view("u8")
      for start in range(0, words.size, _CHUNK):
        w = words[start:start + _CHUNK].astype(np.uint64)
        sums += np.array([w.sum(dtype=np.uint64), (w * w).sum(dtype=np.uint64)], np.uint64)
  return (sums & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _host_blocks(x) -> list[np.ndarray]:
  """The blocks of ``x`` this process counts on the host: its addressable shards of replica 0
  (together, over all processes, every element once), or the whole value on process 0 for host
  values. Zero-copy for arrays on CPU devices."""
  if isinstance(x, jax.Array):
    return [np.asarray(s.data) for s in x.addressable_shards if s.replica_id == 0]
  return [np.asarray(x)] if jax.process_index() == 0 else []


def _on_accelerator(x) -> bool:
  return isinstance(x, jax.Array) and next(iter(x.devices())).platform != "cpu"


def fingerprint(tree, on_device: bool | None = None) -> dict[str, list[int]]:
  """``path -> [sum of words, sum of squared words]`` mod 2**32 of every leaf, where the words are
  the elements' raw bits as unsigned integers of the dtype's width. Exact integer sums, so the
  same for any sharding, mesh or process count; a changed element changes them.

  ``on_device=None`` (the default): arrays on accelerators are summed where they are (jitted
  programs; 8 bytes per leaf come to the host instead of the whole state); host values and arrays
  on CPU devices (no copy needed, and numpy sums them several times faster than XLA's CPU backend)
  on the host. ``True`` sums every ``jax.Array`` where it is (the tests run the accelerators' path
  on CPU devices this way); ``False`` sums everything on the host.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  where = _on_accelerator if on_device is None else lambda x: on_device and isinstance(x, jax.Array)
  on_device_leaves = [i for i, (_, x) in enumerate(leaves) if where(x)]
  on_host = sorted(set(range(len(leaves))) - set(on_device_leaves))
  sums = np.zeros((len(leaves), 2), np.uint32)
  if on_device_leaves:
    sums[on_device_leaves] = _device_sums([leaves[i][1] for i in on_device_leaves])
  if on_host:
    host = np.stack([_host_sums(_host_blocks(leaves[i][1])) for i in on_host])
    if jax.process_count() > 1:
      host = np.asarray(multihost_utils.process_allgather(host)).sum(0, dtype=np.uint32)
    sums[on_host] = host
  return {jax.tree_util.keystr(p, simple=True, separator="/"): [int(a), int(b)]
          for (p, _), (a, b) in zip(leaves, sums, strict=True)}


def one_line(error: BaseException, limit: int = 160) -> str:
  """One short line for an exception (TensorStore messages run to pages)."""
  text = " ".join(str(error).split())
  text = text.split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for train states (every process takes part)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = storage.path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None   # the step of the save in flight (for its error)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, meta: dict | None = None) -> None:
    """Starts saving ``step`` (async unless disabled). A save that fails (permission denied, disk
    full, bucket unreachable) raises CheckpointError naming the step and path, here or, for an
    async save, at the next save or :meth:`wait`; the earlier steps stay as they were."""
    meta = dict(meta or {}, fingerprint=fingerprint(state))
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()                    # the previous async save's error names that step
    with self._save_errors():
      self._pending = step
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  @contextlib.contextmanager
  def _save_errors(self):
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # orbax/tensorstore/fsspec raise many kinds; pylint: disable=broad-except
      step, self._pending = self._pending, None
      raise CheckpointError(f"cannot save step {step} to {self.directory / str(step)} "
                            f"({one_line(e)}); earlier checkpoints are intact, the same command "
                            "resumes from the newest") from e

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs).

    CheckpointError if the step does not fit the config; DamagedCheckpointError if its arrays
    differ from the fingerprint saved with them; whatever orbax raises if it cannot be read.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    remapped = None
    if data_iterator is not None:
      remapped = self._remapped_data_state(step, data_iterator)
      if remapped is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    _check_matches(self.directory / str(step) / "state", abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if remapped is not None:
      data_iterator.set_state(remapped)
    saved = (restored["meta"] or {}).get("fingerprint")
    if saved is not None:      # checkpoints of older versions have none
      got = fingerprint(restored["state"])
      bad = sorted(k for k in saved if got.get(k) != saved[k])
      if bad or set(got) != set(saved):
        raise DamagedCheckpointError(f"array data differ from the fingerprint saved with them: "
                                     f"{', '.join(bad[:3]) or 'leaf set'}{' ...' if len(bad) > 3 else ''}")
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"]

  def _remapped_data_state(self, step: int, data_iterator) -> dict | None:
    """None if the step's data-iterator states come from this run's process count; else the state
    that continues the global stream here. Every process consumes one local batch per step and
    the global batches do not depend on the process count, so in-process iterators
    (``{"next_index": k}``, data.num_workers=0) map to the same position; per-worker states are
    a CheckpointError (one line). A missing ``data`` item is damage, reported by the restore."""
    data_dir = self.directory / str(step) / "data"
    files = [p for p in data_dir.iterdir() if "-of-" in p.name] if data_dir.is_dir() else []
    counts = {p.name.rsplit("-of-", 1)[1].split(".")[0] for p in files}
    if len(counts) != 1 or int(next(iter(counts))) == jax.process_count():
      return None
    states = [json.loads(storage.read_text(p)) for p in files]
    ours = data_iterator.get_state()
    if (all(isinstance(st, dict) and set(st) == {"next_index"} for st in states + [ours])
        and len({st["next_index"] for st in states}) == 1):
      logging.warning("checkpoint: step %d was written by %d process(es), this run has %d: the "
                      "data stream continues at batch %d", step, len(files), jax.process_count(),
                      states[0]["next_index"])
      return dict(states[0])
    raise CheckpointError(
        f"checkpoint {self.directory / str(step)} was written by {len(files)} process(es) and "
        f"this run has {jax.process_count()}: resuming on another process count needs "
        "data.num_workers=0 in both runs (per-worker iterator states cannot be remapped); rerun "
        "with the original process count, or start a new --workdir with --config.init_from "
        "pointing at this one")

  def restore_latest(self, abstract_state, data_iterator=None):
    """``(step, state)`` of the newest readable checkpoint (``data_iterator`` restored with it),
    or None if there is none.

    A step that cannot be read (truncated/garbled array file, missing item, bad metadata) is
    skipped with a warning naming it, and moved to ``WORKDIR/checkpoints_damaged/<step>`` once an
    older step restored (so that the resumed run can save that step again). CheckpointError
    (one line naming the directory) if steps exist but none is readable, or if the newest
    readable one does not fit the config.
    """
    steps = sorted(self.manager.all_steps(read=True), reverse=True)
    damaged = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except CheckpointError:
        raise
      except Exception as e:  # orbax/tensorstore/grain raise many kinds; pylint: disable=broad-except
        damaged.append((step, one_line(e)))
        logging.warning("checkpoint: step %d in %s is damaged and skipped (%s)", step,
                        self.directory, damaged[-1][1])
        continue
      if damaged:
        self._set_aside([s for s, _ in damaged])
        logging.warning("checkpoint: resuming from step %d; damaged newer step(s) %s moved to %s",
                        step, ", ".join(str(s) for s, _ in damaged), self._damaged_dir)
      return step, state
    if damaged:
      raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(
          f"step {s}: {r}" for s, r in damaged) + "; move the directory away to start afresh")
    return None

  @property
  def _damaged_dir(self) -> epath.Path:
    return self.directory.parent / "checkpoints_damaged"

  def _set_aside(self, steps) -> None:
    """Moves damaged steps out of the manager's directory (process 0), then re-reads it."""
    if jax.process_index() == 0:
      self._damaged_dir.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = self._damaged_dir / str(step)
        if target.exists():
          target.rmtree()
        (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("medfm_jax_checkpoint_set_aside")
    self.manager.reload()

  def wait(self) -> None:
    with self._save_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves}


def _check_matches(state_dir: epath.Path, abstract_state) -> None:
  """Raises CheckpointError naming missing/unexpected keys and shape mismatches, before reading."""
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(state_dir).item_metadata
  if metadata is None:
    raise DamagedCheckpointError(f"{state_dir}: no readable array metadata (_METADATA)")
  stored = _shapes_by_path(metadata.tree)
  problems = mismatch_report(stored, _shapes_by_path(abstract_state))
  if problems:
    raise CheckpointError(f"checkpoint {state_dir.parent} does not fit this config's train "
                          f"state (changed model/optimizer config? use a new --workdir): {problems}")


def mismatch_report(stored: dict[str, tuple], wanted: dict[str, tuple], limit: int = 5) -> str:
  """'' if both ``path -> shape`` maps agree, else one line ``missing: ...; unexpected: ...;
  shape mismatch (stored != config): ...`` (at most ``limit`` items each)."""
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  mismatched = sorted(f"{k} {stored[k]} != {wanted[k]}" for k in set(wanted) & set(stored)
                      if stored[k] != wanted[k])
  return "; ".join(f"{name}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}"
                   for name, items in (("missing", missing), ("unexpected", unexpected),
                                       ("shape mismatch (stored != config)", mismatched)) if items)


def resolve_checkpoint_dir(path: str) -> epath.Path:
  """A workdir, its ``checkpoints`` dir, or one step dir (local or URL) -> the step's ``state``
  directory."""
  try:
    root = storage.path(path)
  except storage.StorageError as e:
    raise CheckpointError(f"init_from={path!r}: {e}") from None
  for candidate in (root, root / "checkpoints"):
    if (candidate / "state").is_dir():
      return candidate / "state"
    steps = [d.name for d in candidate.iterdir() if d.name.isdigit()] if candidate.is_dir() else []
    if steps:
      return candidate / max(steps, key=int) / "state"
  raise CheckpointError(f"init_from={path!r}: no checkpoint found; expected a workdir, its "
                        "'checkpoints' directory, or a checkpoints/<step> directory")


def restore_params(path: str, abstract_params: Any | None = None) -> Any:
  """Loads the ``params`` subtree of a train-state checkpoint: as host numpy arrays (any saving
  topology), or onto the shardings of ``abstract_params`` (ShapeDtypeStructs)."""
  state_dir = resolve_checkpoint_dir(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    if abstract_params is None:
      tree = ckptr.metadata(state_dir).item_metadata.tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    else:
      target = {"params": abstract_params}
      restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"]


def read_meta(path: str) -> dict:
  """The ``meta`` item (``{"step", "config"}``, config decoded from JSON) of the checkpoint that
  :func:`resolve_checkpoint_dir` picks for ``path``."""
  step_dir = resolve_checkpoint_dir(path).parent
  if not (step_dir / "meta").is_dir():
    raise CheckpointError(f"init_from={path!r}: checkpoint {step_dir} has no meta item; cannot "
                          "tell which objective wrote it")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    meta = ckptr.restore(step_dir, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  config = meta.get("config")
  meta["config"] = json.loads(config) if isinstance(config, str) else (config or {})
  return meta


def restore_subtree(path: str, keys: tuple[str, ...]) -> Any:
  """Host numpy arrays of one subtree of a train-state checkpoint, e.g. ``("extra", "teacher",
  "backbone")``; only that subtree is read."""
  state_dir = resolve_checkpoint_dir(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata.tree
    node = tree
    for i, k in enumerate(keys):
      if not isinstance(node, dict) or k not in node:
        have = sorted(node) if isinstance(node, dict) else []
        raise CheckpointError(f"init_from={path!r}: checkpoint has no {'/'.join(keys[:i + 1])!r} "
                              f"(found {have} under {'/'.join(keys[:i]) or 'the root'!r})")
      node = node[k]
    item = node
    for k in reversed(keys):
      item = {k: item}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  for k in keys:
    restored = restored[k]
  return restored


def export_params(workdir: str, step: int, params: Any, meta: dict) -> str:
  """Writes ``{"params": params}`` as a plain checkpoint ``WORKDIR/checkpoints/<step>`` (no
  optimizer state) that :func:`restore_params`, :func:`restore_subtree` and :func:`read_meta`
  read; returns the workdir."""
  checkpointer = Checkpointer(workdir, keep=1, async_save=False)
  try:
    checkpointer.save(step, {"params": params}, None, meta)
  finally:
    checkpointer.close()
  return workdir
