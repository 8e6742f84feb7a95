"""Test setup: 8 fake CPU devices (sharding tests), parsed absl flags (grain workers), a
persistent XLA compilation cache shared by the test processes and the CLI subprocesses they start
(the same tiny programs are compiled by many subprocess tests; a cache hit is bitwise the same
executable), and XLA's CPU backend compiling without LLVM's expensive passes.

Compiling dominates the suite (the models are tiny, the steps few), so the tests compile at XLA's
``xla_backend_optimization_level=0`` (production: the default, 3): the tiny MAE train step
compiles in 4.3 instead of 6.7 CPU-s and runs in 17 instead of 9 ms, the tiny CLIP's 5.3 instead
of 10.5 CPU-s and 34 instead of 20 ms; the objective, trainer, evaluation and resume tests take
about 10% less CPU (2026-11-30). Level 0 and the default agree to float32 rounding (one CLIP train
step, gradients within 1e-6 relative); ``tests/objectives/test_clip.py`` runs the tiny CLIP's
step at both levels and compares them. (It once did not: the max-pooled cls slot's gradient
depended on XLA's fusion, NaN at level 0; fixed in ``models/vit.py``.) Level 1 saves nothing
measurable (the same tests, 245 vs 249 CPU-s). ``--xla_llvm_disable_expensive_passes`` also
stays (about a third off the step compile at the default level).
``MEDFM_TEST_XLA_OPTIMIZE=1`` compiles as in production.
The CLI subprocesses inherit these flags through the environment. ``MEDFM_TEST_XLA_CACHE`` moves
the compilation cache (default ``TMPDIR/medfm_jax_test_xla_cache``), e.g. to time a cold run
without emptying a cache that others use.
"""
import json
import os
import shutil
import sys
import tempfile
import time

FAST_COMPILE_FLAGS = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(f for f in [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "" if os.environ.get("MEDFM_TEST_XLA_OPTIMIZE") == "1" else FAST_COMPILE_FLAGS] if f)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "MEDFM_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "medfm_jax_test_xla_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torchvision against the CPU torch build (tests/site/sitecustomize.py): here and in every process
# the tests start.
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_SITE, os.environ.get("PYTHONPATH", "")] if p)
sys.path.insert(0, _SITE)
import sitecustomize  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import

import filelock  # noqa: E402
import fsspec  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402



if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


# One tiny checkpoint per objective for the whole session (built lazily, once per test process):
# the MAE one here serves the evaluation protocols and CLIP's LiT test; the CLIP one is in
# tests/evaluate/test_zero_shot.py, its only user.

def train_mae_ckpt(workdir, seed=0):
  """4 steps of the shrunk tiny MAE with 2 encoder blocks into ``workdir`` (``tools/seed_spread.py``
  varies ``seed``)."""
  from medfm_jax.train import loop  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS above)
  from tests import helpers  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_mae_config(total_steps=4, checkpoint_every=4, seed=seed)
  loop.train(config, workdir, helpers.single_device_mesh(config))
  return workdir


def built_once(tmp_path_factory, name, build):
  """``build(directory)`` once per test run, not once per xdist worker: the workers share the
  parent of their base temp directories, the first to arrive builds under a file lock, the others
  wait for it and reuse the directory (for fixtures whose users only read it)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  directory, done = root / name, root / f"{name}.built"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      build(str(directory))
      done.touch()
  return str(directory)


@pytest.fixture(scope="session")
def mae_ckpt(tmp_path_factory):
  """The tiny MAE run (read-only), trained once for all xdist workers."""
  return built_once(tmp_path_factory, "mae_tiny", train_mae_ckpt)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py) holding the bucket ``gs://bucket``: this
  process and the CLI subprocesses it starts reach ``gs://`` there for the rest of the session
  (the endpoint variables stay set; each test uses its own prefix in the bucket)."""
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top  (the emulator wheel: bucket tests only)
  emulator = gcs_emulator.Emulator(str(tmp_path_factory.mktemp("gcs"))).start()
  try:
    emulator.create_bucket("bucket")
    with pytest.MonkeyPatch.context() as patch:
      for name, value in emulator.env().items():
        patch.setenv(name, value)
      # fsspec read FSSPEC_GCS_TOKEN at import: anonymous gcsfs in this process too.
      patch.setitem(fsspec.config.conf, "gcs", dict(fsspec.config.conf.get("gcs", {}), token="anon"))
      epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
      yield emulator
      epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  finally:
    emulator.stop()


def pytest_collection_modifyitems(items):
  """Slow tests first (the order is otherwise kept): ``-n 2 --dist loadgroup`` hands out the xdist
  groups, then single tests in collection order, so the minute-long training and CLI tests (many
  under tests/sweeps and tests/train, collected last) start early instead of leaving one worker
  running the last of them while the other idles."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


_CPU_LOG = os.environ.get("MEDFM_TEST_CPU_LOG")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With ``MEDFM_TEST_CPU_LOG=FILE``, appends one JSON line per test: CPU seconds of the test
  process and of the subprocesses it waited for (setup, call and teardown, so a fixture counts
  where it is built), and wall seconds. CPU time hardly depends on the machine's load, so it ranks
  tests for the suite-time budget on a shared machine where ``--durations`` cannot."""
  del nextitem
  if not _CPU_LOG:
    yield
    return
  t0, w0 = os.times(), time.monotonic()
  yield
  t1 = os.times()
  record = {"test": item.nodeid,
            "cpu_s": round(t1.user - t0.user + t1.system - t0.system, 2),
            "children_cpu_s": round(t1.children_user - t0.children_user
                                    + t1.children_system - t0.children_system, 2),
            "wall_s": round(time.monotonic() - w0, 2)}
  with open(_CPU_LOG, "a") as f:
    f.write(json.dumps(record) + "\n")
