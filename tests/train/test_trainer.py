"""End-to-end trainer tests: sharding, resharding restore, NaN guard (the learning signal of each
objective: tests/objectives)."""
import os
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import loop
from tests import helpers

pytestmark = pytest.mark.xdist_group("trainer")   # module fixtures compile multi-device steps once


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
  # No in-training eval (its fsdp=8 eval programs are checked nowhere here).
  config = helpers.tiny_mae_config(**{"total_steps": 3, "checkpoint_every": 3, "eval_every": 0,
                                      "mesh.data": 1, "mesh.fsdp": 8})
  workdir = str(tmp_path_factory.mktemp("fsdp8"))
  state = loop.train(config, workdir, mesh_lib.make_mesh(config.mesh))
  return config, workdir, state


@pytest.mark.slow
def test_params_really_sharded_under_fsdp(fsdp_run):
  _, _, state = fsdp_run
  kernel = state.params["encoder"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]   # [embed=96, mlp=384]
  assert kernel.sharding.spec[0] == "fsdp"
  assert {s.data.shape for s in kernel.addressable_shards} == {(96 // 8, 384)}
  assert len({s.device for s in kernel.addressable_shards}) == 8
  # Adam moments are sharded like their parameter.
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")["encoder"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec
  # Small 1-D params whose dim divides are sharded too; scalars replicated.
  assert state.step.sharding.is_fully_replicated


# Equality across meshes compares the MAE train step's losses, gradient norms and SGD updates
# (Adam would cancel a constant gradient scale); 4 heads so the tensor axis splits them.
_MESH_CONFIG = dict(helpers.sgd_overrides(lr=0.5), **{"model.num_heads": 4})
_MESHES = {"1": {"data": 1, "fsdp": 1, "tensor": 1}, "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
           "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.fixture(scope="module")
def step_runners():
  """One compiled MAE train step per mesh, and the single-device reference run. fsdp8 initialises
  in its own shardings, so its equality with the 1-device run also checks the sharded init; 2x2x2
  starts from the 1-device initial state (one init compile fewer)."""
  config = helpers.tiny_mae_config(**_MESH_CONFIG)
  one = helpers.StepRunner(config, mesh_lib.make_mesh(_MESHES["1"], jax.devices()[:1]))
  runners = {"1": one, "fsdp8": helpers.StepRunner(config, mesh_lib.make_mesh(_MESHES["fsdp8"])),
             "2x2x2": helpers.StepRunner(config, mesh_lib.make_mesh(_MESHES["2x2x2"]), initial=one.initial_state)}
  return runners, one.run()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp8", "2x2x2"])
def test_sharded_steps_match_single_device(step_runners, mesh):
  runners, reference = step_runners
  helpers.assert_same_training(runners[mesh].run(), reference)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp8", "2x2x2"])
def test_mesh_equality_check_sees_gradient_scale(step_runners, mesh):
  """Negative control: x2 or x1/2 gradients on the sharded mesh fail the check above."""
  runners, reference = step_runners
  helpers.assert_check_sees_gradient_scale(runners[mesh], reference)


@pytest.mark.slow
def test_data_fsdp_tensor_mesh_shards_attention_and_mlp(step_runners):
  runners, _ = step_runners
  block = runners["2x2x2"].shardings.params["encoder"]["encoder"]["layer_0"]
  assert block["attn"]["query"]["kernel"].spec == P("fsdp", "tensor", None)   # [96, 4, 24]
  assert block["attn"]["out"]["kernel"].spec == P("tensor", None, "fsdp")
  assert block["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")


@pytest.mark.slow
def test_restore_onto_a_different_mesh(fsdp_run):
  config, workdir, state = fsdp_run
  mesh1 = helpers.single_device_mesh(config)
  trainer = loop.setup(config, workdir, ckpt_lib.Checkpointer(workdir), mesh1)
  assert trainer.start_step == 3
  restored = trainer.state.params["encoder"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  assert len(restored.sharding.device_set) == 1
  assert jax.tree.structure(trainer.state.params) == jax.tree.structure(state.params)
  for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_resume_with_incompatible_config_is_a_clear_error(fsdp_run):
  config, workdir, _ = fsdp_run
  changed = helpers.tiny_mae_config(**{"total_steps": 3, "model.decoder_width": 64})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/3 does not fit this config") as e:
    loop.train(changed, workdir, helpers.single_device_mesh(changed))
  assert "\n" not in str(e.value)


def _nan_config():
  """lr 1e30: step 0's update is finite but huge, the next step's loss is not."""
  return helpers.tiny_mae_config(**{"lr": 1e30, "total_steps": 5, "checkpoint_every": 1,
                                    "async_checkpointing": False})


def _assert_no_checkpoint_after(workdir, bad_step):
  """Every checkpoint was taken before optimizer step ``bad_step`` (the first non-finite one) and
  restores to a state that never saw a non-finite step, with finite params."""
  saved = ckpt_lib.Checkpointer(workdir).manager.all_steps()
  assert saved, "the run saved no checkpoint before the non-finite step"
  for step in saved:
    assert step <= bad_step, f"checkpoint {step} written after the non-finite step {bad_step}"
    path = os.path.join(workdir, "checkpoints", str(step))
    assert int(ckpt_lib.restore_subtree(path, ("nonfinite_step",))) == -1, f"checkpoint {step}"
    params = ckpt_lib.restore_params(path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@helpers.own_xdist_group   # uses no module fixture
@pytest.mark.slow
def test_nonfinite_loss_stops_without_saving_bad_state(tmp_path):
  config = _nan_config()
  with pytest.raises(loop.NonFiniteError, match=r"at step \d") as e:
    loop.train(config, str(tmp_path), helpers.single_device_mesh(config))
  bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  assert 0 < bad_step < config.total_steps
  _assert_no_checkpoint_after(str(tmp_path), bad_step)


@helpers.own_xdist_group   # uses no module fixture
@pytest.mark.slow
def test_nonfinite_check_sees_checkpoints_after_the_bad_step(tmp_path, monkeypatch):
  """Negative control: with the loop's finiteness checks disabled (as if moved to the end of the
  run), checkpoints after the non-finite step exist and the check above fails."""
  monkeypatch.setattr(loop, "_check_finite", lambda state: None)
  config = _nan_config()
  state = loop.train(config, str(tmp_path), helpers.single_device_mesh(config))
  bad_step = int(jax.device_get(state.nonfinite_step))
  assert bad_step >= 0
  with pytest.raises(AssertionError):
    _assert_no_checkpoint_after(str(tmp_path), bad_step)


