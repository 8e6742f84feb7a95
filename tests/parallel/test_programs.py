"""Run-once programs (``parallel.programs.jit_once``: the train-state init) compile without the
CPU backend's optimisation and give the default compile's state to within 2 float32 ulps."""
import jax
import numpy as np

from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.parallel import programs
from medfm_jax.train import assemble
from medfm_jax.train import state as state_lib
from tests import helpers


def test_init_state_matches_the_default_compile_within_two_ulps():
  config = helpers.tiny_mae_config()
  assembly = assemble.assemble(config, helpers.single_device_mesh(config))
  once = jax.device_get(assembly.init_state())
  example = assemble._one_example(assembly.abstract_batch)  # pylint: disable=protected-access
  default = jax.device_get(jax.jit(lambda: mesh_lib.unbox(state_lib.named_init(
      assembly.objective, assembly.tx, config.seed, example)), compiler_options=helpers.PRODUCTION_XLA)())
  differing = 0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(once)[0], jax.tree.leaves(default),
                          strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    if a.dtype.kind != "f":
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))   # counters, rng
      continue
    ulps = np.abs(a - b) / np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float32))
    assert np.max(ulps, initial=0) <= 2, (jax.tree_util.keystr(path), float(np.max(ulps)))
    differing += int(not np.array_equal(a, b))
  # The options reach the compiler: the level-0 program's float transforms of the random bits
  # differ in the last bit somewhere (2 of 185 leaves on 2026-11-30). If a jax update makes the
  # two compiles bitwise equal, this line, not the module, needs revisiting.
  assert programs.once_compiler_options() == programs.ONCE_CPU_OPTIONS and differing > 0
