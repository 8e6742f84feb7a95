"""AOT planning on fake devices: per-device bytes, FLOPs, collectives (nothing executed)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax import plan
from medfm_jax.models import layers
from tests import helpers

# helpers.tiny_mae_config's model (the in-process plan below) on the command line.
_TINY = ["--config=configs/mae.py:tiny", "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.depth=2", "--config.model.decoder_width=32", "--config.model.decoder_depth=1"]


@pytest.mark.slow
def test_fsdp_splits_state_8_ways_and_keeps_flops(tmp_path):
  out = tmp_path / "plan.jsonl"
  cli = subprocess.run([sys.executable, "-m", "medfm_jax.plan", *_TINY, "--devices=8",
                        "--config.mesh.data=1", "--config.mesh.fsdp=-1", f"--json={out}"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                       env=helpers.subprocess_env())
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert "| Mu/4 | 1×8×1 | 16 |" in cli.stdout           # the Markdown row
  fsdp = json.loads(out.read_text())
  assert fsdp["devices"] == 8 and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}

  dp = plan.plan(helpers.tiny_mae_config(**{"mesh.data": 8}))     # in-process: conftest's 8 devices
  ratio = fsdp["params_gib"] / dp["params_gib"]
  assert 1 / 8 <= ratio < 1 / 7, ratio           # replicated: biases/norms too small to split
  assert fsdp["opt_state_gib"] / dp["opt_state_gib"] < 1 / 7
  np.testing.assert_allclose(fsdp["tflop_per_step"], dp["tflop_per_step"], rtol=1e-6)
  accum = plan.plan(helpers.tiny_mae_config(**{"mesh.data": 8, "grad_accum_steps": 2}))
  np.testing.assert_allclose(accum["tflop_per_step"], dp["tflop_per_step"], rtol=1e-6)  # both microbatches
  for r in (fsdp, dp):   # state + batch = the compiled program's (donated) arguments
    np.testing.assert_allclose(r["params_gib"] + r["opt_state_gib"] + r["other_state_gib"]
                               + r["batch_gib"], r["argument_gib"], rtol=0, atol=2 ** -20)  # 1 KiB
    assert r["temp_gib"] > 0 and r["total_gib"] > r["argument_gib"] and r["fits"]
  # data parallel all-reduces the full gradients; fsdp gathers/scatters 1/8 shards
  assert dp["collective_gib_per_device"] > 1.5 * dp["params_gib"]


_HLO = """\
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[16,4]{1,0} all-gather(f32[4,4]{1,0} %x), replica_groups=[2,4]<=[8], dimensions={0}
}

%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main.2 (a: f32[8]) -> f32[8] {
  %ar = bf16[1024]{0} all-reduce(bf16[1024]{0} %g), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %rs = f32[2]{0} reduce-scatter(f32[16]{0} %h), replica_groups=[1,8]<=[8], dimensions={0}
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}
}
"""


def test_collective_bytes_weight_loop_bodies_by_trip_count():
  assert plan.computation_multipliers(_HLO) == {"body.1": 5, "cond.1": 1, "main.2": 1, "add": 1}
  expected = (5 * 16 * 4 * 4 * 3 / 4          # all-gather in a 5-trip loop, groups of 4
              + 2 * 1024 * 2 * 1 / 2          # all-reduce of bf16[1024], pairs
              + 2 * 4 * 7)                    # reduce-scatter to f32[2] over 8
  assert plan.collective_bytes(_HLO, 8) == pytest.approx(expected)


def test_chip_table_and_markdown():
  assert plan.chip_spec("v5p") == {"peak_tflops": 459.0, "hbm_gib": 95, "hbm_gbs": 2765, "link_gbs": 600}
  assert plan.chip_spec("H100")["peak_tflops"] == 989.0
  with pytest.raises(ValueError, match=r"--chip='v9': allowed \['a100', 'h100'"):
    plan.chip_spec("v9")


def test_tpu_slice_shapes_and_names():
  assert [plan.torus_shape(c) for c in (4, 8, 16, 32, 64, 128, 256, 512)] == [
      (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8)]
  assert plan.parse_topology("v5p-128") == ("v5p", (4, 4, 4))      # 128 TensorCores = 64 chips
  for name, message in (("v6e-8", "allowed v4-N/v5p-N"), ("v5p-12", "a 6-chip slice: allowed a power of two")):
    with pytest.raises(ValueError, match=f"--topology='{name}': {message}"):
      plan.parse_topology(name)


# XLA:TPU without a TPU: JAX's ahead-of-time compilation for a slice (the test extra has libtpu).
_TINY_3D = {"model.depth": 1, "model.decoder_depth": 1, "batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4}


def test_plan_compiles_for_a_tpu_slice_with_the_flash_kernel():
  """v5p-16 is 8 chips on 2 hosts: one slice, so mesh.data × mesh.fsdp spans both hosts. 'auto'
  attention is the Pallas kernel there, and the FLOPs equal the same step's on CPU devices (the
  kernel counted as XLA's attention)."""
  pytest.importorskip("libtpu")
  from configs import mae3d  # pylint: disable=g-import-not-at-top
  from medfm_jax.models import tpu_attention  # pylint: disable=g-import-not-at-top
  from medfm_jax.train import assemble, telemetry  # pylint: disable=g-import-not-at-top
  devices = plan.tpu_devices("v5p-16")
  assert len(devices) == 8 and len({d.process_index for d in devices}) == 2
  config = mae3d.get_config("tiny," + ",".join(f"{k}={v}" for k, v in _TINY_3D.items()))
  tpu = plan.plan(config, "v5p", devices=devices)          # attention 'auto' resolved for the TPU
  assert tpu_attention.target() == "cpu"
  assert (tpu["platform"], tpu["attention"], tpu["devices"]) == ("tpu", "pallas", 8)
  assert tpu["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert 0 < tpu["temp_gib"] < 1 and tpu["fits"]
  xla = config.copy_and_resolve_references()
  xla.model.attention_impl = "xla"
  cpu_flops = telemetry.step_flops(assemble.assemble(xla, helpers.single_device_mesh(xla)).lower())
  np.testing.assert_allclose(tpu["tflop_per_step"], cpu_flops / 1e12, rtol=1e-6)


def test_flash_kernel_memory_on_tpu_is_linear_in_the_tokens():
  """One v5p chip, 2 heads of 64, forward and backward, 4,096 and 8,192 tokens: XLA's attention
  holds the [heads, N, N] logits (quadratic: 256 -> 1,024 MiB), the Pallas kernel O(N · d)
  (linear: 30 -> 60 MiB)."""
  pytest.importorskip("libtpu")
  device = plan.tpu_devices("v5p-8")[0]

  def temps(impl, n):
    x = jax.ShapeDtypeStruct((1, n, 2, 64), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
    loss = lambda q: layers.dot_product_attention(q, q, q, implementation=impl).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes
  xla = [temps(None, n) for n in (4096, 8192)]
  pallas = [temps("pallas", n) for n in (4096, 8192)]
  assert xla[0] >= 2 * 4096 ** 2 * 4 and xla[1] / xla[0] > 3.9, xla       # f32 logits, quadratic
  assert pallas[1] / pallas[0] < 2.1 and pallas[1] < xla[1] / 8, pallas    # linear
