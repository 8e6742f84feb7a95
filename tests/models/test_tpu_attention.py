"""The TPU flash-attention path (``models/tpu_attention.py``) against XLA's attention, run in
Pallas' TPU interpret mode on CPU: sequence padding, key masks, causal masking, gradients; and its
shard_map under a data × fsdp × tensor mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P

from medfm_jax import config as config_lib
from medfm_jax.errors import ConfigError
from medfm_jax.models import layers, tpu_attention
from medfm_jax.parallel import mesh as mesh_lib
from tests import helpers

B, N, H, D = 2, 130, 2, 8      # 130 tokens: padded to 256, two key blocks of 128
_LENGTHS = jnp.array([97, 130])  # kept keys per example


def _inputs():
  q, k, v, w = (jax.random.normal(key, (B, N, H, D)) for key in jax.random.split(jax.random.key(0), 4))
  return q, k, v, w


def _run(impl, mask, causal):
  """(output, dq, dk, dv) of a weighted sum of the attention output."""
  q, k, v, w = _inputs()

  def loss(q, k, v):
    out = layers.dot_product_attention(q, k, v, mask, causal, impl)
    return (out * w).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return (out, *grads)


@pytest.mark.parametrize("case", ["key_mask", "causal"])
def test_pallas_matches_xla_forward_and_gradients(case):
  mask = (jnp.arange(N)[None] < _LENGTHS[:, None])[:, None, None, :] if case == "key_mask" else None
  with pltpu.force_tpu_interpret_mode():
    ours = _run("pallas", mask, case == "causal")
  reference = _run(None, mask, case == "causal")
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)   # measured <= 1.2e-6
  if case == "key_mask":   # the masked keys get no gradient
    assert not np.asarray(ours[2][0, int(_LENGTHS[0]):]).any()


def test_padded_keys_would_change_the_output(monkeypatch):
  """Negative control: with the padding's keys visible (kv segment ids all 1) the kernel no
  longer equals XLA's attention, so the test above checks the padding."""
  segment_ids = tpu_attention._segment_ids  # pylint: disable=protected-access

  def visible_padding(*args):
    ids = segment_ids(*args)
    return ids._replace(kv=jnp.ones_like(ids.kv))
  monkeypatch.setattr(tpu_attention, "_segment_ids", visible_padding)
  q, k, v, _ = _inputs()
  with pltpu.force_tpu_interpret_mode():
    ours = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, implementation="pallas"))(q, k, v)
  assert np.abs(ours - jax.nn.dot_product_attention(q, k, v)).max() > 0.05


def _segment_attention(q, k, v, q_seg, kv_seg, is_causal, bq, bk):  # pylint: disable=unused-argument
  """The kernel's contract in XLA ops, on padded ``[b, h, n, d]`` shards: attend where the query's
  and the key's segment ids are equal."""
  mask = (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  out = jax.nn.dot_product_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), mask=mask,
                                     is_causal=is_causal)
  return out.transpose(0, 2, 1, 3)


def test_sharded_over_batch_and_heads_equals_one_device(monkeypatch):
  """Under a 2×2×2 mesh the kernel runs per shard (shard_map over the batch and head axes) and
  the layer gives the unsharded output. The kernel is replaced by its contract in XLA ops here:
  Pallas' TPU interpret mode simulates all 8 devices in lockstep and stalls on 2 CPU cores. The
  sharded kernel itself is compiled for a v5p slice in tests/parallel/test_plan.py."""
  monkeypatch.setattr(tpu_attention, "_flash", _segment_attention)
  att, xla = layers.Attention(num_heads=H, implementation="pallas"), layers.Attention(num_heads=H)
  x = jax.random.normal(jax.random.key(1), (4, N, H * D))
  params = xla.init(jax.random.key(2), x)           # the same params, whichever attention runs
  mesh = jax.make_mesh((2, 2, 2), mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  apply = jax.jit(att.apply)
  single = apply(params, x)
  with mesh_lib.use_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    sharded = apply(params, xs)
    program = apply.lower(params, xs).as_text()
  assert "manual_computation" in program and '"tensor"' in program
  assert sharded.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(sharded, single, atol=1e-6)
  np.testing.assert_allclose(single, xla.apply(params, x), atol=1e-5)


def test_refusals_are_one_line():
  with pytest.raises(ValueError, match=r"takes key-padding masks \[b, 1, 1, keys\], got a mask of "
                                       r"shape \(2, 1, 5, 5\); use 'xla'"):
    tpu_attention.key_padding_mask(jnp.ones((2, 1, 5, 5), bool), 2, 5)
  config = helpers.tiny_mae_config(**{"model.attention_impl": "pallas"})
  with pytest.raises(ConfigError, match="model.attention_impl='pallas' .* needs a TPU; this run is for cpu"):
    config_lib.validate(config)
  with tpu_attention.target_platform("tpu"):
    config_lib.validate(config)                       # compiling for a TPU (the planner)
  assert tpu_attention.target() == "cpu"
