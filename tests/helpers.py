"""Small configs and utilities shared by tests."""
import os
import subprocess
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mae_config(**overrides):
  """The tiny MAE config shrunk further: 16x16 phantoms, patch 4, 2-block decoder of width 32."""
  from configs import mae  # pylint: disable=g-import-not-at-top
  c = mae.get_config("tiny")
  c.data.image_size = 16
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 4
  c.batch_size = 16
  c.total_steps, c.warmup_steps = 6, 2
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 1000
  c.data.eval_examples, c.data.eval_batch_size = 32, 16
  return _override(c, overrides)


def tiny_dino_config(variant="tiny", **overrides):
  """The tiny DINO (or ``tiny_v2``: DINOv2) config shrunk: 16/8 px crops, 64 prototypes."""
  from configs import dino  # pylint: disable=g-import-not-at-top
  c = dino.get_config(variant)
  c.objective.ibot_out_dim, c.objective.ibot_head_hidden_dim, c.objective.ibot_head_bottleneck_dim = 48, 32, 16
  c.data.image_size = 16
  c.data.multicrop.update(global_size=16, local_size=8, num_local=2)
  c.objective.out_dim, c.objective.head_hidden_dim, c.objective.head_bottleneck_dim = 64, 32, 16
  c.objective.freeze_last_layer_steps = 2
  c.batch_size, c.total_steps, c.warmup_steps = 8, 4, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 100, 4
  c.data.eval_examples, c.data.eval_batch_size = 8, 8
  c.objective.knn_train_examples = 16
  return _override(c, overrides)


def tiny_eval_config(protocol, variant="tiny", **overrides):
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
  return _override(c, overrides)


def _override(c, overrides):
  """Sets dotted ``overrides`` (``"a.b": value``) on config ``c``; returns it."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def single_device_mesh(config):
  from medfm_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def run_cli(args, env_extra=None, timeout=600, module="medfm_jax.main"):
  """Runs ``python -m medfm_jax.main`` (or ``module``) on ONE CPU device in a fresh process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


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


def tiny_clip_config(variant="tiny", **overrides):
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
  return _override(c, overrides)


def tiny_flava_config(**overrides):
  """``configs/flava.py:tiny`` shrunk like :func:`tiny_clip_config`: 16x16 phantoms, 1-block
  ViT-Mu/4 (width 32), 1-block 32-wide text and fusion encoders, embeddings of 32, batch 16 (8
  paired, 4 image-only, 4 text-only), MIM block masks on the 4x4 patch grid."""
  from configs import flava  # pylint: disable=g-import-not-at-top
  c = flava.get_config("tiny")
  c.data.image_size = 16
  c.model.update(variant="Mu/4", width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=32)
  c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.multimodal.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.data.patch_masks.patch_size = 4
  c.batch_size, c.total_steps, c.warmup_steps = 16, 4, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 4
  c.data.eval_examples, c.data.eval_batch_size = 32, 16
  return _override(c, overrides)


def train_steps(config, mesh, n=2):
  """(losses, final host params) of ``n`` steps of the shared jitted train step on the first batch."""
  from medfm_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from medfm_jax.train import loop, state as state_lib  # pylint: disable=g-import-not-at-top
  trainer = loop.setup(config, "/unused", mesh=mesh)
  step = state_lib.jit_train_step(trainer.objective, trainer.tx, config, trainer.abstract_state)
  losses, state = [], trainer.state
  with mesh_lib.use_mesh(mesh):
    batch = mesh_lib.to_global_batch(trainer.pending_batch, mesh)
    for _ in range(n):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


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
