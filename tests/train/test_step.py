"""Train-step mechanics on a tiny deterministic objective: accumulation, optimizer, masks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medfm_jax.models import layers
from medfm_jax.objectives import base
from medfm_jax.train import optim
from medfm_jax.train import state as state_lib
from tests import helpers


class _Regression(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = layers.DenseGeneral((8,), ("embed", "mlp"), name="hidden")(x)
    return layers.DenseGeneral((1,), ("mlp", None), name="out")(jnp.tanh(h))


class _RegressionObjective(base.Objective):
  model = _Regression()

  def init(self, rng, batch):
    return self.model.init(rng, batch["x"])["params"], {}

  def loss(self, params, extra, batch, rng, step):
    pred = self.model.apply({"params": params}, batch["x"])[:, 0]
    return jnp.mean((pred - batch["y"]) ** 2), ({}, extra)


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      seed=0, total_steps=100, batch_size=16, lr=0.1, lr_scaling="none", min_lr=0.0, warmup_steps=10,
      weight_decay=0.1, weight_decay_end=None, grad_clip=1.0, grad_clip_mode="global", grad_accum_steps=1,
      optim=dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, momentum=0.9)))
  return helpers.override(c, kw)


def _batch():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 4)).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(np.sin(x.sum(1)))}


def _run_steps(config, n=3, trainable=None):
  objective = _RegressionObjective(config)
  tx = optim.make_optimizer(config, trainable)
  batch = _batch()
  _, state = state_lib._boxed_init(objective, tx, config.seed, batch)  # pylint: disable=protected-access
  step = jax.jit(state_lib.make_train_step(objective, tx, config))
  first = state
  for _ in range(n):
    state, metrics = step(state, batch)
  return first, state, metrics


def _sgd_run(grad_accum_steps, grad_scale=1.0, n=2) -> helpers.StepRun:
  """``n`` SGD steps of the library's train step; gradients x ``grad_scale`` (negative control)."""
  config = _config(grad_accum_steps=grad_accum_steps, **helpers.sgd_overrides(lr=0.5))
  objective = helpers.GradScaled(_RegressionObjective(config))
  tx = optim.make_optimizer(config)
  batch = dict(_batch(), **{helpers.GRAD_SCALE: jnp.full((16,), grad_scale)})
  _, state = state_lib._boxed_init(objective, tx, config.seed, batch)  # pylint: disable=protected-access
  step = jax.jit(state_lib.make_train_step(objective, tx, config))
  initial, losses, grad_norms = state.params, [], []
  for _ in range(n):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  return helpers.StepRun(losses, grad_norms, initial, state.params)


def test_gradient_accumulation_matches_full_batch():
  """4 microbatches give the full batch's loss, gradient norm and SGD updates: the accumulated
  gradient is the mean over microbatches, not their sum."""
  helpers.assert_same_training(_sgd_run(4), _sgd_run(1), loss_atol=1e-6, rtol=1e-5)


def test_accumulation_check_sees_gradient_scale():
  """Negative control: the check above fails when the accumulated gradients are x2 or x1/2."""
  full = _sgd_run(1)
  for scale in (2.0, 0.5):
    with pytest.raises(AssertionError):
      helpers.assert_same_training(_sgd_run(4, grad_scale=scale), full, loss_atol=1e-6, rtol=1e-5)


def test_lr_schedule_warmup_then_cosine():
  c = _config(lr=0.2, lr_scaling="linear", batch_size=512, min_lr=1e-3)
  sched = optim.lr_schedule(c)
  peak = 0.2 * 512 / 256
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(5), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(sched(10), peak, rtol=1e-6)
  np.testing.assert_allclose(sched(55), 1e-3 + (peak - 1e-3) * 0.5, rtol=1e-5)   # cosine midpoint
  np.testing.assert_allclose(sched(100), 1e-3, rtol=1e-5)
  assert optim.effective_lr(_config(lr=1.0, lr_scaling="sqrt", batch_size=4096)) == 2.0
  # optax's warmup + cosine, which the schedule writes out on traced numbers.
  for warmup, total in ((10, 100), (0, 50), (3, 3), (8, 5)):
    c = _config(lr=0.2, min_lr=1e-3, warmup_steps=warmup, total_steps=total)
    ref = optax.warmup_cosine_decay_schedule(0.0, 0.2, min(warmup, total), max(total, min(warmup, total) + 1), 1e-3)
    steps = np.arange(0, total + 3)
    np.testing.assert_allclose([optim.lr_schedule(c)(i) for i in steps], [ref(i) for i in steps], rtol=1e-5, atol=1e-9)


def _abstract(state):
  sharding = jax.sharding.NamedSharding(helpers.single_device_mesh(None), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_schedule_numbers_are_arguments_of_one_program():
  """Configs that differ only in lr, warmup, length, min lr or weight decay (start and end) lower
  to one train-step program (the trainer's ``jit_train_step``), and each run's numbers still act:
  3 steps report each config's lr, and update the parameters like the step with the numbers as
  constants. Negative control: a field that stays a constant (``grad_clip``) lowers to another
  program."""
  configs = [_config(weight_decay=0.04, weight_decay_end=0.4),
             _config(lr=0.03, warmup_steps=1, total_steps=4, min_lr=1e-3, weight_decay=0.2, weight_decay_end=0.1),
             _config(weight_decay=0.04, weight_decay_end=0.4, grad_clip=0.5)]
  objective, batch = _RegressionObjective(configs[0]), _batch()
  _, initial = state_lib._boxed_init(objective, optim.make_optimizer(configs[0]), 0, batch)  # pylint: disable=protected-access
  steps = [state_lib.jit_train_step(objective, optim.make_optimizer(c), c, _abstract(initial)) for c in configs]
  programs = [step.lower(initial, batch).as_text() for step in steps]
  assert programs[0] == programs[1] and programs[0] != programs[2]
  for config, step in zip(configs[:2], steps):
    state = jax.tree.map(jnp.copy, initial)   # the step donates it
    for i in range(3):
      state, metrics = step(state, batch)
      np.testing.assert_allclose(metrics["lr"], optim.lr_schedule(config)(i), rtol=1e-6)
  constants = jax.jit(state_lib.make_train_step(objective, optim.make_optimizer(configs[1]), configs[1]))
  ref = initial
  for _ in range(3):
    ref, _ = constants(ref, batch)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_only_on_kernels():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "attn": {"query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))}},
            "cls_token": jnp.ones((1, 1, 4)), "norm": {"scale": jnp.ones((4,))}}
  mask = optim.decay_mask(params)
  assert mask["dense"] == {"kernel": True, "bias": False}
  assert mask["attn"]["query"] == {"kernel": True, "bias": False}     # 2-D q bias: no decay
  assert mask["cls_token"] is False and mask["norm"]["scale"] is False
  # With zero gradients, only kernels shrink (decoupled decay), everything else stays.
  tx = optim.make_optimizer(_config(grad_clip=0.0, warmup_steps=0))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new["dense"]["kernel"][0, 0]) < 1.0 and float(new["attn"]["query"]["kernel"][0, 0, 0]) < 1.0
  assert float(new["dense"]["bias"][0]) == 1.0 and float(new["cls_token"][0, 0, 0]) == 1.0


def test_frozen_params_get_no_update_no_decay_no_state():
  trainable = lambda p: {"hidden": jax.tree.map(lambda _: False, p["hidden"]),
                         "out": jax.tree.map(lambda _: True, p["out"])}
  first, state, _ = _run_steps(_config(), trainable=trainable)
  for a, b in zip(jax.tree.leaves(first.params["hidden"]), jax.tree.leaves(state.params["hidden"])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(first.params["out"]["kernel"], state.params["out"]["kernel"])
  state_bytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s.opt_state))
  _, full_state, _ = _run_steps(_config(), n=1)
  assert state_bytes(full_state) - state_bytes(state) == 2 * 4 * (4 * 8 + 8)   # no Adam mu/nu for "hidden"


def test_nonfinite_step_leaves_state_unchanged():
  config = _config()
  objective = _RegressionObjective(config)
  tx = optim.make_optimizer(config)
  batch = dict(_batch(), y=jnp.full((16,), jnp.nan))
  _, state = state_lib._boxed_init(objective, tx, 0, batch)  # pylint: disable=protected-access
  new, _ = jax.jit(state_lib.make_train_step(objective, tx, config))(state, batch)
  assert int(new.nonfinite_step) == 0 and int(new.step) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(a, b)


def test_weight_decay_cosine_schedule():
  sched = optim.weight_decay_schedule(_config(weight_decay=0.04, weight_decay_end=0.4, total_steps=100))
  np.testing.assert_allclose([sched(0), sched(50), sched(100), sched(200)], [0.04, 0.22, 0.4, 0.4], rtol=1e-6)
  assert optim.weight_decay_schedule(_config(weight_decay=0.05)) == 0.05


def test_per_param_clipping_clips_each_tensor_independently():
  grads = {"big": jnp.full((4,), 10.0), "small": jnp.full((4,), 0.1)}     # norms 20 and 0.2
  clipped, _ = optim.clip_per_param(3.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(np.linalg.norm(clipped["big"]), 3.0, rtol=1e-5)
  np.testing.assert_array_equal(clipped["small"], grads["small"])
  tx = optim.make_optimizer(_config(grad_clip=3.0, grad_clip_mode="per_param"))
  assert tx.update(grads, tx.init(grads), grads)[0]["big"].shape == (4,)


def test_frozen_for_steps_and_lr_multipliers():
  params = {"body": {"kernel": jnp.ones((2, 2))}, "last_layer": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  mask = lambda p: {"body": {"kernel": False}, "last_layer": {"kernel": True}}
  half = lambda p: {"body": {"kernel": 0.5}, "last_layer": {"kernel": 1.0}}
  config = _config(grad_clip=0.0, warmup_steps=0)
  tx = optim.make_optimizer(config, frozen_for_steps=(mask, 2), lr_multipliers=half)
  ref = optim.make_optimizer(config)
  state, ref_state = tx.init(params), ref.init(params)
  for step in range(3):
    upd, state = tx.update(grads, state, params)
    ref_upd, ref_state = ref.update(grads, ref_state, params)
    np.testing.assert_allclose(upd["body"]["kernel"], 0.5 * ref_upd["body"]["kernel"], rtol=1e-6)
    if step < 2:     # no update and no weight decay while frozen
      np.testing.assert_array_equal(upd["last_layer"]["kernel"], 0.0)
    else:
      np.testing.assert_allclose(upd["last_layer"]["kernel"], ref_upd["last_layer"]["kernel"], rtol=1e-6)
