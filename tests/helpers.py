"""Small configs and utilities shared by tests."""
import dataclasses
import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.data import pipeline
from medfm_jax.train import assemble
from medfm_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mae_config(allow_new=(), **overrides):
  """The tiny MAE config shrunk further: 16x16 phantoms, patch 4, 2 encoder blocks, a 1-block
  decoder of width 32."""
  from configs import mae  # pylint: disable=g-import-not-at-top
  c = mae.get_config("tiny")
  c.model.depth = 2
  c.data.image_size = 16
  c.data.lesion_scale = 1.0     # the phantoms the MAE scenarios' spreads were measured on
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 4
  c.batch_size = 16
  c.total_steps, c.warmup_steps = 6, 2
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 1000
  c.data.eval_examples, c.data.eval_batch_size = 32, 16
  c.objective.knn_train_examples = 0   # no frozen-feature monitor (the learning test sets its own)
  return override(c, overrides, allow_new)


def tiny_dino_config(variant="tiny", allow_new=(), **overrides):
  """The tiny DINO (or ``tiny_v2``: DINOv2) config shrunk: 2 ViT-Mu/4 blocks, 16/8 px crops, 64
  prototypes."""
  from configs import dino  # pylint: disable=g-import-not-at-top
  c = dino.get_config(variant)
  c.model.depth = 2
  c.objective.ibot_out_dim, c.objective.ibot_head_hidden_dim, c.objective.ibot_head_bottleneck_dim = 48, 32, 16
  c.data.image_size = 16
  c.data.multicrop.update(global_size=16, local_size=8, num_local=2)
  c.objective.out_dim, c.objective.head_hidden_dim, c.objective.head_bottleneck_dim = 64, 32, 16
  c.objective.freeze_last_layer_steps = 2
  c.batch_size, c.total_steps, c.warmup_steps = 8, 4, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 100, 4
  c.data.eval_examples, c.data.eval_batch_size = 8, 8
  c.objective.knn_train_examples = 16
  return override(c, overrides, allow_new)


def tiny_eval_config(protocol, variant="tiny", allow_new=(), **overrides):
  """``configs/eval/PROTOCOL.py:VARIANT`` shrunk: 16x16 phantoms, 256 feature-bank / 64 test
  images, 4 fine-tuning steps of batch 16."""
  import importlib  # pylint: disable=g-import-not-at-top
  c = importlib.import_module(f"configs.eval.{protocol}").get_config(variant)
  c.data.image_size = 16
  c.data.eval_examples, c.data.eval_batch_size = 64, 32
  c.features.train_examples, c.features.batch_size = 256, 64
  c.probe.epochs, c.probe.batch_size = 30, 64
  c.fewshot.seeds = 2
  c.batch_size, c.total_steps, c.warmup_steps = 16, 4, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 1000
  return override(c, overrides, allow_new)


def random_params(abstract, seed=0, std=0.05):
  """Numpy float32 params shaped like the (boxed) ``abstract`` tree, without compiling an init:
  norm scales ``1 + std * N(0, 1)``, every other leaf ``std * N(0, 1)`` (non-trivial everywhere,
  for parity tests)."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    x = std * rng.normal(size=leaf.shape).astype(np.float32)
    return x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x
  return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract))


def override(c, overrides, allow_new=()):
  """Sets dotted ``overrides`` (``"a.b": value``) on config ``c`` with
  ``configs.common.apply_overrides``: a misspelled key fails instead of adding a field; keys in
  ``allow_new`` may be created. Returns ``c``."""
  common.apply_overrides(c, overrides, allow_new)
  return c


def single_device_mesh(config):
  return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def own_xdist_group(test):
  """Puts ``test`` in an xdist group of its own (xdist joins it with the module's group name), so
  that ``-n 2`` can run a long test that uses none of its module's fixtures on the other worker
  instead of after the module's group."""
  return pytest.mark.xdist_group(f"{test.__module__}.{test.__name__}")(test)


def xdist_group_of(test, module_group):
  """Puts the decorated test in the xdist group of ``test``, a test marked :func:`own_xdist_group`
  in a module whose group is ``module_group``: ``-n 2`` then runs both on one worker, one after
  the other. For a test that reuses ``test``'s compiled programs (from the persistent cache),
  which it would otherwise compile at the same time on the other worker."""
  def mark(other):
    for name in (module_group, f"{test.__module__}.{test.__name__}"):
      other = pytest.mark.xdist_group(name)(other)
    return other
  return mark


def subprocess_env(devices=None, env_extra=None):
  """``os.environ`` for a fresh process: the repo first on ``PYTHONPATH``, conftest's XLA flags
  but one CPU device (``devices``: that many fake ones) instead of its 8, then ``env_extra``."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(env_extra or {})
  return env


NO_FINAL_EVAL = "--config.final_eval.config="   # the train CLI without its closing table

# XLA's default CPU optimisation level (production's), which the tests' XLA_FLAGS lower to 0
# (tests/conftest.py): compiler options for the checks that compare the two.
PRODUCTION_XLA = {"xla_backend_optimization_level": 3}

# The tiny MAE of the CLI tests that only need *a* training run (resume, sweeps): 16 px, batch 16,
# 2 encoder blocks, a 1-block decoder of width 32, 8 steps, no frozen-feature monitor. Their
# processes then compile the same programs (one compile, then hits in the persistent cache
# conftest.py sets up), whatever else they vary: logging, checkpointing, data-only fields, and the
# schedule's numbers (lr, warmup, total steps: arguments of the compiled step,
# train.state.jit_train_step).
TINY_MAE_CLI = {"data.image_size": 16, "batch_size": 16, "model.depth": 2, "model.decoder_width": 32,
                "model.decoder_depth": 1, "total_steps": 8, "warmup_steps": 2,
                "data.eval_examples": 16, "data.eval_batch_size": 16, "objective.knn_train_examples": 0}


def run_cli(args, env_extra=None, timeout=600, module="medfm_jax.main", devices=None, cwd=REPO):
  """Runs ``python -m medfm_jax.main`` (or ``module``) on ONE CPU device (``devices``: that many
  fake ones) in a fresh process, in the folder ``cwd``; the train CLI skips its closing table
  (``final_eval``) unless an argument sets it."""
  if module in ("medfm_jax.main", "tests.crash_main") and not any("final_eval" in a for a in args) \
      and any(a.startswith("--config=") for a in args):
    args = [*args, NO_FINAL_EVAL]
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=subprocess_env(devices, env_extra), capture_output=True, text=True,
                        timeout=timeout)


def read_metrics(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  """Two lists of batches (dicts of arrays) are bitwise equal."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def assert_process_rows(make_iterator, global_batch: int, process_count: int = 2, num_batches: int = 2):
  """Each process's batches are its contiguous rows ``[p*b, (p+1)*b)`` of the 1-process batches.

  ``make_iterator(process_index, process_count)`` builds the train iterator.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  glob = take(make_iterator(0, 1), num_batches)
  b = global_batch // process_count
  for p in range(process_count):
    for g, local in zip(glob, take(make_iterator(p, process_count), num_batches)):
      for k in g:
        assert local[k].shape[0] == b
        np.testing.assert_array_equal(local[k], g[k][p * b:(p + 1) * b])


def assert_restore_reproduces(make_iterator, skip: int, check: int):
  """After ``skip`` batches, a fresh iterator given the (JSON round-tripped) state yields the
  same next ``check`` batches bitwise."""
  import json  # pylint: disable=g-import-not-at-top
  it = make_iterator()
  take(it, skip)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, check)
  fresh = make_iterator()
  fresh.set_state(state)
  assert_batches_equal(take(fresh, check), expected)


def tiny_clip_config(variant="tiny", allow_new=(), **overrides):
  """``configs/clip.py:tiny`` shrunk: 16x16 phantoms, 2-block ViT-Mu/4 and 1-block 32-wide text
  tower, embeddings of 32, batch 16."""
  from configs import clip  # pylint: disable=g-import-not-at-top
  c = clip.get_config(variant)
  c.data.image_size = 16
  c.model.variant = "Mu/4"
  c.model.depth, c.model.embed_dim = 2, 32
  c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.batch_size, c.total_steps, c.warmup_steps = 16, 4, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 4
  c.data.eval_examples, c.data.eval_batch_size = 32, 16
  return override(c, overrides, allow_new)


def tiny_flava_config(allow_new=(), **overrides):
  """``configs/flava.py:tiny`` shrunk like :func:`tiny_clip_config`: 16x16 phantoms, 1-block
  ViT-Mu/4 (width 32), 1-block 32-wide text and fusion encoders, embeddings of 32, batch 16 (8
  paired, 4 image-only, 4 text-only), MIM block masks on the 4x4 patch grid."""
  from configs import flava  # pylint: disable=g-import-not-at-top
  c = flava.get_config("tiny")
  c.data.image_size = 16
  # HF FLAVA's plain patchify tower (parity, init from HF), on which the learning scenario's seed
  # spread was measured; the tiny recipe's conv stem / max pool / LayerScale are tested in
  # tests/models/test_flava.py.
  c.model.update(patch_embed="patch", cls_pool="token", layer_scale_init=0.0)
  c.model.update(variant="Mu/4", width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=32)
  c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.multimodal.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.data.patch_masks.patch_size = 4
  c.batch_size, c.total_steps, c.warmup_steps = 16, 4, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 4
  c.data.eval_examples, c.data.eval_batch_size = 32, 16
  return override(c, overrides, allow_new)


GRAD_SCALE = "_grad_scale"   # batch key: per-row gradient multiplier read by GradScaled


class GradScaled:
  """An objective whose gradients are ``mean(batch[GRAD_SCALE])`` times the wrapped one's while
  its loss value is unchanged (exactly, at scale 1): the negative control for the checks that
  compare runs, since a psum-instead-of-mean or sum-instead-of-mean bug scales the gradients,
  not the loss. The scale is data, so scaled and unscaled runs share one compiled step."""

  def __init__(self, objective):
    self._objective = objective

  def __getattr__(self, name):
    return getattr(self._objective, name)

  def loss(self, params, extra, batch, rng, step):
    batch = dict(batch)
    scale = jnp.mean(batch.pop(GRAD_SCALE))
    loss, aux = self._objective.loss(params, extra, batch, rng, step)
    return loss + (scale - 1.0) * (loss - jax.lax.stop_gradient(loss)), aux


def sgd_overrides(lr=0.1):
  """Overrides that make parameter updates proportional to the gradients: plain SGD (no
  momentum, clipping, weight decay or warmup) at a constant ``lr``, so a gradient-scale bug moves
  the parameters instead of being cancelled by Adam's normalisation."""
  return {"optim.name": "sgd", "optim.momentum": 0.0, "lr": lr, "lr_scaling": "none",
          "warmup_steps": 0, "min_lr": lr, "grad_clip": 0.0, "weight_decay": 0.0,
          "weight_decay_end": None}


@dataclasses.dataclass
class StepRun:
  """Per-step losses, gradient norms and metrics of a few train steps, the host params before and
  after, and the final (sharded) train state."""
  losses: list
  grad_norms: list
  initial: Any
  params: Any
  metrics: list = dataclasses.field(default_factory=list)
  state: Any = None

  def updates(self):
    return jax.tree.map(np.subtract, self.params, self.initial)


class StepRunner:
  """The run's train step (``train.assemble``; the objective wrapped in :class:`GradScaled`) on
  its first train batch and initial state, compiled once per (config, mesh); :meth:`run` can
  scale the gradients. ``initial``: a host train state to start from (another runner's
  ``initial_state`` of the same config) instead of compiling this mesh's init; a multi-device
  runner compared with a 1-device one then compiles only its step. ``compiler_options``: XLA's
  options for the step's compile (e.g. its optimisation level)."""

  def __init__(self, config, mesh, initial=None, compiler_options=None):
    assembly = assemble.assemble(config, mesh)
    self.config, self.mesh, self.objective = config, mesh, assembly.objective
    self.shardings = assembly.state_shardings   # of the TrainState
    self._initial = jax.device_get(assembly.init_state()) if initial is None else initial
    iterator = pipeline.make_train_iterator(assembly.data, config.batch_size, config.seed)
    self._batch = next(iterator)
    if hasattr(iterator, "close"):
      iterator.close()
    self._step = state_lib.jit_train_step(GradScaled(assembly.objective), assembly.tx, config,
                                          assembly.abstract_state)
    self._compiler_options, self._compiled = compiler_options, None

  @property
  def initial_state(self):
    return self._initial

  def _call_step(self, state, batch):
    if self._compiler_options is None:
      return self._step(state, batch)
    if self._compiled is None:
      self._compiled = self._step.lower(state, batch).compile(compiler_options=self._compiler_options)
    return self._compiled(state, batch, self._step.schedule)

  def run(self, n=2, grad_scale=1.0) -> StepRun:
    rows = len(jax.tree.leaves(mesh_lib.drop_non_numeric(self._batch))[0])
    local = dict(self._batch, **{GRAD_SCALE: np.full((rows,), grad_scale, np.float32)})
    history = []
    with mesh_lib.use_mesh(self.mesh):
      batch = mesh_lib.to_global_batch(local, self.mesh)
      state = jax.device_put(self._initial, self.shardings)
      for _ in range(n):
        state, metrics = self._call_step(state, batch)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return StepRun([m["loss"] for m in history], [m["grad_norm"] for m in history],
                   self._initial.params, jax.device_get(state.params), history, state)


def sharded_and_reference_runs(config, mesh_shape):
  """``config``'s step compiled on a mesh of ``mesh_shape`` (a :class:`StepRunner` started from the
  1-device runner's initial state: the sharded init is tested in tests/train/test_trainer.py), and
  the 1-device reference run."""
  one = StepRunner(config, single_device_mesh(config))
  sharded = StepRunner(config, mesh_lib.make_mesh(mesh_shape), initial=one.initial_state)
  return sharded, one.run()


def assert_same_training(run: StepRun, ref: StepRun, loss_atol=1e-5, rtol=1e-4):
  """Same losses, same gradient norms (relative ``rtol``) and the same parameter updates (to
  ``rtol`` x the largest update) in every leaf; the updates must not be all zero."""
  np.testing.assert_allclose(run.losses, ref.losses, atol=loss_atol, err_msg="losses")
  np.testing.assert_allclose(run.grad_norms, ref.grad_norms, rtol=rtol, err_msg="grad_norm")
  got, want = run.updates(), ref.updates()
  assert jax.tree.structure(got) == jax.tree.structure(want)
  largest = max(float(np.abs(u).max()) for u in jax.tree.leaves(want))
  assert largest > 1e-4, f"the steps barely moved the params (largest update {largest:.3g})"
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=rtol * largest, err_msg=jax.tree_util.keystr(path))


def assert_check_sees_gradient_scale(runner: StepRunner, ref: StepRun, **tolerances):
  """Negative control: gradients x2 and x1/2 in ``runner`` make :func:`assert_same_training`
  against ``ref`` fail."""
  for scale in (2.0, 0.5):
    with pytest.raises(AssertionError):
      assert_same_training(runner.run(len(ref.losses), grad_scale=scale), ref, **tolerances)


def tiny_flava_model(scan=False, **overrides):
  """A tiny :class:`medfm_jax.models.flava.Flava`: 16x16x3 images (ViT patch 4, width 32, 1 block,
  LN eps 1e-12), 1-block 32-wide bidirectional text tower (context 12, vocab 50, pad 0), 1-block
  fusion encoder, 24-d embeddings, image vocab 48 (= 4*4*3 pixels) and text vocab 50."""
  from medfm_jax.models import flava, text, vit  # pylint: disable=g-import-not-at-top
  image = vit.VisionTransformer(variant="Mu/4", width=32, depth=1, num_heads=2, mlp_dim=64,
                                image_size=16, pos_embed="learned", mask_token=True,
                                layer_norm_eps=1e-12, scan=scan)
  tower = text.TextTransformer(width=32, depth=1, num_heads=2, mlp_dim=64, context_length=12,
                               vocab_size=50, causal=False, pooling="cls", eot_id=-1, pad_id=0,
                               activation="gelu", layer_norm_eps=1e-12, embed_norm=True, scan=scan)
  kwargs = dict(mm_width=32, mm_depth=1, mm_heads=2, mm_mlp_dim=64, embed_dim=24, image_vocab=48,
                text_vocab=50)
  return flava.Flava(image, tower, **(kwargs | overrides))
