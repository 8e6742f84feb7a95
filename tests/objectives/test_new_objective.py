r"""Adding an objective takes one module and one config: this file is both, and nothing outside it
names the new objective.

``RotationObjective`` (predict which of ``objective.num_rotations`` quarter turns was applied to a
phantom) is declared here: its config checks (``check_config``), where its checkpoints keep the
image encoder (``image_encoders``) and its loss. ``get_config`` makes this file a config file too:

  python -m medfm_jax.main --config=tests/objectives/test_new_objective.py --workdir=runs/rotation
  python -m medfm_jax.evaluate --config=configs/eval/linear_probe.py:tiny \
      --config.init_from=runs/rotation --workdir=runs/eval/linear_probe_rotation

``objective.name`` is this class's import path; the checkpoint saves it with the config, which is
how the evaluation CLI (another process) finds the encoder again.
"""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402  (this file is also loaded by path, as a config file)
from medfm_jax import config as config_lib  # noqa: E402
from medfm_jax.errors import check  # noqa: E402
from medfm_jax.models import heads, vit  # noqa: E402
from medfm_jax.objectives import base  # noqa: E402
from tests import helpers  # noqa: E402

NAME = "tests.objectives.test_new_objective:RotationObjective"


class RotationModel(nn.Module):
  """``images [b, H, W, C]`` -> rotation logits ``[b, num_rotations]``."""
  backbone: vit.VisionTransformer
  head: heads.ClassifierHead

  def __call__(self, images, deterministic: bool = True):
    return self.head(self.backbone(images, deterministic=deterministic), self.backbone.num_prefix_tokens)


class RotationObjective(base.Objective):
  """Rotation prediction (Gidaris et al., 2018). ``config.objective``: num_rotations (2 or 4)."""
  image_encoders = {"backbone": ("params", "backbone")}

  @classmethod
  def check_config(cls, config):
    n = config.objective.num_rotations
    check(n in (2, 4), f"objective.num_rotations={n!r}: allowed 2 (0/180 degrees) or 4 (quarter turns)")

  def __init__(self, config, encoder_loader=None):
    super().__init__(config, encoder_loader)
    self.num_rotations = config.objective.num_rotations
    backbone = vit.vit_from_config(config)
    self.model = RotationModel(backbone, heads.ClassifierHead(self.num_rotations, "cls", 0.01,
                                                              backbone.layer_norm_eps, backbone.dtype))

  def _rotated(self, images, rng):
    """(images each turned by a random multiple of 360/num_rotations degrees, that multiple)."""
    k = jax.random.randint(rng, (images.shape[0],), 0, self.num_rotations)
    step = 4 // self.num_rotations
    turns = jnp.stack([jnp.rot90(images, i * step, axes=(1, 2)) for i in range(self.num_rotations)])
    return turns[k, jnp.arange(images.shape[0])], k

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"][:1])["params"], {}

  def loss(self, params, extra, batch, rng, step):
    del step
    rot_rng, drop_rng = jax.random.split(rng)
    images, k = self._rotated(batch["image"], rot_rng)
    logits = self.model.apply({"params": params}, images, deterministic=False, rngs={"dropout": drop_rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, k).mean()
    return loss, ({"rotation_accuracy": (logits.argmax(-1) == k).mean()}, extra)

  def eval_metrics(self, params, extra, batch, rng):
    del extra
    images, k = self._rotated(batch["image"], rng)
    hit = (self.model.apply({"params": params}, images).argmax(-1) == k).astype(jnp.float32)
    return {"rotation_accuracy": base.masked_sum(hit, batch["mask"])}


def get_config(arg: str | None = None):
  """Tiny rotation pretraining on 16x16 phantoms (a ViT-Mu/4 with 2 blocks, 10 steps)."""
  variant, overrides = common.parse_arg(arg, default_variant="tiny")
  if variant != "tiny":
    raise ValueError(f"{__file__}: unknown variant {variant!r}; allowed: tiny")
  c = common.base_config()
  c.objective.name = NAME
  c.objective.num_rotations = 4
  c.model.variant, c.model.depth = "Mu/4", 2
  c.model.width = c.model.num_heads = c.model.mlp_dim = 0
  c.data.image_size, c.data.channels = 16, 1
  c.data.eval_examples, c.data.eval_batch_size = 32, 32
  c.batch_size, c.lr, c.lr_scaling = 32, 1e-3, "none"
  c.total_steps, c.warmup_steps = 10, 2
  c.log_every, c.eval_every, c.checkpoint_every = 5, 10, 10
  common.apply_overrides(c, overrides)
  return c


def test_config_checks_are_the_objectives_own():
  config_lib.validate(get_config(), None, 1)
  with pytest.raises(config_lib.ConfigError, match=r"^objective.num_rotations=3: allowed 2") as e:
    config_lib.validate(get_config("objective.num_rotations=3"), None, 1)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_with_main_then_linear_probe_with_evaluate(tmp_path):
  """The objective trains through ``python -m medfm_jax.main`` and its checkpoint's encoder is
  restored by ``python -m medfm_jax.evaluate`` in a fresh process, from the saved import path."""
  workdir, eval_dir = tmp_path / "rotation", tmp_path / "probe"
  train = helpers.run_cli([f"--config={os.path.relpath(__file__, helpers.REPO)}", f"--workdir={workdir}"],
                          timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  evals = [m for m in helpers.read_metrics(workdir) if "eval/rotation_accuracy" in m]
  assert [m["step"] for m in evals] == [0, 10]
  assert json.loads((workdir / "config.json").read_text())["objective"]["name"] == NAME

  probe = helpers.run_cli(["--config=configs/eval/linear_probe.py:tiny", f"--config.init_from={workdir}",
                           f"--workdir={eval_dir}", "--config.data.image_size=16",
                           "--config.features.train_examples=128", "--config.features.batch_size=64",
                           "--config.data.eval_examples=64", "--config.data.eval_batch_size=64",
                           "--config.probe.epochs=5", "--config.probe.batch_size=64"],
                          module="medfm_jax.evaluate", timeout=300)
  assert probe.returncode == 0, probe.stderr[-3000:]
  assert f"restored {NAME} image encoder params/backbone from {workdir}" in probe.stderr
  results = json.loads((eval_dir / "results.json").read_text())
  assert results["protocol"] == "linear_probe" and results["metrics"]["num_examples"] == 64
