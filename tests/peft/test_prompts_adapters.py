"""Prompt tokens and bottleneck adapters: defaults keep the ViT unchanged; adapters start as the
identity (outputs equal the base model's); trainable masks select them (+ head)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import vit
from medfm_jax.parallel import programs
from medfm_jax.peft import freeze
from medfm_jax.peft.lora import path_str
from tests.helpers import random_params


def _model(**kw):
  return vit.VisionTransformer(**dict(dict(variant="Mu/4", image_size=16, depth=2), **kw))


def _init(model, x):
  return nn.unbox(programs.jit_once(model.init)(jax.random.PRNGKey(0), x)["params"])


def _abstract(model, x):
  return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"])


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, x):
  return model.apply({"params": params}, x)


def _paths(tree):
  return {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def base():
  x = np.random.default_rng(1).standard_normal((2, 16, 16, 1)).astype(np.float32)
  params = random_params(_abstract(_model(), x))   # numpy: no init to compile
  return x, params, _apply(_model(), params, x)


def test_defaults_keep_tree_and_outputs(base):
  x, params, out = base
  explicit = _model(num_prompts=0, adapter_dim=0)
  assert _paths(_abstract(explicit, x)) == _paths(params)
  np.testing.assert_array_equal(_apply(explicit, params, x), out)


@pytest.mark.parametrize("where,keys", [("both", {"adapter_attn", "adapter_mlp"}), ("mlp", {"adapter_mlp"})])
def test_adapters_start_as_identity(base, where, keys):
  x, params, out = base
  model = _model(adapter_dim=8, adapter_where=where)
  adapted = _init(model, x)   # the adapters' own init: they start as the identity
  new = _paths(adapted) - _paths(params)
  assert {p.split("/")[2] for p in new} == keys and len(new) == 2 * 4 * len(keys)   # 2 blocks x {down, up} x {kernel, bias}
  merged = jax.tree_util.tree_map_with_path(
      lambda p, v: v if path_str(p) in new else _lookup(params, path_str(p)), adapted)
  np.testing.assert_array_equal(_apply(model, merged, x), out)
  mask = freeze.only_keys({"backbone": adapted, "head": {"kernel": jnp.ones(2)}}, freeze.PEFT_KEYS["adapter"])
  trains = {path_str(p) for p, t in jax.tree_util.tree_leaves_with_path(mask) if t}
  assert trains == {f"backbone/{p}" for p in new} | {"head/kernel"}


def _lookup(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_prompts_are_prepended_after_cls(base):
  x, params, _ = base
  model = _model(num_prompts=3)
  prompted = random_params(_abstract(model, x))
  assert _paths(prompted) - _paths(params) == {"prompts"} and prompted["prompts"].shape == (1, 3, 96)
  out = _apply(model, prompted, x)
  assert out.shape == (2, 1 + 3 + 16, 96) and model.num_prefix_tokens == 4
  with pytest.raises(ValueError, match="no parameter under"):
    freeze.only_keys({"backbone": params, "head": {"k": jnp.ones(2)}}, freeze.PEFT_KEYS["prompt"])
  assert freeze.layer_id(["backbone", "prompts"], 2) == 0
